"""Tests for branch_scaling, BranchedConv and merge_branches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sgs_optax
from sgs_optax import _branches


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
        ([(0, 1)], None, "at least 1"),
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


def test_merge_branches_needs_exactly_one_kernel_per_branch():
  # ACB params: every branch a different constant, merged by hand below.
  params = {"kernel_0": np.full((3, 3, 1, 1), 1.0, np.float32),
            "kernel_1": np.full((1, 3, 1, 1), 10.0, np.float32),
            "kernel_2": np.full((3, 1, 1, 1), 100.0, np.float32)}
  by_hand = np.ones((3, 3))
  by_hand[1, :] += 10.0
  by_hand[:, 1] += 100.0
  acb = [(3, 3), (1, 3), (3, 1)]
  merged = sgs_optax.merge_branches(params, (3, 3), acb)
  np.testing.assert_array_equal(merged["kernel"][:, :, 0, 0], by_hand)
  # A branch left out would be dropped from the merged weights.
  with pytest.raises(ValueError, match=r"\['kernel_2'\] not covered"):
    sgs_optax.merge_branches(params, (3, 3), acb[:2])
  with pytest.raises(ValueError, match=r"\['kernel_3'\] missing"):
    sgs_optax.merge_branches(params, (3, 3), acb + [(1, 1)])
  with pytest.raises(ValueError, match=r"variables\['params'\]\[layer_name\]"):
    sgs_optax.merge_branches({"params": {"conv": params}}, (3, 3), acb)


def test_empty_branch_list_raises():
  with pytest.raises(ValueError, match="branches is empty"):
    sgs_optax.branch_scaling((3, 3), [])


# N-D and dilated branch sets. Masks are written out by hand.


def test_branch_scaling_one_d_with_a_dilated_branch():
  # 7 taps; 3 taps on 2..4; 3 taps with dilation 2 on 1, 3, 5.
  got = sgs_optax.branch_scaling((7,), [7, (3,), 3], dilations=[1, 1, 2])
  np.testing.assert_array_equal(got, [1, 2, 2, 3, 2, 2, 1])


def test_branch_scaling_three_d():
  # 3x3x3 + centre tap + the middle depth plane (1x3x3).
  got = sgs_optax.branch_scaling((3, 3, 3), [3, (1, 1, 1), (1, 3, 3)])
  expected = np.array([
      [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
      [[2, 2, 2], [2, 3, 2], [2, 2, 2]],
      [[1, 1, 1], [1, 1, 1], [1, 1, 1]]], float)
  np.testing.assert_array_equal(got, expected)


def test_branch_scaling_dilated_two_d_spec_example_with_scales():
  # SPEC 1.2: 7x7 + 3x3 (d 2) + 3x3 (d 3); here with scales 1, 2, 3.
  got = sgs_optax.branch_scaling((7, 7), [(7, 7), (3, 3), (3, 3)],
                                 scales=[1.0, 2.0, 3.0], dilations=[1, 2, 3])
  expected = np.array([
      [10, 1, 1, 10, 1, 1, 10],
      [1, 5, 1, 5, 1, 5, 1],
      [1, 1, 1, 1, 1, 1, 1],
      [10, 5, 1, 14, 1, 5, 10],
      [1, 1, 1, 1, 1, 1, 1],
      [1, 5, 1, 5, 1, 5, 1],
      [10, 1, 1, 10, 1, 1, 10]], float)
  np.testing.assert_array_equal(got, expected)


def test_branch_scaling_per_axis_dilation_and_per_channel_scale():
  alpha = np.array([1.0, 2.0])
  got = sgs_optax.branch_scaling((5, 3), [(5, 3), (3, 1)], [1.0, alpha],
                                 dilations=[1, (2, 1)])
  expected = np.ones((5, 3, 2))
  for row in (0, 2, 4):
    expected[row, 1] += alpha**2
  np.testing.assert_array_equal(got, expected)


def loop_power_scaling(kernel_size, branches, scales, dilations, power):
  """sum_k |alpha_k|**power over the taps of each branch, one at a time."""
  channels = max((np.size(a) for a in scales if np.ndim(a)), default=None)
  shape = tuple(kernel_size) + ((channels,) if channels else ())
  total = np.zeros(shape)
  for branch, dilation, alpha in zip(branches, dilations, scales):
    for tap in np.ndindex(*branch):
      position = tuple((k - ((b - 1) * d + 1)) // 2 + i * d for k, b, d, i in
                       zip(kernel_size, branch, dilation, tap))
      total[position] += np.abs(alpha) ** power
  return total


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize(
    "kernel_size, branches, scales, dilations",
    [
        ((3, 3), [(3, 3), (1, 3), (3, 1), (1, 1)],
         [1.0, 0.7, -1.3, np.array([0.5, -2.0, 1.5])], [(1, 1)] * 4),
        ((7,), [(7,), (3,), (3,)], [-0.5, 2.0, np.array([-3.0, 0.25])],
         [(1,), (1,), (2,)]),
        ((3, 3, 3), [(3, 3, 3), (1, 3, 3), (3, 1, 1)], [1.5, -0.5, -2.0],
         [(1, 1, 1)] * 3),
        ((7, 7), [(7, 7), (3, 3), (3, 3)], [1.0, -1.3, 0.4],
         [(1, 1), (2, 2), (3, 3)]),
    ],
)
def test_branch_scaling_power_sums_abs_scales_to_the_power(
    kernel_size, branches, scales, dilations, power):
  got = sgs_optax.branch_scaling(kernel_size, branches, scales, dilations,
                                 power=power)
  want = loop_power_scaling(kernel_size, branches, scales, dilations, power)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


def test_branch_scaling_power_one_is_linear_in_the_scales():
  # 3x3 + 1x1 with scales 2 and -3: the centre gets |2| + |-3| = 5 (power 1)
  # and 4 + 9 = 13 (power 2, the default); unit scales give the same matrix.
  linear = sgs_optax.branch_scaling((3, 3), [3, 1], [2.0, -3.0], power=1)
  squared = sgs_optax.branch_scaling((3, 3), [3, 1], [2.0, -3.0])
  np.testing.assert_array_equal(linear, [[2, 2, 2], [2, 5, 2], [2, 2, 2]])
  np.testing.assert_array_equal(squared, [[4, 4, 4], [4, 13, 4], [4, 4, 4]])
  acb = [(3, 3), (1, 3), (3, 1)]
  np.testing.assert_array_equal(
      sgs_optax.branch_scaling((3, 3), acb, power=1),
      sgs_optax.branch_scaling((3, 3), acb))


@pytest.mark.parametrize("power", [0, 3, 0.5, -1, True, "1", None])
def test_branch_scaling_rejects_other_powers(power):
  with pytest.raises(ValueError, match="power must be 2 .* or 1"):
    sgs_optax.branch_scaling((3, 3), [3, 1], power=power)


def loop_unireplknet_13():
  """UniRepLKNet's K = 13 block by loops: 13 + (5,7,3,3,3) x (1,2,3,4,5)."""
  s = np.ones((13, 13))
  for size, dilation in zip((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)):
    positions = [6 + (i - size // 2) * dilation for i in range(size)]
    for r in positions:
      for c in positions:
        s[r, c] += 1
  return s


def test_unireplknet_preset_matches_the_published_table():
  branches, dilations = sgs_optax.preset_branches("unireplknet", (13, 13))
  assert branches == [(13, 13), (5, 5), (7, 7), (3, 3), (3, 3), (3, 3)]
  assert dilations == [(1, 1), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
  got = sgs_optax.branch_scaling((13, 13), branches, dilations=dilations)
  np.testing.assert_array_equal(got, loop_unireplknet_13())
  assert got[6, 6] == 6 and got[0, 0] == 2 and got[0, 1] == 1
  for k in (5, 7, 9, 11, 15, 17):  # every published size fits centred.
    branches, dilations = sgs_optax.preset_branches("unireplknet", (k,))
    sgs_optax.branch_scaling((k,), branches, dilations=dilations)
  assert sgs_optax.preset_branches("replknet", (31, 31)) == (
      [(31, 31), (5, 5)], [(1, 1), (1, 1)])
  assert sgs_optax.preset_branches("repvgg", (3, 3, 3)) == (
      [(3, 3, 3), (1, 1, 1)], [(1, 1, 1), (1, 1, 1)])


@pytest.mark.parametrize(
    "kernel_size, branches, dilations, match",
    [
        ((7,), [(7, 7)], None, "1 ints"),
        ((3, 3), [(3,)], None, "2 ints"),
        ((7,), [7, 3], [1], "one dilation"),
        ((7,), [3], [4], "spans \\(9,\\).*does not fit"),
        ((7,), [2], None, "cannot be centred"),
        ((6,), [3], [2], "cannot be centred"),
        ((7,), [3], [0], "at least 1"),
        (7, [3], None, "one size per spatial axis"),
    ],
)
def test_nd_branch_errors(kernel_size, branches, dilations, match):
  with pytest.raises(ValueError, match=match):
    sgs_optax.branch_scaling(kernel_size, branches, dilations=dilations)


def test_preset_errors():
  with pytest.raises(ValueError, match="Unknown scaling preset"):
    sgs_optax.preset_branches("dbb", (3, 3))
  with pytest.raises(ValueError, match="2-D kernels only"):
    sgs_optax.preset_branches("acb", (3, 3, 3))
  with pytest.raises(ValueError, match="at least 5"):
    sgs_optax.preset_branches("replknet", (31, 3))
  with pytest.raises(ValueError, match="published"):
    sgs_optax.preset_branches("unireplknet", (31, 31))


# Odd kernel sizes of every rank: each preset is defined for some, not all.
PRESET_SIZES = [(3,), (5,), (7,), (3, 3), (5, 5), (5, 7), (13, 13), (31, 31),
                (3, 3, 3), (5, 5, 5), (19,)]


@pytest.mark.parametrize("name", sorted(_branches.PRESETS))
def test_every_registered_preset_is_read_alike_by_sgs_and_preset_branches(
    name):
  layouts = {1: "WIO", 2: "HWIO", 3: "DHWIO"}
  defined = 0
  for size in PRESET_SIZES:
    kernel = jnp.ones((*size, 1, 2))
    try:
      branches, dilations = sgs_optax.preset_branches(name, size)
    except ValueError as e:
      # Not defined for this size: sgs leaves it alone, for the same reason,
      # and strict=True raises it.
      reason = _branches.PRESETS[name].undefined(size)
      assert reason is not None and reason in str(e)
      tx = sgs_optax.sgs(name, kernel_layout=layouts[len(size)], strict=True)
      with pytest.raises(ValueError, match="strict.*not scaled"):
        tx.init({"k": kernel})
      continue
    defined += 1
    assert branches[0] == size  # the main branch first.
    state = sgs_optax.sgs(name, kernel_layout=layouts[len(size)]).init(
        {"k": kernel})
    np.testing.assert_array_equal(
        sgs_optax.get_scalings(state)["k"],
        sgs_optax.branch_scaling(size, branches, dilations=dilations))
  assert defined, f"{name} is defined for none of {PRESET_SIZES}"


def test_registry_entries_are_documented_wherever_presets_are_listed():
  for name, entry in _branches.PRESETS.items():
    assert entry.summary and entry.reference
    for documented in (sgs_optax.sgs, sgs_optax.preset_branches):
      assert f'``"{name}"``' in documented.__doc__, (name, documented)
  with pytest.raises(ValueError, match="unknown scaling preset 'dbb'.*"
                     + ".*".join(map(repr, _branches.PRESETS))):
    sgs_optax.sgs("dbb")


ND_CASES = {  # kernel, branches, dilations, strides, padding, groups, input.
    "1d_causal": ((7,), [7, 3, 3], [1, 1, 3], 2, "CAUSAL", 3, (2, 16, 3)),
    "1d_same": ((7,), [7, 5, 3], [1, 1, 2], 1, "SAME", 1, (2, 15, 3)),
    "2d_dilated": ((7, 7), [7, 3, 3], [1, 2, 3], 2, "SAME", 1, (2, 11, 10, 2)),
    "2d_circular": ((5, 5), [5, 3], [1, 2], 1, "CIRCULAR", 2, (2, 8, 8, 2)),
    "2d_explicit": ((5, 3), [(5, 3), (1, 3), (3, 1)], None, (2, 1),
                    ((2, 1), (0, 3)), 1, (2, 9, 8, 2)),
    "3d": ((3, 3, 3), [3, (1, 3, 3), (3, 1, 1), 1], None, 1, "SAME", 1,
           (2, 5, 6, 4, 2)),
}


@pytest.mark.parametrize("case", sorted(ND_CASES))
def test_nd_branched_conv_equals_plain_conv_with_merged_kernel(case):
  kernel, branches, dilations, strides, padding, groups, shape = ND_CASES[case]
  features = 2 * shape[-1] if groups > 1 else 4
  scales = [1.0] + [np.linspace(0.5, 1.5, features)] + [
      2.0 + i for i in range(len(branches) - 2)]
  branched = sgs_optax.BranchedConv(
      features, kernel, branches, scales, dilations=dilations,
      strides=strides, padding=padding, feature_group_count=groups)
  x = jax.random.normal(jax.random.key(0), shape)
  params = branched.init(jax.random.key(1), x)["params"]
  params["bias"] = jnp.arange(float(features))
  merged = sgs_optax.merge_branches(params, kernel, branches, scales,
                                    dilations)
  plain = nn.Conv(features, kernel, strides=strides, padding=padding,
                  feature_group_count=groups)
  want = plain.apply({"params": merged}, x)
  got = branched.apply({"params": params}, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merge_branches_places_dilated_taps_as_written_by_hand():
  params = {"kernel_0": jnp.zeros((7, 1, 1)),
            "kernel_1": jnp.array([1.0, 2.0, 3.0]).reshape(3, 1, 1)}
  merged = sgs_optax.merge_branches(params, (7,), [7, 3], [1.0, 10.0],
                                    dilations=[1, 3])
  np.testing.assert_array_equal(merged["kernel"][:, 0, 0],
                                [10, 0, 0, 20, 0, 0, 30])
  with pytest.raises(ValueError, match="kernel_1"):
    sgs_optax.merge_branches(params, (7,), [7, 5], dilations=[1, 1])


def test_branched_conv_rejects_inputs_of_another_rank():
  conv = sgs_optax.BranchedConv(2, (3,), [3, 1])
  with pytest.raises(ValueError, match="1-D kernel_size"):
    conv.init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
