"""Tests for branch_scaling, BranchedConv and merge_branches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sgs_optax


@pytest.mark.parametrize(
    "branches, expected",
    [  # Worked examples of SPEC 1.2, written out by hand.
        ([(3, 3), (1, 3), (3, 1)], [[1, 2, 1], [2, 3, 2], [1, 2, 1]]),
        ([(3, 3), (1, 1)], [[1, 1, 1], [1, 2, 1], [1, 1, 1]]),
        ([(3, 3), (3, 1), (1, 1)], [[1, 2, 1], [1, 3, 1], [1, 2, 1]]),
    ],
)
def test_branch_scaling_worked_examples(branches, expected):
  np.testing.assert_array_equal(
      sgs_optax.branch_scaling((3, 3), branches), np.array(expected, float))


def test_branch_scaling_sums_squared_scales_per_channel():
  alpha = np.array([0.5, 2.0])
  got = sgs_optax.branch_scaling((3, 5), [(3, 5), (1, 1)], [3.0, alpha])
  assert got.shape == (3, 5, 2)
  expected = np.full((3, 5, 2), 9.0)
  expected[1, 2] += alpha**2
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "branches, scales, match",
    [
        ([(5, 5)], None, "does not fit"),
        ([(2, 3)], None, "cannot be centred"),
        ([(0, 1)], None, "does not fit"),
        ([(3, 3), (1, 1)], [1.0], "2 branches"),
        ([(3, 3), (1, 1)], [np.ones(2), np.ones(3)], "same length"),
        ([(3, 3)], [np.ones((2, 2))], "scalar or a \\(C_out,\\)"),
    ],
)
def test_branch_scaling_errors(branches, scales, match):
  with pytest.raises(ValueError, match=match):
    sgs_optax.branch_scaling((3, 3), branches, scales)


@pytest.mark.parametrize(
    "strides, padding, size",
    [(1, "SAME", 7), (2, "SAME", 8), (2, "SAME", 7), (1, "VALID", 6),
     (1, ((2, 0), (1, 1)), 5)],
)
def test_branched_conv_equals_plain_conv_with_merged_kernel(
    strides, padding, size):
  branches = [(3, 3), (1, 3), (3, 1), (1, 1)]
  scales = [1.0, 0.5, np.linspace(1.0, 2.0, 4), 3.0]
  branched = sgs_optax.BranchedConv(4, (3, 3), branches, scales,
                                    strides=strides, padding=padding)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  params = branched.init(jax.random.key(1), x)["params"]
  assert sorted(params) == ["bias", "kernel_0", "kernel_1", "kernel_2",
                            "kernel_3"]
  params["bias"] = jnp.arange(4.0)
  merged = sgs_optax.merge_branches(params, (3, 3), branches, scales)
  plain = nn.Conv(4, (3, 3), strides=strides, padding=padding)
  want = plain.apply({"params": merged}, x)
  got = branched.apply({"params": params}, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merge_branches_pads_each_branch_into_the_centre():
  params = {"kernel_0": jnp.ones((3, 3, 1, 1)),
            "kernel_1": 2 * jnp.ones((1, 3, 1, 1))}
  merged = sgs_optax.merge_branches(params, (3, 3), [(3, 3), (1, 3)],
                                    [1.0, 0.5])
  np.testing.assert_array_equal(
      merged["kernel"][:, :, 0, 0], [[1, 1, 1], [2, 2, 2], [1, 1, 1]])
  assert "bias" not in merged
  with pytest.raises(ValueError, match="kernel_1"):
    sgs_optax.merge_branches(params, (3, 3), [(3, 3), (3, 1)])


def test_empty_branch_list_raises():
  with pytest.raises(ValueError, match="branches is empty"):
    sgs_optax.branch_scaling((3, 3), [])
