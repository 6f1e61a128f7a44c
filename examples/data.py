"""The examples' data: scikit-learn's digits, which ship with scikit-learn.

Also the command line the digits examples share: ``--epochs``, ``--seed``
and a ``--tiny`` mode (512 training images, 3 epochs) that their tests run.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import numpy as np

TINY_TRAIN_SIZE = 512
TINY_EPOCHS = 3


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
  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  # pylint: enable=g-import-not-at-top

  raw = load_digits()
  images = (raw.images / 16.0).astype(np.float32)[..., None]
  x_train, x_test, y_train, y_test = train_test_split(
      images, raw.target.astype(np.int32), test_size=0.2,
      stratify=raw.target, random_state=seed)
  if train_size is not None:
    x_train, y_train = x_train[:train_size], y_train[:train_size]
  return Split(x_train, y_train, x_test, y_test)


def batches(num_examples: int, batch_size: int,
            rng: np.random.Generator) -> list[np.ndarray]:
  """One epoch: a permutation cut into full batches (the rest is dropped)."""
  count = num_examples // batch_size
  if count < 1:
    raise ValueError(f"batch_size {batch_size} is larger than the "
                     f"{num_examples} examples.")
  return np.split(rng.permutation(num_examples)[:count * batch_size], count)


def parser(doc: str, *, epochs: int) -> argparse.ArgumentParser:
  """A parser with ``--epochs``, ``--seed`` and ``--tiny``, for ``doc``."""
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=epochs)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
      "--tiny", action="store_true",
      help=f"{TINY_TRAIN_SIZE} training images, {TINY_EPOCHS} epochs (tests)")
  return parser


def from_args(args: argparse.Namespace) -> tuple[Split, int]:
  """The split of ``args.seed`` and the number of epochs, tiny or not."""
  if args.tiny:
    return digits(args.seed, train_size=TINY_TRAIN_SIZE), TINY_EPOCHS
  return digits(args.seed), args.epochs
