"""Every example runs in its tiny mode."""

import numpy as np

import sgs_optax

from examples import adam_training
from examples import nnx_training
from examples import quickstart


def test_quickstart_tiny():
  results = quickstart.main(["--tiny"])
  assert set(results) == {"sgd", "sgd+sgs(acb)"}
  assert all(0.0 <= acc <= 1.0 for acc in results.values())


def test_nnx_example_tiny_refreshes_the_matrices():
  accuracy, scalings = nnx_training.main(["--tiny"])
  assert 0.0 <= accuracy <= 1.0
  matrix = np.asarray(scalings["conv1"]["kernel"])
  assert matrix.shape == (3, 3) and not np.allclose(matrix, 1.0)
  np.testing.assert_allclose(matrix.mean(), 1.0, rtol=1e-5)


def test_adam_example_tiny():
  results = adam_training.main(["--tiny"])
  assert all(0.0 <= acc <= 1.0 for acc in results.values())


def test_linen_resnet_example_tiny_prints_learned_matrices(capsys):
  from examples import train_linen  # pylint: disable=g-import-not-at-top

  results = train_linen.main(["--tiny"])
  assert results["refresh_count"] >= 1
  printed = capsys.readouterr().out
  assert "SGS matrix of" in printed and "test accuracy" in printed


def test_equinox_example_tiny_learns_and_refreshes_oihw_matrices():
  from examples import equinox_training  # pylint: disable=g-import-not-at-top

  results = equinox_training.main(["--tiny"])
  baseline, _ = results["sgd"]
  accuracy, opt_state = results["cdg+sgs"]
  # 512 images, 3 epochs: both well above chance (0.1) and close together.
  assert baseline > 0.5 and accuracy > 0.5
  assert abs(accuracy - baseline) < 0.15
  matrix = np.asarray(sgs_optax.get_scalings(opt_state).conv1.weight)
  assert matrix.shape == (3, 3) and not np.allclose(matrix, 1.0)
  assert matrix[1, 1] == matrix.max()  # the centre is pinned at 1 before /mean.


def learned_matrix(opt_state, layer):
  return np.asarray(sgs_optax.get_scalings(opt_state)[layer]["kernel"])


def test_sequence_example_tiny_learns_and_refreshes_one_d_matrices():
  from examples import sequence_training  # pylint: disable=g-import-not-at-top

  results = sequence_training.main(["--tiny"])
  baseline, _ = results["sgd"]
  accuracy, opt_state = results["sgd+sgs (learned)"]
  # Four classes (chance 0.25); 4 epochs on 1536 sequences.
  assert baseline > 0.45 and accuracy > 0.45
  assert abs(accuracy - baseline) < 0.15
  matrix = learned_matrix(opt_state, "Conv_1")
  assert matrix.shape == (9,) and not np.allclose(matrix, 1.0)
  assert matrix[4] == matrix.max()
  np.testing.assert_allclose(matrix.mean(), 1.0, rtol=1e-5)


def test_volume_example_tiny_learns_and_refreshes_three_d_matrices():
  from examples import volume_training  # pylint: disable=g-import-not-at-top

  results = volume_training.main(["--tiny"])
  baseline, _ = results["sgd"]
  accuracy, opt_state = results["sgd+sgs (learned)"]
  # Four classes (chance 0.25); 4 epochs on 576 volumes.
  assert baseline > 0.35 and accuracy > 0.35
  assert abs(accuracy - baseline) < 0.2
  matrix = learned_matrix(opt_state, "Conv_0")
  assert matrix.shape == (3, 3, 3) and not np.allclose(matrix, 1.0)
  assert matrix[1, 1, 1] == matrix.max()
  np.testing.assert_allclose(matrix.mean(), 1.0, rtol=1e-5)
