"""The examples' data: scikit-learn's digits, which ship with scikit-learn,
and, for the 1-D and 3-D examples, synthetic sequences and volumes generated
from a seed.

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
  """Channels-last float32 inputs (NHWC digits in [0, 1], or the synthetic
  sequences and volumes) and int32 labels."""

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


def _split(x: np.ndarray, y: np.ndarray, n_test: int) -> Split:
  return Split(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...],
                  std: float) -> np.ndarray:
  """Gaussian noise averaged over 3 neighbours per axis (correlated, as in
  natural signals), rescaled to ``std``."""
  x = rng.normal(size=shape)
  for axis in range(1, len(shape)):
    x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
  return (std * x / x.std()).astype(np.float32)


def sequences(seed: int = 0, size: int = 2048, length: int = 64) -> Split:
  """Noisy 1-D sequences, each holding one of four 15-step motifs.

  The motif (a rising ramp, a falling ramp, a bump, or two periods of a sine)
  sits at a random offset in smooth Gaussian noise (std 0.6); the label is the
  motif.
  Generated from ``seed`` alone; a quarter of the examples are the test set.

  Returns:
    A split with ``x`` of shape ``(n, length, 1)`` (float32).
  """
  rng = np.random.default_rng(seed)
  t = np.linspace(-1.0, 1.0, 15)
  motifs = 1.5 * np.stack([t, -t, 2 * np.cos(np.pi * t / 2) ** 2 - 1,
                           np.sin(2 * np.pi * t)])
  labels = rng.integers(0, 4, size)
  x = _smooth_noise(rng, (size, length), 0.6)
  starts = rng.integers(0, length - 15 + 1, size)
  for i, (label, start) in enumerate(zip(labels, starts)):
    x[i, start:start + 15] += motifs[label]
  return _split(x[..., None], labels.astype(np.int32), size // 4)


def volumes(seed: int = 0, size: int = 1024, side: int = 8) -> Split:
  """Noisy 3-D volumes, each holding one of four small solid shapes.

  The shape (a 3x3x3 cube, a 5-voxel line along depth, one along width, or a
  3-D cross) sits at a random position in smooth Gaussian noise (std 0.5); the
  label is the shape. Generated from ``seed`` alone; a quarter of the
  examples are the test set.

  Returns:
    A split with ``x`` of shape ``(n, side, side, side, 1)`` (float32).
  """
  rng = np.random.default_rng(seed)
  shapes = np.zeros((4, 5, 5, 5), np.float32)
  shapes[0, 1:4, 1:4, 1:4] = 1
  shapes[1, :, 2, 2] = 1
  shapes[2, 2, 2, :] = 1
  shapes[3, 2, 2, 1:4] = shapes[3, 2, 1:4, 2] = shapes[3, 1:4, 2, 2] = 1
  labels = rng.integers(0, 4, size)
  x = _smooth_noise(rng, (size, side, side, side), 0.5)
  corners = rng.integers(0, side - 5 + 1, (size, 3))
  for i, (label, (d, h, w)) in enumerate(zip(labels, corners)):
    x[i, d:d + 5, h:h + 5, w:w + 5] += shapes[label]
  return _split(x[..., None], labels.astype(np.int32), size // 4)
