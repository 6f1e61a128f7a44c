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
