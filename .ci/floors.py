"""Prints pip constraints that pin every declared dependency to its floor.

Reads pyproject.toml: the runtime dependencies plus the requirements of the
extras named on the command line (and of the extras they name, such as
``sgs-optax[flax]``), and turns each ``name>=X`` into ``name==X``. A
requirement without a ``>=`` floor is an error, so that every dependency has a
floor that CI installs and tests.

Usage: python .ci/floors.py [EXTRA ...] > constraints.txt
"""

import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
# name, optional [extras], version specifiers, optional "; marker".
REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*"
    r"(?:\[(?P<extras>[^\]]*)\])?\s*"
    r"(?P<specs>[^;]*?)\s*(?:;\s*(?P<marker>.*))?$")


def normalize(name: str) -> str:
  """The PEP 503 form of a distribution name."""
  return re.sub(r"[-_.]+", "-", name).lower()


def floor(requirement: str) -> str:
  """`name==X` (with the requirement's marker) for `name>=X,...`."""
  match = REQUIREMENT.match(requirement)
  if match is None:
    raise ValueError(f"cannot parse requirement {requirement!r}")
  floors = [s.strip()[2:].strip() for s in match["specs"].split(",")
            if s.strip().startswith(">=")]
  if len(floors) != 1:
    raise ValueError(f"{requirement!r} needs exactly one '>=' floor")
  pin = f"{match['name']}=={floors[0]}"
  return f"{pin}; {match['marker']}" if match["marker"] else pin


def requirements(project: dict, extras: list[str]) -> list[str]:
  """Runtime requirements plus those of `extras`, self-references expanded."""
  name = normalize(project["name"])
  optional = project.get("optional-dependencies", {})
  todo, seen, found = list(extras), set(), list(project["dependencies"])
  while todo:
    extra = todo.pop()
    if extra in seen:
      continue
    if extra not in optional:
      raise ValueError(f"pyproject.toml has no extra {extra!r}")
    seen.add(extra)
    for requirement in optional[extra]:
      match = REQUIREMENT.match(requirement)
      if match and normalize(match["name"]) == name:
        todo.extend(e.strip() for e in (match["extras"] or "").split(","))
      else:
        found.append(requirement)
  return found


def constraints(pyproject: dict, extras: list[str]) -> list[str]:
  """One `name==floor` line per distribution, sorted by name.

  Raises:
    ValueError: if two requirements give one distribution different floors.
  """
  pins = {}
  for requirement in requirements(pyproject["project"], extras):
    pin = floor(requirement)
    name = normalize(REQUIREMENT.match(pin)["name"])
    if pins.setdefault(name, pin) != pin:
      raise ValueError(f"two floors for {name}: {pins[name]!r}, {pin!r}")
  return [pins[name] for name in sorted(pins)]


def main(argv: list[str]) -> None:
  pyproject = tomllib.loads(PYPROJECT.read_text())
  print("\n".join(constraints(pyproject, argv[1:])))


if __name__ == "__main__":
  main(sys.argv)
