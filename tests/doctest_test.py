"""The docstring examples of the public modules run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import sgs_optax

MODULES = sorted(m.name for m in pkgutil.iter_modules(
    sgs_optax.__path__, "sgs_optax."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
  assert result.attempted > 0, f"{name} has no docstring example"
