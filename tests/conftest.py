"""Shared pytest configuration."""

import os
import re
import sys
import warnings

import pytest

# warnings_test runs the warning policy in a separate pytest session.
pytest_plugins = ["pytester"]

# Benchmarks and examples are importable as top-level packages in tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Modules whose warnings the pyproject `filterwarnings` turn into errors.
_OWN_CODE = re.compile(r"(sgs_optax|benchmarks|examples)(\.|$)")
_warn = warnings.warn


def _warn_as_raiser(message, category=None, stacklevel=1, source=None,
                    **kwargs):
  """`warnings.warn` that files our own code's warnings under its module.

  The `filterwarnings` policy keys on the module a warning is attributed to,
  which `stacklevel` moves to the caller: a warning that an sgs_optax
  transform raises with `stacklevel=2` is attributed to `optax.chain`, and
  would only be reported. Here it is matched against the module that raised
  it; the file and line shown stay those that `stacklevel` chose.
  """
  __tracebackhide__ = True  # pylint: disable=unused-variable
  raiser = sys._getframe(1)  # pylint: disable=protected-access
  module = raiser.f_globals.get("__name__", "")
  if kwargs or not _OWN_CODE.match(module):
    return _warn(message, category, stacklevel + 1, source, **kwargs)
  if isinstance(message, Warning):
    category = type(message)
  frame = raiser
  for _ in range(stacklevel - 1):
    frame = frame.f_back or frame
  return warnings.warn_explicit(
      message, category or UserWarning, frame.f_code.co_filename,
      frame.f_lineno, module=module,
      registry=frame.f_globals.setdefault("__warningregistry__", {}),
      module_globals=frame.f_globals, source=source)


def pytest_configure(config):
  del config
  warnings.warn = _warn_as_raiser


def pytest_unconfigure(config):
  del config
  warnings.warn = _warn


@pytest.fixture
def tfds(monkeypatch):
  """tensorflow_datasets with every download or prepare call made to fail."""
  tfds = pytest.importorskip("tensorflow_datasets")

  def no_download(*args, **kwargs):
    raise AssertionError("a test tried to download or prepare a dataset")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      no_download)
  monkeypatch.setattr(tfds.download.DownloadManager, "download", no_download)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      no_download)
  return tfds
