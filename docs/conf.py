"""Sphinx configuration for the sgs_optax documentation."""

import inspect
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import sgs_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "sgs_optax"
author = "sgs_optax developers"
copyright = "2026, sgs_optax developers"  # pylint: disable=redefined-builtin
release = sgs_optax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
templates_path = ["_templates"]
autodoc_typehints = "description"
# Types of the parameters a docstring documents (and of the return value),
# not of every dataclass field a class inherits.
autodoc_typehints_description_target = "documented_params"
# Annotations name public classes as users reach them, not by the private
# module that defines them (annotations are strings: `from __future__ import
# annotations`).
autodoc_type_aliases = {
    name: f"sgs_optax.{name}" for name in sgs_optax.__all__
    if isinstance(getattr(sgs_optax, name), type)
}
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# The README's results use H3 subsections under its H2; included under the
# results page's H1 they skip a level, which renders fine.
suppress_warnings = ["myst.header"]
html_theme = "alabaster"
html_title = f"sgs_optax {release}"


def _skip_foreign_members(app, what, name, obj, skip, options):
  """Leaves out class members that sgs_optax does not define.

  A dataclass field whose default is a function (``BranchedConv``'s
  ``kernel_init``, a Flax initializer) would otherwise be listed as a method;
  the class docstring documents it among its attributes.
  """
  del app, what, name, skip, options
  module = getattr(obj, "__module__", None)
  if callable(obj) and module and not module.startswith("sgs_optax"):
    return True
  return None


def _drop_flax_fields(app, what, name, obj, options, signature,
                      return_annotation):
  """Leaves Flax's own dataclass fields out of a linen module's signature.

  Every ``nn.Module`` takes ``parent`` and ``name``; they are Flax's API,
  documented by Flax, not ``BranchedConv``'s.
  """
  del app, name, options
  if what != "class" or not signature or not any(
      c.__module__.startswith("flax.") for c in getattr(obj, "__mro__", ())):
    return None
  params = inspect.signature(obj).parameters.values()
  kept = [p.replace(annotation=inspect.Parameter.empty) for p in params
          if p.name not in ("parent", "name")]
  return str(inspect.Signature(kept)), return_annotation


def setup(app):
  app.connect("autodoc-skip-member", _skip_foreign_members)
  app.connect("autodoc-process-signature", _drop_flax_fields)
