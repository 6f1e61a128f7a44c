"""The examples' data: scikit-learn's digits, which ship with scikit-learn."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
  """Images NHWC in [0, 1] (float32) and int32 labels."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def digits(seed: int = 0, train_size: int | None = None) -> Split:
  """A stratified 80/20 split of the 1797 8x8 digits.

  Args:
    seed: the split's random state.
    train_size: keep only the first this many training images (tiny modes).

  Returns:
    The split.
  """
  # Imported here: scikit-learn is only needed by the examples.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  raw = load_digits()
  images = (raw.images / 16.0).astype(np.float32)[..., None]
  x_train, x_test, y_train, y_test = train_test_split(
      images, raw.target.astype(np.int32), test_size=0.2,
      stratify=raw.target, random_state=seed)
  if train_size is not None:
    x_train, y_train = x_train[:train_size], y_train[:train_size]
  return Split(x_train, y_train, x_test, y_test)
