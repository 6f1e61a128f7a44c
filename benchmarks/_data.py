"""Datasets for the benchmarks, as in-memory numpy arrays.

* ``digits`` (default): scikit-learn's 8x8 handwritten digits, shipped inside
  the scikit-learn wheel, so it works offline and in CI. A seeded, stratified
  80/20 train/test split.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: read with
  ``tfds.data_source`` from ArrayRecord files that must already be on disk
  (``download=False`` always: nothing here ever downloads). Reading needs no
  TensorFlow; *preparing* the files does (see :data:`PREPARE_HELP`).

Images are float32 NHWC in [0, 1] (or standardised per channel with the
training-set statistics when ``normalize=True``); labels are int32.

Batches come from :func:`epoch_batches`: a seeded numpy permutation per epoch,
the same whichever optional packages are installed.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

NUM_CLASSES = {
    "digits": 10,
    "mnist": 10,
    "fashion_mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
}
DATASETS = tuple(NUM_CLASSES)
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")

# Checked against tensorflow-datasets 4.9.10: the `tfds` command line tool
# imports TensorFlow at start-up, and the MNIST/CIFAR generators read their
# source files with `tf.io.gfile` and encode images with `tf.image.encode_png`,
# so preparing the files needs TensorFlow. Reading them back through
# `tfds.data_source` (ArrayRecord) does not.
PREPARE_HELP = """\
Prepare the ArrayRecord files once, on a machine with internet access and
TensorFlow (tensorflow-datasets 4.9.x needs TensorFlow to *build* MNIST/CIFAR:
its `tfds` CLI imports TensorFlow and the generators use tf.io.gfile and
tf.image.encode_png; *reading* the result needs no TensorFlow):

    pip install tensorflow tensorflow-datasets
    tfds build {name} --file_format=array_record --data_dir=DIR

or, in Python:

    import tensorflow_datasets as tfds
    tfds.builder("{name}", data_dir="DIR",
                 file_format="array_record").download_and_prepare()

then copy DIR (it contains {name}/<version>/*.array_record-*) to this machine
and pass it as data_dir (compare.py: --data-dir DIR). Data already prepared in
the default TFRecord format must be rebuilt with --file_format=array_record."""


def num_classes(name: str) -> int:
  """Number of classes of a benchmark dataset."""
  _check_name(name)
  return NUM_CLASSES[name]


def _check_name(name: str) -> None:
  if name not in NUM_CLASSES:
    raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS}.")


def _load_digits(seed: int):
  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  # pylint: enable=g-import-not-at-top

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # (N, 8, 8, 1)
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels, test_size=0.2, stratify=labels, random_state=seed
  )
  return x_train, y_train, x_test, y_test


def _read_all(source: Sequence[Any], chunk: int = 4096):
  """Reads every record of a tfds data source into stacked numpy arrays."""
  n = len(source)
  images, labels = [], []
  for start in range(0, n, chunk):
    keys = list(range(start, min(n, start + chunk)))
    try:
      records = source.__getitems__(keys)
    except (AttributeError, TypeError):
      # `tfds.testing.mock_data` sources do not implement batched reads.
      records = [source[k] for k in keys]
    for record in records:
      images.append(np.asarray(record["image"]))
      labels.append(np.asarray(record["label"]))
  if not images:
    raise ValueError("The data source is empty.")
  return np.stack(images), np.stack(labels)


def _diagnose(name: str, split: str, data_dir: str | None,
              error: Exception) -> str:
  """Says what is on disk: tfds' own message is misleading when nothing is."""
  root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")
  dataset_dir = pathlib.Path(root) / name
  files = sorted(p.name for p in dataset_dir.glob("*/*")) if (
      dataset_dir.is_dir()) else []
  if any("array_record" in f for f in files):
    found = "ArrayRecord files are there but could not be read"
  elif any("tfrecord" in f for f in files):
    found = ("only TFRecord files are there (tfds.data_source needs "
             "ArrayRecord)")
  else:
    found = "no prepared data is there"
  return (f"Cannot read tfds dataset {name!r} (split {split!r}) from "
          f"{dataset_dir}: {found}. Nothing is downloaded (download=False). "
          f"[{type(error).__name__}: {str(error).splitlines()[0]}]")


def _load_tfds(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if data_dir is not None:
    data_dir = os.fspath(data_dir)
  arrays = []
  for split in ("train", "test"):
    try:
      source = tfds.data_source(
          name, split=split, data_dir=data_dir, download=False, try_gcs=False
      )
    except (AssertionError, NotImplementedError, FileNotFoundError,
            OSError) as e:
      raise FileNotFoundError(
          _diagnose(name, split, data_dir, e) + "\n\n"
          + PREPARE_HELP.format(name=name)
      ) from e
    images, labels = _read_all(source)
    arrays += [(images.astype(np.float32) / 255.0), labels.astype(np.int32)]
  return tuple(arrays)


def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    normalize: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads a benchmark dataset into memory.

  Args:
    name: one of :data:`DATASETS`.
    data_dir: tfds data directory holding ArrayRecord files (tfds datasets
      only; default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    seed: seed of the digits train/test split (tfds datasets use their
      standard splits).
    normalize: standardise each channel with the training-set mean and std
      (otherwise images are in [0, 1]).

  Returns:
    ``(train_images, train_labels, test_images, test_labels)``: float32 NHWC
    images and int32 labels. See :func:`num_classes` for the class count.

  Raises:
    ValueError: for an unknown dataset name.
    FileNotFoundError: when a tfds dataset is not prepared as ArrayRecord under
      ``data_dir``; the message says how to prepare it. Never downloads.
  """
  _check_name(name)
  if name == "digits":
    x_train, y_train, x_test, y_test = _load_digits(seed)
  else:
    x_train, y_train, x_test, y_test = _load_tfds(name, data_dir)
  if normalize:
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    std = x_train.std(axis=(0, 1, 2), keepdims=True)
    std = np.where(std > 0, std, 1.0)
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
  return (
      np.ascontiguousarray(x_train, dtype=np.float32),
      np.asarray(y_train, dtype=np.int32),
      np.ascontiguousarray(x_test, dtype=np.float32),
      np.asarray(y_test, dtype=np.int32),
  )


def epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit seed for one epoch's shuffle, derived from the run seed."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_batches(
    num_examples: int, batch_size: int, *, seed: int, epoch: int
) -> Iterator[np.ndarray]:
  """Yields index batches of one epoch, shuffled by ``(seed, epoch)``.

  The last incomplete batch is dropped so that every batch has the same shape
  (one compilation of the train step). A seeded numpy permutation, so the
  order depends only on ``(seed, epoch)``, never on which optional packages
  are installed.

  Args:
    num_examples: dataset size.
    batch_size: examples per batch (clipped to ``num_examples``).
    seed: run seed.
    epoch: epoch number; each epoch gets its own permutation.

  Yields:
    int64 index arrays of shape ``(batch_size,)``.
  """
  batch_size = min(batch_size, num_examples)
  perm = np.random.default_rng(epoch_seed(seed, epoch)).permutation(
      num_examples)
  for i in range(num_examples // batch_size):
    yield perm[i * batch_size:(i + 1) * batch_size]
