"""Tests of benchmarks/_data.py: digits offline, tfds through mock_data.

No test here can download anything: every tfds read passes download=False,
and a fixture makes any attempt to download or prepare a dataset fail loudly.
"""

import numpy as np
import pytest

from benchmarks import _data


def _check_arrays(arrays, image_shape, n_classes):
  x_train, y_train, x_test, y_test = arrays
  for x, y in ((x_train, y_train), (x_test, y_test)):
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.ndim == 4 and x.shape[1:] == image_shape
    assert y.shape == (len(x),)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert 0 <= y.min() and y.max() < n_classes


def test_digits_shapes_dtypes_ranges():
  arrays = _data.load_dataset("digits")
  _check_arrays(arrays, (8, 8, 1), 10)
  x_train, _, x_test, _ = arrays
  assert len(x_train) + len(x_test) == 1797
  assert len(x_test) == 360
  assert x_train.max() == 1.0  # scaled by 16, the digits' maximum.
  assert _data.num_classes("digits") == 10


def test_digits_split_is_stratified():
  _, y_train, _, y_test = _data.load_dataset("digits", seed=3)
  train_counts = np.bincount(y_train, minlength=10)
  test_counts = np.bincount(y_test, minlength=10)
  total = train_counts + test_counts
  # Every class is split 80/20 up to rounding.
  np.testing.assert_array_less(np.abs(test_counts - 0.2 * total), 1.0 + 1e-9)


def test_digits_split_is_deterministic_and_seeded():
  a = _data.load_dataset("digits", seed=0)
  b = _data.load_dataset("digits", seed=0)
  c = _data.load_dataset("digits", seed=1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[1], c[1])
  # Same examples overall, only split differently.
  np.testing.assert_allclose(
      np.sort(np.concatenate([a[0], a[2]]).sum((1, 2, 3))),
      np.sort(np.concatenate([c[0], c[2]]).sum((1, 2, 3))), rtol=1e-5)


def test_normalize_uses_training_statistics():
  raw = _data.load_dataset("digits")
  x_train, _, x_test, _ = _data.load_dataset("digits", normalize=True)
  np.testing.assert_allclose(x_train.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(x_train.std(), 1.0, atol=1e-4)
  mean, std = raw[0].mean(), raw[0].std()
  np.testing.assert_allclose(x_test, (raw[2] - mean) / std, atol=1e-5)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="Unknown dataset"):
    _data.load_dataset("imagenet")


@pytest.mark.parametrize(
    "name, image_shape, n_classes",
    [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)],
)
def test_tfds_data_source_with_mock_data(tfds, name, image_shape, n_classes):
  with tfds.testing.mock_data(num_examples=8):
    arrays = _data.load_dataset(name)
  _check_arrays(arrays, image_shape, n_classes)
  assert len(arrays[0]) == 8 and len(arrays[2]) == 8
  assert arrays[0].max() > 0.0  # mock images are random, not blank.


def test_tfds_missing_data_says_how_to_prepare(tfds, tmp_path):
  with pytest.raises(_data.MissingDataError) as info:
    _data.load_dataset("cifar10", data_dir=tmp_path)
  message = str(info.value)
  assert f"not prepared in {tmp_path}" in message
  assert "tfds build cifar10 --file_format=array_record" in message
  assert 'file_format="array_record"' in message
  assert "TensorFlow" in message
  assert isinstance(info.value, FileNotFoundError)
  assert list(tmp_path.iterdir()) == []  # nothing was written, or fetched.


def test_load_raw_keeps_stored_pixels():
  data = _data.load_raw("digits")
  assert data.x_train.dtype == np.uint8 and data.max_value == 16
  assert data.x_train.max() == 16
  floats = _data.load_dataset("digits")
  np.testing.assert_array_equal(floats[0], data.x_train / np.float32(16))


def test_channel_stats_match_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (37, 5, 4, 3), dtype=np.uint8)
  images[..., 2] = 7  # a constant channel gets std 1, not 0.
  mean, std = _data.channel_stats(images, chunk=10)
  as_float = images.astype(np.float64)
  np.testing.assert_allclose(mean, as_float.mean((0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std[:2], as_float.std((0, 1, 2))[:2], rtol=1e-5)
  assert std[2] == 1.0


def test_validation_split_is_disjoint_stratified_and_seeded():
  _, y_train, _, _ = _data.load_dataset("digits")
  train, val = _data.validation_split(y_train, 0.2, seed=0)
  assert len(np.intersect1d(train, val)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([train, val])),
                                np.arange(len(y_train)))
  assert len(val) == int(np.ceil(0.2 * len(y_train)))
  per_class = np.bincount(y_train, minlength=10)
  val_counts = np.bincount(y_train[val], minlength=10)
  np.testing.assert_array_less(np.abs(val_counts - 0.2 * per_class), 1.0)
  again = _data.validation_split(y_train, 0.2, seed=0)
  np.testing.assert_array_equal(val, again[1])
  other = _data.validation_split(y_train, 0.2, seed=1)
  assert not np.array_equal(val, other[1])
  with pytest.raises(ValueError, match="validation fraction"):
    _data.validation_split(y_train, 1.0, seed=0)


def test_validation_split_of_a_tiny_many_class_subset():
  # 30 examples of 20 classes cannot be stratified: a plain random split.
  labels = np.arange(30) % 20
  train, val = _data.validation_split(labels, 0.1, seed=0)
  assert len(val) == 3 and len(train) == 27


def test_epoch_batches_are_seeded_permutations():
  batches = list(_data.epoch_batches(10, 4, seed=0, epoch=0))
  assert [len(b) for b in batches] == [4, 4]  # the remainder is dropped.
  assert len(np.unique(np.concatenate(batches))) == 8
  again = list(_data.epoch_batches(10, 4, seed=0, epoch=0))
  np.testing.assert_array_equal(np.stack(batches), np.stack(again))
  other_epoch = list(_data.epoch_batches(10, 4, seed=0, epoch=1))
  other_seed = list(_data.epoch_batches(10, 4, seed=1, epoch=0))
  assert not np.array_equal(np.stack(batches), np.stack(other_epoch))
  assert not np.array_equal(np.stack(batches), np.stack(other_seed))
  # A batch larger than the data gives one full batch.
  (only,) = list(_data.epoch_batches(5, 64, seed=0, epoch=0))
  np.testing.assert_array_equal(np.sort(only), np.arange(5))
