"""Sphinx configuration for the sgs_optax documentation."""

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
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# The README's results use H3 subsections under its H2; included under the
# results page's H1 they skip a level, which renders fine.
suppress_warnings = ["myst.header"]
html_theme = "alabaster"
html_title = f"sgs_optax {release}"
