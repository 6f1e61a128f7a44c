"""Every example learns in its tiny mode, and as much as its baseline.

The tiny modes train on 512 of the 1437 training digits for 3 epochs and test
on all 360 test digits: every run ends well above chance (0.1), and the
transforms, which do not change what these CNNs can learn on the digits, end
within seed noise of their baseline.
"""

import jax
import numpy as np

from examples import adam_training
from examples import equinox_training
from examples import nnx_training
from examples import quickstart
from examples.resnet import main as resnet_main
import sgs_optax


def assert_learned_beside(baseline, accuracy, *, floor=0.7, spread=0.1):
  """Both runs well above chance, and within seed noise of each other."""
  assert baseline > floor and accuracy > floor, (baseline, accuracy)
  assert abs(accuracy - baseline) < spread, (baseline, accuracy)


def assert_learned_matrix(matrix):
  """Refreshed from all ones, divided by its mean, peaked at the centre."""
  matrix = np.asarray(matrix)
  assert matrix.shape == (3, 3) and not np.allclose(matrix, 1.0)
  np.testing.assert_allclose(matrix.mean(), 1.0, rtol=1e-5)
  assert matrix[1, 1] == matrix.max()  # the centre is pinned at 1 before /mean.


def test_quickstart_tiny_learns_with_and_without_sgs():
  results = quickstart.main(["--tiny"])
  assert set(results) == {"sgd", "sgs(acb)+sgd"}
  assert_learned_beside(results["sgd"], results["sgs(acb)+sgd"])


def test_adam_example_tiny_sgs_before_adam_is_nearly_a_no_op():
  results = adam_training.main(["--tiny"])
  assert_learned_beside(results["adamw"], results["cdg+adamw+sgs(acb)"])
  # Adam divides the constant scale out again: the run ends where adamw's
  # does (3 of the 360 test images at most).
  assert_learned_beside(results["adamw"], results["sgs(acb)+adamw"],
                        spread=0.01)


def test_nnx_example_tiny_learns_and_refreshes_the_matrices():
  results = nnx_training.main(["--tiny"])
  (baseline, _), (accuracy, optimizer) = results.values()
  assert_learned_beside(baseline, accuracy)
  scalings = sgs_optax.get_scalings(optimizer.opt_state)
  assert_learned_matrix(scalings["conv1"]["kernel"])
  assert_learned_matrix(scalings["conv2"]["kernel"])


def test_resnet_example_tiny_learns_and_prints_both_runs(capsys):
  results = resnet_main.main(["--tiny"])
  baseline = results["baseline"]
  assert baseline["refresh_count"] == 0
  assert results["refresh_count"] == 3  # one per epoch, from epoch 0.
  assert_learned_beside(baseline["accuracy"], results["accuracy"],
                        floor=0.5, spread=0.15)
  scalings = sgs_optax.get_scalings(results["state"].opt_state)
  matrices = jax.tree.leaves(scalings)  # the None leaves are dropped.
  assert len(matrices) == 7  # the stem and two convs in each of 3 blocks.
  for matrix in matrices:
    assert_learned_matrix(matrix)
  printed = capsys.readouterr().out
  for label, run in (("sgd", baseline), ("sgd + learned sgs", results)):
    assert f"{label:<20} test accuracy {run['accuracy']:.3f}" in printed


def test_equinox_example_tiny_learns_and_refreshes_oihw_matrices():
  results = equinox_training.main(["--tiny"])
  (baseline, _), (accuracy, opt_state) = results.values()
  assert_learned_beside(baseline, accuracy, floor=0.5, spread=0.15)
  assert_learned_matrix(sgs_optax.get_scalings(opt_state).conv1.weight)


def assert_learned_nd_matrix(matrix, size):
  """As assert_learned_matrix, for a kernel of any spatial size."""
  matrix = np.asarray(matrix)
  assert matrix.shape == size and not np.allclose(matrix, 1.0)
  np.testing.assert_allclose(matrix.mean(), 1.0, rtol=1e-5)
  assert matrix[tuple(s // 2 for s in size)] == matrix.max()


def test_sequence_example_tiny_learns_and_refreshes_one_d_matrices():
  from examples import sequence_training  # pylint: disable=g-import-not-at-top

  results = sequence_training.main(["--tiny"])
  (baseline, _), (accuracy, opt_state) = results.values()
  # Four motifs (chance 0.25); 4 epochs on 1536 sequences.
  assert_learned_beside(baseline, accuracy, floor=0.45, spread=0.15)
  scalings = sgs_optax.get_scalings(opt_state)
  for layer in ("Conv_0", "Conv_1", "Conv_2"):
    assert_learned_nd_matrix(scalings[layer]["kernel"], (9,))


def test_volume_example_tiny_learns_and_refreshes_three_d_matrices():
  from examples import volume_training  # pylint: disable=g-import-not-at-top

  results = volume_training.main(["--tiny"])
  (baseline, _), (accuracy, opt_state) = results.values()
  # Four shapes (chance 0.25); 4 epochs on 576 volumes.
  assert_learned_beside(baseline, accuracy, floor=0.35, spread=0.2)
  scalings = sgs_optax.get_scalings(opt_state)
  for layer in ("Conv_0", "Conv_1"):
    assert_learned_nd_matrix(scalings[layer]["kernel"], (3, 3, 3))
