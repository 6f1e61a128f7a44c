"""Packaging: declared dependencies, the wheel and sdist as users get them."""

import ast
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Which extras must provide what each folder imports (besides the runtime
# dependencies): a user of the package installs `sgs-optax[flax]`, one who
# runs the examples `sgs-optax[examples]`, and so on.
FOLDER_EXTRAS = {
    "sgs_optax": ["flax"],
    "benchmarks": ["benchmarks", "data"],
    "examples": ["examples"],
    "tests": ["test"],
    "docs": ["docs"],
}
LOCAL = {"sgs_optax", "benchmarks", "examples", "conftest"}


def normalize(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement):
  return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)


def declared(extras):
  """Distributions that `pip install sgs-optax[extras]` asks for by name."""
  found, todo, seen = set(), list(extras), set()
  for requirement in PROJECT["dependencies"]:
    found.add(normalize(requirement_name(requirement)))
  while todo:
    extra = todo.pop()
    if extra in seen:
      continue
    seen.add(extra)
    for requirement in PROJECT["optional-dependencies"][extra]:
      name = normalize(requirement_name(requirement))
      if name == normalize(PROJECT["name"]):
        todo.extend(re.search(r"\[(.*)\]", requirement).group(1).split(","))
      else:
        found.add(name)
  return found


def imported_modules(folder):
  """Top-level names of every absolute import in `folder`'s Python files."""
  for path in sorted(folder.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module]
      else:
        continue
      for name in names:
        yield path.relative_to(ROOT), name.split(".")[0]


@pytest.mark.parametrize("folder", sorted(FOLDER_EXTRAS))
def test_every_imported_package_is_declared(folder):
  assert (ROOT / folder).is_dir(), f"{folder}/ is gone: update FOLDER_EXTRAS"
  providers = importlib.metadata.packages_distributions()
  allowed = declared(FOLDER_EXTRAS[folder])
  local = LOCAL | {p.stem for p in (ROOT / folder).glob("*.py")}
  undeclared = []
  for path, module in imported_modules(ROOT / folder):
    if module in sys.stdlib_module_names or module in local:
      continue
    distributions = {normalize(d) for d in providers.get(module, [])}
    if not distributions & allowed:
      undeclared.append(f"{path}: {module} (from {sorted(distributions)})")
  assert not undeclared, (
      f"imported but not declared in {FOLDER_EXTRAS[folder]} or the runtime "
      "dependencies of pyproject.toml:\n" + "\n".join(undeclared))


def test_extras_name_each_other_instead_of_copying():
  extras = PROJECT["optional-dependencies"]
  assert "sgs-optax[flax]" in extras["benchmarks"]
  assert "sgs-optax[flax]" in extras["examples"]
  assert "sgs-optax[benchmarks,data,docs,examples]" in extras["test"]
  for name, requirements in extras.items():
    names = [normalize(requirement_name(r)) for r in requirements]
    assert "flax" not in names or name == "flax", name


def load_floors():
  spec = importlib.util.spec_from_file_location("floors",
                                                ROOT / ".ci" / "floors.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_floors_pin_every_declared_requirement_at_its_minimum():
  floors = load_floors()
  pyproject = {"project": PROJECT}
  pins = dict(line.split("==") for line in floors.constraints(pyproject,
                                                              ["test"]))
  assert {normalize(name) for name in pins} == declared(["test"])
  groups = {"runtime": PROJECT["dependencies"],
            **PROJECT["optional-dependencies"]}
  for extra, requirements in groups.items():
    for requirement in requirements:
      if not requirement.startswith(PROJECT["name"]):
        name, minimum = re.match(r"([^>=<;\[ ]+)\s*>=\s*([^,; ]+)",
                                 requirement).groups()
        assert pins[name] == minimum, (extra, requirement)


@pytest.mark.parametrize("requirements", [
    ["numpy"], ["numpy<3"], ["numpy>=2,>=2.1"], ["numpy>=2", "numpy>=2.1"]])
def test_floors_refuse_a_missing_or_ambiguous_floor(requirements):
  floors = load_floors()
  pyproject = {"project": {"name": "x", "dependencies": requirements}}
  with pytest.raises(ValueError):
    floors.constraints(pyproject, [])


def run(command, **kwargs):
  """Runs `command`, failing the test with its output if it fails."""
  result = subprocess.run([str(c) for c in command], capture_output=True,
                          text=True, check=False, **kwargs)
  assert result.returncode == 0, (
      f"{command} exited {result.returncode}\n{result.stdout[-3000:]}"
      f"\n{result.stderr[-3000:]}")
  return result.stdout


# Runs in the fresh venv, where only the wheel's own dependencies are.
IMPORT_CHECK = textwrap.dedent("""
    import importlib.util
    import sgs_optax

    assert importlib.util.find_spec("flax") is None, "flax is installed"
    namespace = {}
    exec("from sgs_optax import *", namespace)
    try:
      sgs_optax.BranchedConv
    except ImportError as e:
      assert "sgs-optax[flax]" in str(e), e
    else:
      raise AssertionError("BranchedConv imported without flax")
    print(sgs_optax.__file__)
    print(" ".join(sorted(n for n in namespace if not n.startswith("_"))))
""")


@pytest.mark.slow
def test_wheel_and_sdist_build_pass_twine_and_import_without_flax(tmp_path):
  """Builds (the wheel from the sdist), checks, installs, imports."""
  dist = tmp_path / "dist"
  run([sys.executable, "-m", "build", "--outdir", dist, ROOT])
  (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
  run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel])

  env = tmp_path / "venv"
  run([sys.executable, "-m", "venv", env])
  python = env / "bin" / "python"
  # The versions this environment already resolved: pip reuses them (its
  # cache) and takes only the wheel's runtime dependencies, so no Flax.
  pins = sorted({f"{d.metadata['Name']}=={d.version}"
                 for d in importlib.metadata.distributions()
                 if normalize(d.metadata["Name"]) != "sgs-optax"})
  constraints = tmp_path / "constraints.txt"
  constraints.write_text("\n".join(pins) + "\n")
  run([python, "-m", "pip", "install", "--quiet", "-c", constraints, wheel])

  clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  location, names = run([python, "-c", IMPORT_CHECK], cwd=tmp_path,
                        env=clean).splitlines()
  assert pathlib.Path(location).is_relative_to(env), location
  for name in ("sgs", "cdg", "spatial_gradient_scaling", "refresh_scalings"):
    assert name in names.split(), names
  requires = importlib.metadata.Distribution.at(
      next((env / "lib").glob("python*/site-packages/sgs_optax-*.dist-info"))
  ).requires
  assert set(PROJECT["dependencies"]) <= {r.replace(" ", "") for r in requires}
