"""Datasets for the benchmarks, as in-memory numpy arrays.

* ``digits`` (default): scikit-learn's 8x8 handwritten digits, shipped inside
  the scikit-learn wheel, so it works offline and in CI. A seeded, stratified
  80/20 train/test split.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: read with
  ``tfds.data_source`` from ArrayRecord files that must already be on disk
  (``download=False`` always: nothing here ever downloads). Reading needs no
  TensorFlow; *preparing* the files does (see :data:`PREPARE_HELP`).

:func:`load_raw` gives the pixels as stored (uint8, NHWC) so that a whole
split can sit on an accelerator as is (CIFAR's 50,000 training images are
154 MB as uint8, four times that as float32); :func:`load_dataset` gives
float32 images in [0, 1]. :func:`validation_split` carves a seeded,
stratified validation split out of the training split (never the test split).

Batches come from :func:`epoch_batches`: a seeded numpy permutation per epoch,
the same whichever optional packages are installed.

Every problem with the data raises a :class:`DataUnavailableError` whose
message says what to install or run; nothing before it (tfds' own warnings and
exceptions are silenced and not chained).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import logging
import os
import pathlib
from typing import Any, NamedTuple

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


INSTALL_HELP = """\
Dataset {name!r} is read with tensorflow-datasets, which is not installed.
Install it (no TensorFlow needed to read prepared data):

    pip install tensorflow-datasets
    (or, in a checkout: pip install -e ".[benchmarks,data]")

The default dataset, digits, needs only scikit-learn."""

# Pixel value of white in the stored images (digits count strokes out of 16).
MAX_VALUE = {"digits": 16, "mnist": 255, "fashion_mnist": 255, "cifar10": 255,
             "cifar100": 255}
# Share of the training split held out for validation (tuning), per dataset.
VALIDATION_FRACTION = {"digits": 0.2}
DEFAULT_VALIDATION_FRACTION = 0.1


class DataUnavailableError(Exception):
  """The data cannot be read; the message says what to install or run."""


class MissingPackageError(DataUnavailableError, ModuleNotFoundError):
  """A package needed to read the dataset is not installed."""


class MissingDataError(DataUnavailableError, FileNotFoundError):
  """The dataset is not prepared where it was looked for."""


class Dataset(NamedTuple):
  """A dataset as stored: uint8 NHWC images and int32 labels.

  Attributes:
    x_train: training images, uint8 ``(N, H, W, C)``.
    y_train: training labels, int32 ``(N,)``.
    x_test: test images.
    y_test: test labels.
    max_value: the pixel value of white (16 for digits, 255 otherwise).
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  max_value: int


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
  images = digits.images.astype(np.uint8)[..., None]  # (N, 8, 8, 1), 0..16.
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


def _data_root(data_dir: str | None) -> tuple[pathlib.Path, str]:
  """Where tfds looks, and how the user chose it (for the message)."""
  if data_dir is not None:
    return pathlib.Path(data_dir), "--data-dir"
  if os.environ.get("TFDS_DATA_DIR"):
    return pathlib.Path(os.environ["TFDS_DATA_DIR"]), "$TFDS_DATA_DIR"
  return pathlib.Path("~/tensorflow_datasets").expanduser(), "the default"


def _split_files(dataset_dir: pathlib.Path, name: str, split: str,
                 kind: str) -> list[str]:
  pattern = f"*/{name}-{split}.{kind}*"
  return sorted(p.name for p in dataset_dir.glob(pattern))


def _diagnose(name: str, data_dir: str | None, error: Exception) -> str:
  """One sentence on what is missing, from what is on disk."""
  root, origin = _data_root(data_dir)
  dataset_dir = root / name
  if not root.is_dir():
    return (f"The data directory {root} ({origin}) does not exist, so "
            f"dataset {name!r} is not prepared there.")
  if not dataset_dir.is_dir():
    return f"Dataset {name!r} is not prepared in {root} (no {dataset_dir})."
  missing = [split for split in ("train", "test")
             if not _split_files(dataset_dir, name, split, "array_record")]
  if missing and all(_split_files(dataset_dir, name, s, "tfrecord")
                     for s in missing):
    return (f"Dataset {name!r} in {dataset_dir} is prepared as TFRecord; "
            "tfds.data_source reads only ArrayRecord: rebuild it with "
            "--file_format=array_record.")
  if missing:
    return (f"The {' and '.join(repr(s) for s in missing)} split of dataset "
            f"{name!r} is not prepared in {dataset_dir} (no "
            f"{name}-{missing[0]}.array_record-* file).")
  first_line = (str(error).splitlines() or [""])[0]
  return (f"The ArrayRecord files of dataset {name!r} in {dataset_dir} could "
          f"not be read ({type(error).__name__}: {first_line}).")


@contextlib.contextmanager
def _quiet_absl():
  """tfds logs misleading warnings (e.g. a missing dataset_info.json)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _import_tfds(name: str):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingPackageError(INSTALL_HELP.format(name=name)) from None
  return tfds


def _load_tfds(name: str, data_dir: str | None):
  tfds = _import_tfds(name)
  if data_dir is not None:
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):  # Checked first: tfds would warn.
      raise MissingDataError(
          _diagnose(name, data_dir, FileNotFoundError(data_dir)) + "\n\n"
          + PREPARE_HELP.format(name=name))
  arrays = []
  for split in ("train", "test"):
    failure = None
    with _quiet_absl():
      try:
        source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False,
            try_gcs=False)
      except (AssertionError, NotImplementedError, OSError, KeyError,
              ValueError) as e:
        failure = e
    if failure is not None:  # Raised outside `except`: nothing chained.
      raise MissingDataError(_diagnose(name, data_dir, failure) + "\n\n"
                             + PREPARE_HELP.format(name=name))
    images, labels = _read_all(source)
    arrays += [images.astype(np.uint8), labels.astype(np.int32)]
  return tuple(arrays)


def load_raw(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> Dataset:
  """Loads a benchmark dataset into memory as stored (uint8 pixels).

  Args:
    name: one of :data:`DATASETS`.
    data_dir: tfds data directory holding ArrayRecord files (tfds datasets
      only; default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    seed: seed of the digits train/test split (tfds datasets use their
      standard splits).

  Returns:
    A :class:`Dataset`. See :func:`num_classes` for the class count.

  Raises:
    ValueError: for an unknown dataset name.
    MissingPackageError: tensorflow-datasets is needed and not installed.
    MissingDataError: the data directory does not exist, or the dataset or
      one of its splits is not prepared there as ArrayRecord. Never downloads.
  """
  _check_name(name)
  if name == "digits":
    arrays = _load_digits(seed)
  else:
    arrays = _load_tfds(name, data_dir)
  x_train, y_train, x_test, y_test = arrays
  return Dataset(np.ascontiguousarray(x_train), np.asarray(y_train, np.int32),
                 np.ascontiguousarray(x_test), np.asarray(y_test, np.int32),
                 MAX_VALUE[name])


def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    normalize: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads a benchmark dataset into memory as float32 images.

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
    images and int32 labels.

  Raises:
    ValueError, MissingPackageError, MissingDataError: as :func:`load_raw`.
  """
  data = load_raw(name, data_dir=data_dir, seed=seed)
  x_train = data.x_train.astype(np.float32) / data.max_value
  x_test = data.x_test.astype(np.float32) / data.max_value
  if normalize:
    mean, std = channel_stats(x_train)
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
  return (np.ascontiguousarray(x_train, dtype=np.float32), data.y_train,
          np.ascontiguousarray(x_test, dtype=np.float32), data.y_test)


def channel_stats(images: np.ndarray, chunk: int = 4096
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std over ``(N, H, W)``, in float64 (std > 0).

  Accumulated over chunks, so a uint8 CIFAR split is never converted whole.

  Args:
    images: ``(N, H, W, C)`` images of any real dtype.
    chunk: images per chunk.

  Returns:
    ``(mean, std)``, each float32 of shape ``(C,)``; a constant channel gets
    std 1.
  """
  total = np.zeros(images.shape[-1])
  squares = np.zeros(images.shape[-1])
  for start in range(0, len(images), chunk):
    block = images[start:start + chunk].astype(np.float64)
    total += block.sum(axis=(0, 1, 2))
    squares += np.square(block).sum(axis=(0, 1, 2))
  count = images.size // images.shape[-1]
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
  return (mean.astype(np.float32),
          np.where(std > 0, std, 1.0).astype(np.float32))


def validation_split(labels: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """A seeded, stratified train/validation split of a training split.

  Args:
    labels: the training labels.
    fraction: share held out for validation, in (0, 1).
    seed: split seed.

  Returns:
    ``(train_index, val_index)``: sorted, disjoint int64 index arrays that
    cover ``range(len(labels))``; each class is split in the same proportion
    (up to rounding).

  Raises:
    ValueError: if ``fraction`` is not in (0, 1).
  """
  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split
  # pylint: enable=g-import-not-at-top
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"The validation fraction must be in (0, 1), got "
                     f"{fraction}.")
  index = np.arange(len(labels))
  counts = np.bincount(labels)
  classes = int(np.count_nonzero(counts))
  n_val = int(np.ceil(fraction * len(labels)))
  # Stratified when every class can give both splits an example (always on
  # the real datasets; tiny subsets of CIFAR-100 cannot).
  can_stratify = (counts[counts > 0].min() >= 2 and classes <= n_val
                  and classes <= len(labels) - n_val)
  stratify = labels if can_stratify else None
  train, val = train_test_split(index, test_size=fraction, stratify=stratify,
                                random_state=seed)
  return np.sort(train), np.sort(val)


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
