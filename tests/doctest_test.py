"""The docstring examples of the public modules run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["sgs_optax._spatial", "sgs_optax._channel", "sgs_optax._branches",
           "sgs_optax._dependence"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
