"""Tests of the public API's shape: examples, references, module boundaries.

These read the package's own source and docstrings: every public callable
shows an example, nothing public points readers into a private module, and
framework-specific code and `ConvInput` stay where the architecture puts them.
"""

import ast
import inspect
import pathlib

import pytest

import sgs_optax

PACKAGE = pathlib.Path(sgs_optax.__file__).parent
DOCS = PACKAGE.parent / "docs"
# The modules allowed to know about Flax and Equinox: the one that gathers
# framework code, and the Flax module that cannot exist without Flax.
FRAMEWORK_MODULES = {"_frameworks.py", "_branched_conv.py"}
# The framework packages, and the ways to look a package up without importing
# it by name.
FRAMEWORKS = {"flax", "equinox"}
LOOKUPS = {"find_spec", "modules"}


def public_names():
  return sorted({*sgs_optax.__all__, "BranchedConv"})


def public_docstrings():
  """(where, docstring) of every public callable and its public members."""
  docs = [("sgs_optax", sgs_optax.__doc__ or "")]
  for name in public_names():
    obj = getattr(sgs_optax, name)
    docs.append((name, inspect.getdoc(obj) or ""))
    if inspect.isclass(obj):
      for member, value in vars(obj).items():
        if member.startswith("_"):
          continue
        doc = inspect.getdoc(value) if (
            inspect.isfunction(value) or isinstance(value, property)) else None
        if doc:
          docs.append((f"{name}.{member}", doc))
  return docs


@pytest.mark.parametrize("name", public_names())
def test_every_public_callable_has_examples_in_its_own_docstring(name):
  obj = getattr(sgs_optax, name)
  # Its own docstring, not one inherited from a base class.
  doc = obj.__doc__ or ""
  assert "Examples:" in doc and ">>> " in doc, (
      f"sgs_optax.{name} has no doctested Examples: section.")


def test_public_docstrings_name_no_private_module():
  offenders = [where for where, doc in public_docstrings()
               if "sgs_optax._" in doc]
  assert not offenders, offenders


def _md_files():
  return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


@pytest.mark.parametrize("page", _md_files())
def test_docs_pages_name_no_private_module(page):
  text = (DOCS / page).read_text(encoding="utf-8")
  assert "sgs_optax._" not in text


def _framework_uses(path: pathlib.Path) -> list[str]:
  """Imports of Flax or Equinox, and package lookups, in one module."""
  uses = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      uses += [a.name for a in node.names
               if a.name.split(".")[0] in FRAMEWORKS]
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module.split(".")[0] in FRAMEWORKS:
        uses.append(node.module)
    elif isinstance(node, ast.Attribute) and node.attr in LOOKUPS:
      base = node.value
      if node.attr == "find_spec" or (
          isinstance(base, ast.Name) and base.id == "sys"):
        uses.append(ast.unparse(node))
    elif isinstance(node, ast.Name) and node.id == "find_spec":
      uses.append(node.id)
    elif isinstance(node, ast.alias) and node.name == "find_spec":
      uses.append(node.name)
  return uses


def _package_modules():
  return sorted(p.name for p in PACKAGE.glob("*.py")
                if p.name not in FRAMEWORK_MODULES)


@pytest.mark.parametrize("module", _package_modules())
def test_framework_code_lives_in_the_framework_modules(module):
  uses = _framework_uses(PACKAGE / module)
  assert not uses, f"{module} uses {uses}: move it to _frameworks.py."


def test_the_framework_check_sees_what_it_looks_for():
  # The check above must not pass by seeing nothing.
  assert _framework_uses(PACKAGE / "_frameworks.py")
  assert "flax.linen" in _framework_uses(PACKAGE / "_branched_conv.py")


def _imports(path: pathlib.Path) -> set[str]:
  """The package modules a module imports, as ``_name``."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "sgs_optax":
        names |= {a.name for a in node.names}
      elif node.module.startswith("sgs_optax."):
        names.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      names |= {a.name.split(".")[1] for a in node.names
                if a.name.startswith("sgs_optax.")}
  return names


def _defines(path: pathlib.Path, name: str) -> bool:
  tree = ast.parse(path.read_text(encoding="utf-8"))
  return any(isinstance(node, ast.ClassDef) and node.name == name
             for node in tree.body)


def test_conv_input_sits_beside_the_geometry():
  assert not _defines(PACKAGE / "_refresh.py", "ConvInput")
  assert _defines(PACKAGE / "_geometry.py", "ConvInput")
  assert "_refresh" not in _imports(PACKAGE / "_capture.py")
  # The capture reads ConvInput from the geometry module.
  assert "_geometry" in _imports(PACKAGE / "_capture.py")
