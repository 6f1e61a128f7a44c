"""Shared pytest configuration."""

import os
import sys

import pytest

# Benchmarks and examples are importable as top-level packages in tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
