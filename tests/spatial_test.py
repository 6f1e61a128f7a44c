"""Tests for the SGS transform, its state and the reading of `scaling`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgs_optax

ACB3 = np.array([[1.0, 2, 1], [2, 3, 2], [1, 2, 1]])


def make_params(dtype=jnp.float32):
  key = jax.random.key(0)
  shapes = {
      "stem": {"kernel": (3, 3, 1, 4), "bias": (4,)},
      "wide": {"kernel": (5, 3, 4, 6)},
      "even": {"kernel": (2, 2, 6, 6)},
      "pointwise": {"kernel": (1, 1, 6, 8)},
      "row": {"kernel": (1, 3, 8, 8)},
      "norm": {"scale": (8,)},
      "dense": {"kernel": (8, 3), "bias": (3,)},
  }
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(
      x, tuple))
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def apply(tx, grads, params=None):
  state = tx.init(grads if params is None else params)
  return tx.update(grads, state, params)


def test_preset_scales_each_kernel_by_its_own_matrix():
  grads = make_params()
  out, state = apply(sgs_optax.sgs("acb"), grads)
  np.testing.assert_array_equal(
      out["stem"]["kernel"], grads["stem"]["kernel"] * ACB3[:, :, None, None])
  wide = np.zeros((5, 3))  # 5x3 + 1x3 + 5x1, built by hand.
  wide += 1
  wide[2, :] += 1
  wide[:, 1] += 1
  np.testing.assert_array_equal(
      out["wide"]["kernel"], grads["wide"]["kernel"] * wide[:, :, None, None])
  scalings = sgs_optax.get_scalings(state)
  np.testing.assert_array_equal(scalings["wide"]["kernel"], wide)
  assert scalings["even"]["kernel"] is None


def test_untouched_leaves_are_bit_identical():
  grads = make_params()
  for scaling in (None, "acb", "repvgg", jnp.full((3, 3), 2.0)):
    out, _ = apply(sgs_optax.sgs(scaling), grads)
    for name in ("even", "pointwise", "row", "norm", "dense"):
      for leaf_name, leaf in grads[name].items():
        got = out[name][leaf_name]
        assert got is leaf or (
            got.dtype == leaf.dtype and np.array_equal(
                np.asarray(got).view(np.uint8), np.asarray(leaf).view(np.uint8)
            )), (scaling, name)
    np.testing.assert_array_equal(out["stem"]["bias"], grads["stem"]["bias"])


def test_none_is_identity_until_refreshed():
  grads = make_params()
  out, state = apply(sgs_optax.sgs(), grads)
  chex_equal = jax.tree.map(np.array_equal, out, grads)
  assert all(jax.tree.leaves(chex_equal))
  assert sgs_optax.get_scalings(state)["stem"]["kernel"].shape == (3, 3)


def test_oihw_layout_scales_the_last_two_axes():
  grads = {"conv": jax.random.normal(jax.random.key(1), (4, 2, 3, 3))}
  out, _ = apply(sgs_optax.sgs("acb", kernel_layout="OIHW"), grads)
  np.testing.assert_array_equal(out["conv"], grads["conv"] * ACB3)


def test_per_channel_matrix():
  grads = {"conv": jax.random.normal(jax.random.key(1), (3, 3, 2, 4))}
  matrix = np.random.default_rng(0).uniform(0.5, 2.0, (3, 3, 4))
  out, _ = apply(sgs_optax.sgs(jnp.asarray(matrix)), grads)
  expected = np.asarray(grads["conv"]) * matrix[:, :, None, :]
  np.testing.assert_allclose(out["conv"], expected, rtol=1e-6)
  grads_oihw = {"conv": jnp.transpose(grads["conv"], (3, 2, 0, 1))}
  out, _ = apply(sgs_optax.sgs(jnp.asarray(matrix), kernel_layout="OIHW"),
                 grads_oihw)
  np.testing.assert_allclose(
      out["conv"], np.transpose(expected, (3, 2, 0, 1)), rtol=1e-6)


def test_single_array_applies_to_matching_size_only():
  grads = make_params()
  out, _ = apply(sgs_optax.sgs(jnp.asarray(ACB3)), grads)
  np.testing.assert_allclose(
      out["stem"]["kernel"], grads["stem"]["kernel"] * ACB3[:, :, None, None])
  np.testing.assert_array_equal(out["wide"]["kernel"], grads["wide"]["kernel"])
  with pytest.raises(ValueError, match="no \\(2, 2\\) matrix"):
    sgs_optax.sgs(jnp.asarray(ACB3), strict=True).init(grads)


def test_pytree_scaling_and_its_errors():
  grads = make_params()
  tree = jax.tree.map(lambda _: None, grads)
  tree["wide"]["kernel"] = jnp.full((5, 3), 3.0)
  out, _ = apply(sgs_optax.sgs(tree), grads)
  np.testing.assert_allclose(out["wide"]["kernel"], 3 * grads["wide"]["kernel"])
  np.testing.assert_array_equal(out["stem"]["kernel"], grads["stem"]["kernel"])

  bad = jax.tree.map(lambda _: None, grads)
  bad["wide"]["kernel"] = jnp.ones((3, 3))
  with pytest.raises(ValueError, match="wide/kernel"):
    sgs_optax.sgs(bad).init(grads)
  bad = jax.tree.map(lambda _: None, grads)
  bad["dense"]["bias"] = jnp.ones((3, 3))
  with pytest.raises(ValueError, match="dense/bias"):
    sgs_optax.sgs(bad).init(grads)
  with pytest.raises(ValueError, match="structure"):
    sgs_optax.sgs({"stem": {"kernel": jnp.ones((3, 3))}}).init(grads)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scaling": "dbb"}, "unknown scaling preset .dbb.. Pass one of"),
        ({"scaling": jnp.ones(3)}, "shape"),
        ({"scaling": jnp.array([[1.0, -1, 1]] * 3)}, "negative"),
        ({"scaling": jnp.array([[1.0, jnp.nan, 1]] * 3)}, "non-finite"),
        ({"kernel_layout": "HWXO"}, "Unknown kernel_layout"),
        ({"kernel_layout": "HWIIO"}, "Unknown kernel_layout"),
        ({"kernel_layout": "HWLIO"}, "Unknown kernel_layout"),
        ({"scaling": np.zeros((3, 3)), "normalize": True}, "mean 0"),
        ({"scaling": [[1, 2, 1], [2, 3, 2], [1, 2, 1]]}, "must be an array"),
        ({"scaling": {"stem": {"kernel": [[1.0] * 3] * 3, "bias": None},
                      "wide": {"kernel": None}, "even": {"kernel": None},
                      "pointwise": {"kernel": None}, "row": {"kernel": None},
                      "norm": {"scale": None},
                      "dense": {"kernel": None, "bias": None}}},
         "must be an array"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sgs_optax.sgs(**kwargs).init(make_params())


def test_channel_mismatch_and_no_matching_kernel_raise():
  grads = make_params()
  with pytest.raises(ValueError, match="stem/kernel"):
    sgs_optax.sgs(jnp.ones((3, 3, 5))).init(grads)
  with pytest.raises(ValueError, match="does not fit any"):
    sgs_optax.sgs(jnp.ones((7, 7))).init(grads)


def test_strict_rejects_even_kernels():
  grads = make_params()
  for scaling in (None, "acb"):
    with pytest.raises(ValueError, match="even/kernel.*even"):
      sgs_optax.sgs(scaling, strict=True).init(grads)
  del grads["even"]
  sgs_optax.sgs("acb", strict=True).init(grads)


def test_normalize_divides_by_mean():
  grads = make_params()
  _, state = apply(sgs_optax.sgs("acb", normalize=True), grads)
  np.testing.assert_allclose(
      sgs_optax.get_scalings(state)["stem"]["kernel"], ACB3 / (15 / 9),
      rtol=1e-6)
  per_channel = jnp.stack([jnp.asarray(ACB3), 2 * jnp.ones((3, 3))], -1)
  _, state = apply(sgs_optax.sgs(per_channel, normalize=True),
                   {"c": jnp.ones((3, 3, 1, 2))})
  s = sgs_optax.get_scalings(state)["c"]
  np.testing.assert_allclose(s[..., 0], ACB3 / (15 / 9), rtol=1e-6)
  np.testing.assert_allclose(s[..., 1], np.ones((3, 3)), rtol=1e-6)


def test_mask_only_restricts():
  grads = make_params()
  mask = jax.tree.map(lambda _: True, grads)
  mask["stem"] = False
  out, state = apply(sgs_optax.sgs("acb", mask=mask), grads)
  np.testing.assert_array_equal(out["stem"]["kernel"], grads["stem"]["kernel"])
  # A prefix mask hides the whole subtree from the inner transform.
  assert sgs_optax.get_scalings(state)["stem"] is None
  assert sgs_optax.get_scalings(state)["wide"]["kernel"] is not None
  # A True mask never adds a leaf that the layout does not select.
  out, _ = apply(sgs_optax.sgs("acb", mask=lambda p: jax.tree.map(
      lambda _: True, p)), grads)
  np.testing.assert_array_equal(out["dense"]["kernel"],
                                grads["dense"]["kernel"])


def test_layout_tree_and_callable_for_mixed_models():
  grads = {
      "conv": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)),
      "torch_conv": jax.random.normal(jax.random.key(1), (4, 2, 3, 3)),
      "transpose": jax.random.normal(jax.random.key(2), (3, 3, 4, 2)),
  }
  layouts = {"conv": "HWIO", "torch_conv": "OIHW", "transpose": "HWOI"}
  for spec in (layouts, lambda _: layouts):
    out, _ = apply(sgs_optax.sgs("acb", kernel_layout=spec), grads)
    np.testing.assert_array_equal(out["conv"],
                                  grads["conv"] * ACB3[:, :, None, None])
    np.testing.assert_array_equal(out["torch_conv"], grads["torch_conv"] * ACB3)
    np.testing.assert_array_equal(out["transpose"],
                                  grads["transpose"] * ACB3[:, :, None, None])
  for bad in ("WIO", "HWI"):
    with pytest.raises(ValueError, match="torch_conv"):
      sgs_optax.sgs("acb", kernel_layout={**layouts, "torch_conv": bad}).init(
          grads)


def nd_grads():
  keys = jax.random.split(jax.random.key(3), 6)
  shapes = {"c1": (7, 2, 4), "c1_torch": (4, 2, 5), "c3": (3, 3, 3, 2, 4),
            "c3_torch": (4, 2, 3, 5, 3), "frame": (1, 3, 3, 2, 4),
            "tap": (1, 2, 4)}
  grads = {k: jax.random.normal(key, shape)
           for key, (k, shape) in zip(keys, shapes.items())}
  layouts = {"c1": "WIO", "c1_torch": "OIW", "c3": "DHWIO",
             "c3_torch": "OIDHW", "frame": "DHWIO", "tap": "WIO"}
  return grads, layouts


def test_one_d_and_three_d_kernels_are_scaled_like_2d():
  grads, layouts = nd_grads()
  out, state = apply(sgs_optax.sgs("repvgg", kernel_layout=layouts), grads)
  # RepVGG (kernel + centre tap), written out per kernel.
  c1 = np.array([1.0, 1, 1, 2, 1, 1, 1])
  c3 = np.ones((3, 3, 3))
  c3[1, 1, 1] = 2
  c3_torch = np.ones((3, 5, 3))
  c3_torch[1, 2, 1] = 2
  np.testing.assert_array_equal(out["c1"], grads["c1"] * c1[:, None, None])
  np.testing.assert_array_equal(out["c1_torch"],
                                grads["c1_torch"] * np.array([1.0, 1, 2, 1, 1]))
  np.testing.assert_array_equal(out["c3"],
                                grads["c3"] * c3[..., None, None])
  np.testing.assert_array_equal(out["c3_torch"], grads["c3_torch"] * c3_torch)
  # A size-1 axis: never scaled, in any rank (as 1xK is not in 2-D).
  assert out["frame"] is grads["frame"] and out["tap"] is grads["tap"]
  scalings = sgs_optax.get_scalings(state)
  assert scalings["frame"] is None and scalings["tap"] is None
  np.testing.assert_array_equal(scalings["c1_torch"], [1, 1, 2, 1, 1])


def test_learned_mode_starts_nd_kernels_at_ones_and_skips_even_sizes():
  grads, layouts = nd_grads()
  grads["even"] = jnp.ones((4, 2, 2))
  layouts["even"] = "WIO"
  _, state = apply(sgs_optax.sgs(kernel_layout=layouts), grads)
  scalings = sgs_optax.get_scalings(state)
  assert scalings["c3_torch"].shape == (3, 5, 3)
  np.testing.assert_array_equal(scalings["c1"], np.ones(7))
  assert scalings["even"] is None
  with pytest.raises(ValueError, match="even.*even"):
    sgs_optax.sgs(kernel_layout=layouts, strict=True).init(grads)
  with pytest.raises(ValueError, match="scales none.*even"):
    sgs_optax.sgs(kernel_layout="WIO").init({"even": grads["even"]})


def test_acb_is_2d_only_and_never_silently_a_no_op():
  grads, layouts = nd_grads()
  with pytest.raises(ValueError, match="scales none.*c1.*2-D kernels only"):
    sgs_optax.sgs("acb", kernel_layout=layouts).init(grads)
  grads["c2"], layouts["c2"] = jnp.ones((3, 3, 2, 4)), "HWIO"
  out, _ = apply(sgs_optax.sgs("acb", kernel_layout=layouts), grads)
  np.testing.assert_array_equal(out["c2"], ACB3[:, :, None, None] *
                                np.ones((3, 3, 2, 4)))
  assert out["c1"] is grads["c1"]
  with pytest.raises(ValueError, match="strict.*c1.*2-D kernels only"):
    sgs_optax.sgs("acb", kernel_layout=layouts, strict=True).init(grads)


def test_stacked_nd_layouts_get_one_matrix_per_layer():
  grads = {"c1": jnp.ones((2, 5, 3, 4)), "c3": jnp.ones((2, 3, 3, 3, 3, 4))}
  layouts = {"c1": "LWIO", "c3": "LDHWIO"}
  out, state = apply(sgs_optax.sgs("repvgg", kernel_layout=layouts), grads)
  scalings = sgs_optax.get_scalings(state)
  assert scalings["c1"].shape == (2, 5) and scalings["c3"].shape == (2, 3, 3, 3)
  np.testing.assert_array_equal(out["c1"][1, :, 0, 0], [1, 1, 2, 1, 1])
  assert float(out["c3"][0, 1, 1, 1, 0, 0]) == 2.0
  assert float(out["c3"].sum()) == 2 * 3 * 4 * (27 + 1)


def test_single_array_is_read_by_each_kernels_rank():
  two_d = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
  one_d = jax.random.normal(jax.random.key(1), (3, 2, 4))
  one_d_3_out = jax.random.normal(jax.random.key(2), (3, 2, 3))
  matrix = jnp.asarray(ACB3)
  # A 3x3 2-D kernel reads (3, 3) as its matrix; the 3-tap 1-D kernel with 4
  # output channels cannot read it, and is left alone.
  grads = {"c2": two_d, "c1": one_d}
  layouts = {"c2": "HWIO", "c1": "WIO"}
  out, _ = apply(sgs_optax.sgs(matrix, kernel_layout=layouts), grads)
  np.testing.assert_allclose(out["c2"], two_d * ACB3[:, :, None, None])
  assert out["c1"] is one_d
  # Alone, a 3-tap 1-D kernel with 3 outputs reads it per output channel.
  out, _ = apply(sgs_optax.sgs(matrix, kernel_layout="WIO"),
                 {"c1": one_d_3_out})
  np.testing.assert_allclose(out["c1"], one_d_3_out * ACB3[:, None, :])
  # Both at once: ambiguous.
  grads = {"c2": two_d, "c1": one_d_3_out}
  with pytest.raises(ValueError, match="ambiguous.*c1.*c2"):
    sgs_optax.sgs(matrix, kernel_layout=layouts).init(grads)
  # Meant for the 1-D kernel (its size) but a wrong channel count.
  with pytest.raises(ValueError, match="does not fit c1"):
    sgs_optax.sgs(matrix, kernel_layout="WIO").init({"c1": one_d})
  # 3 layers of 3 taps, 3 outputs: one array is never per layer, so (3, 3)
  # is one matrix per output channel, for every layer ...
  stack = jax.random.normal(jax.random.key(3), (3, 3, 2, 3))
  out, _ = apply(sgs_optax.sgs(matrix, kernel_layout="LWIO"), {"s": stack})
  np.testing.assert_allclose(out["s"], stack * ACB3[None, :, None, :])
  # ... while in a pytree the same shape could be either.
  with pytest.raises(ValueError, match="for s: is ambiguous.*per stacked"):
    sgs_optax.sgs({"s": matrix}, kernel_layout="LWIO").init({"s": stack})


def test_one_array_is_the_matrix_or_one_per_output_channel():
  grads = {"a": jax.random.normal(jax.random.key(0), (3, 5, 2, 4)),
           "b": jax.random.normal(jax.random.key(1), (3, 5, 4, 4)),
           "other": jax.random.normal(jax.random.key(2), (3, 3, 2, 4))}
  rng = np.random.default_rng(0)
  # The kernel's size: every (3, 5) kernel, each channel the same matrix.
  matrix = rng.uniform(0.5, 2.0, (3, 5))
  out, _ = apply(sgs_optax.sgs(jnp.asarray(matrix)), grads)
  for name in ("a", "b"):
    want = np.asarray(grads[name]).copy()
    for i in range(3):
      for j in range(5):
        want[i, j] *= matrix[i, j]
    np.testing.assert_allclose(out[name], want, rtol=1e-6)
  assert out["other"] is grads["other"]
  # The size plus output channels: output channel o gets matrix[..., o].
  per_out = rng.uniform(0.5, 2.0, (3, 5, 4))
  out, _ = apply(sgs_optax.sgs(jnp.asarray(per_out)), grads)
  for name in ("a", "b"):
    want = np.asarray(grads[name]).copy()
    for o in range(4):
      want[..., o] *= per_out[..., o][:, :, None]
    np.testing.assert_allclose(out[name], want, rtol=1e-6)
  # A stacked kernel uses either for every layer.
  stack = jax.random.normal(jax.random.key(3), (2, 3, 5, 2, 4))
  out, _ = apply(sgs_optax.sgs(jnp.asarray(per_out), kernel_layout="LHWIO"),
                 {"s": stack})
  np.testing.assert_allclose(
      out["s"], np.asarray(stack) * per_out[None, :, :, None, :], rtol=1e-6)


def test_one_array_per_stacked_layer_raises_and_names_the_pytree():
  stack = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  per_layer = np.random.default_rng(0).uniform(0.5, 2.0, (2, 5))
  for scaling in (per_layer, np.ones((2, 5, 4))):
    with pytest.raises(ValueError, match=(
        "does not fit s .*2 stacked layers.*never read per stacked layer.*"
        "pytree")):
      sgs_optax.sgs(jnp.asarray(scaling), kernel_layout="LWIO").init(
          {"s": stack})
  # The pytree form the message asks for: layer l gets per_layer[l].
  out, _ = apply(sgs_optax.sgs({"s": jnp.asarray(per_layer)},
                               kernel_layout="LWIO"), {"s": stack})
  np.testing.assert_allclose(
      out["s"], np.asarray(stack) * per_layer[:, :, None, None], rtol=1e-6)


def test_one_array_that_means_two_things_raises_once_for_the_params():
  # (5, 4): a 5x4 2-D kernel's matrix, and one per output channel of a 5-tap
  # 1-D kernel with 4 outputs.
  grads = {"c1": jnp.ones((5, 2, 4)), "c2": jnp.ones((5, 4, 2, 8))}
  layouts = {"c1": "WIO", "c2": "HWIO"}
  with pytest.raises(ValueError, match=(
      "ambiguous: it fits c1 as a 1-D kernel's per-channel matrix; c2 as a "
      "2-D kernel's matrix. Pass a params-shaped pytree")):
    sgs_optax.sgs(jnp.ones((5, 4)), kernel_layout=layouts).init(grads)
  # Either alone reads it.
  for name, kernel in grads.items():
    sgs_optax.sgs(jnp.ones((5, 4)), kernel_layout=layouts[name]).init(
        {name: kernel})


def test_large_kernel_presets_are_their_published_branch_sets():
  grads = {"k7": jnp.ones((7, 7, 1, 2)), "k31": jnp.ones((31, 1, 2)),
           "k3": jnp.ones((3, 3, 1, 2))}
  layouts = {"k7": "HWIO", "k31": "WIO", "k3": "HWIO"}
  _, state = apply(sgs_optax.sgs("replknet", kernel_layout=layouts), grads)
  scalings = sgs_optax.get_scalings(state)
  k7 = np.ones((7, 7))
  k7[1:6, 1:6] += 1  # a centred 5x5
  np.testing.assert_array_equal(scalings["k7"], k7)
  np.testing.assert_array_equal(scalings["k31"], [1] * 13 + [2] * 5 + [1] * 13)
  assert scalings["k3"] is None  # no 5-tap branch fits a 3x3 kernel.
  _, state = apply(sgs_optax.sgs("unireplknet", kernel_layout=layouts), grads)
  scalings = sgs_optax.get_scalings(state)
  # K = 7: 5x5 (d 1) on rows/cols 1..5, 3x3 (d 2) on {1, 3, 5}, 3x3 (d 3)
  # on {0, 3, 6}.
  expected = np.array([
      [2, 1, 1, 2, 1, 1, 2],
      [1, 3, 2, 3, 2, 3, 1],
      [1, 2, 2, 2, 2, 2, 1],
      [2, 3, 2, 4, 2, 3, 2],
      [1, 2, 2, 2, 2, 2, 1],
      [1, 3, 2, 3, 2, 3, 1],
      [2, 1, 1, 2, 1, 1, 2]], float)
  np.testing.assert_array_equal(scalings["k7"], expected)
  assert scalings["k31"] is None and scalings["k3"] is None
  with pytest.raises(ValueError, match="k3 .*published"):
    sgs_optax.sgs("unireplknet", kernel_layout=layouts, strict=True).init(
        grads)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_are_preserved_and_state_is_at_least_float32(dtype):
  grads = make_params(dtype)
  out, state = jax.jit(lambda g: apply(sgs_optax.sgs("acb"), g))(grads)
  assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(
      lambda x: x.dtype, grads)
  assert sgs_optax.get_scalings(state)["stem"]["kernel"].dtype == jnp.float32


def test_float64_state_stays_float64():
  with jax.enable_x64(True):
    grads = {"c": jnp.ones((3, 3, 1, 1), jnp.float64) / 3}
    out, state = apply(sgs_optax.sgs("acb"), grads)
    assert sgs_optax.get_scalings(state)["c"].dtype == jnp.float64
    np.testing.assert_array_equal(out["c"][..., 0, 0], ACB3 / 3)


def test_jit_and_vmap():
  grads = make_params()
  tx = sgs_optax.sgs("repvgg")
  state = tx.init(grads)
  eager, _ = tx.update(grads, state)
  jitted, _ = jax.jit(tx.update)(grads, state)
  jax.tree.map(np.testing.assert_array_equal, eager, jitted)
  stacked = jax.tree.map(lambda g: jnp.stack([g, 2 * g]), grads)
  batched, _ = jax.vmap(tx.update, in_axes=(0, None))(stacked, state)
  jax.tree.map(lambda b, e: np.testing.assert_allclose(b[1], 2 * e, rtol=1e-6),
               batched, eager)


def test_get_scalings_errors_and_nesting():
  params = make_params()
  with pytest.raises(ValueError, match="found 0"):
    sgs_optax.get_scalings(optax.sgd(0.1).init(params))
  twice = optax.chain(sgs_optax.sgs(), sgs_optax.sgs("acb"))
  with pytest.raises(ValueError, match="found 2"):
    sgs_optax.get_scalings(twice.init(params))
  nested = optax.chain(
      optax.clip(1.0),
      optax.masked(sgs_optax.sgs("acb"), lambda p: jax.tree.map(
          lambda x: x.ndim == 4, p)),
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
  )
  state = nested.init(params)
  np.testing.assert_array_equal(
      sgs_optax.get_scalings(state)["stem"]["kernel"], ACB3)
  updates, _ = jax.jit(nested.update)(params, state, params)
  np.testing.assert_allclose(
      updates["stem"]["kernel"],
      -0.1 * ACB3[:, :, None, None] * optax.clip(1.0).update(
          params, None)[0]["stem"]["kernel"], rtol=1e-6)


def test_partition_with_sgs_in_one_group():
  params = make_params()
  labels = jax.tree.map(lambda x: "conv" if x.ndim == 4 else "rest", params)
  tx = optax.partition({"conv": sgs_optax.sgs("acb"),
                        "rest": optax.identity()}, labels)
  out, state = apply(tx, params)
  np.testing.assert_array_equal(
      out["stem"]["kernel"], params["stem"]["kernel"] * ACB3[:, :, None, None])
  np.testing.assert_array_equal(out["dense"]["kernel"],
                                params["dense"]["kernel"])
  assert sgs_optax.get_scalings(state)["stem"]["kernel"] is not None


def test_state_is_stable_under_lax_cond():
  params = make_params()
  tx = optax.chain(sgs_optax.sgs("acb"), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  _, new_state = tx.update(params, state, params)
  jax.lax.cond(True, lambda: state, lambda: new_state)


def test_before_adam_is_nearly_a_no_op_and_after_it_scales_the_direction():
  params = make_params()
  # Ten steps of different gradients: Adam's update is then far from the
  # sign(g) of its first step, so a scale that survived would show.
  grads = [jax.tree.map(lambda x, i=i: 0.1 * (x + i * jnp.sin(x * (i + 1))),
                        make_params()) for i in range(10)]

  def last_update(tx):
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, params)
    return updates["stem"]["kernel"]

  adam = optax.adam(1e-2)
  plain = last_update(adam)
  before = last_update(optax.chain(sgs_optax.sgs("acb"), adam))
  assert np.std(np.abs(plain)) > 0.2 * np.mean(np.abs(plain))  # not sign(g).
  # Adam divides the constant per-position scale out: the same update.
  np.testing.assert_allclose(before, plain, rtol=1e-4)
  # The exact AdamW placement: after the direction, before the decoupled
  # decay and the learning rate. It scales the direction, not the decay.
  lr, wd = 1e-2, 0.1
  direction = last_update(optax.scale_by_adam())
  after = last_update(optax.chain(
      optax.scale_by_adam(), sgs_optax.sgs("acb"),
      optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr)))
  want = -lr * (direction * ACB3[:, :, None, None]
                + wd * params["stem"]["kernel"])
  np.testing.assert_allclose(after, want, rtol=1e-6, atol=1e-9)
  # With SGD the same placement before the optimizer does matter.
  sgd = optax.sgd(1e-2, momentum=0.9)
  np.testing.assert_allclose(
      last_update(optax.chain(sgs_optax.sgs("acb"), sgd)),
      last_update(sgd) * ACB3[:, :, None, None], rtol=1e-5)


def test_update_accepts_and_ignores_extra_args():
  params = make_params()
  tx = sgs_optax.sgs("acb")
  state = tx.init(params)
  out, new_state = tx.update(params, state, params, some_extra_arg=1.0)
  np.testing.assert_array_equal(
      out["stem"]["kernel"], params["stem"]["kernel"] * ACB3[:, :, None, None])
  assert new_state is state


def test_strict_names_the_layout_for_unselected_kernel_like_leaves():
  grads = {"conv1d": jnp.ones((3, 2, 4)), "stacked": jnp.ones((2, 3, 3, 2, 4)),
           "conv": jnp.ones((3, 3, 2, 4)), "embed": jnp.ones((10, 4)),
           "count": jnp.ones((3, 3, 2), jnp.int32)}
  for name in ("conv1d", "stacked"):
    only = {name: grads[name], "conv": grads["conv"], "embed": grads["embed"],
            "count": grads["count"]}
    with pytest.raises(ValueError, match=f"{name}.*could be a conv kernel"):
      sgs_optax.sgs("acb", strict=True).init(only)
  # An explicit None in a layout tree is a decision, not an oversight.
  layouts = {"conv1d": None, "stacked": "LHWIO", "conv": "HWIO",
             "embed": None, "count": None}
  _, state = apply(sgs_optax.sgs("acb", strict=True, kernel_layout=layouts),
                   grads)
  assert sgs_optax.get_scalings(state)["stacked"].shape == (2, 3, 3)


@pytest.mark.parametrize("tx, params", [
    # optax.flatten leaves one vector: no kernel at all, strict or not.
    (optax.flatten(sgs_optax.sgs("acb", strict=True)), None),
    (sgs_optax.sgs("repvgg"), {"conv1d": jnp.ones((3, 2, 4))}),
    (sgs_optax.sgs(), {"scanned": jnp.ones((2, 3, 3, 2, 4))}),
    (sgs_optax.cdg(), {"conv1d": jnp.ones((3, 2, 4))}),
    (optax.flatten(sgs_optax.cdg()), None),
], ids=["flatten-sgs", "1d-preset", "stacked-learned", "1d-cdg",
        "flatten-cdg"])
def test_a_layout_that_selects_nothing_raises_instead_of_a_no_op(tx, params):
  params = make_params() if params is None else params
  with pytest.raises(ValueError, match="'HWIO' selects none.*'OIHW'"):
    tx.init(params)


def test_pointwise_only_model_raises_for_a_preset():
  params = {"pw": {"kernel": jnp.ones((1, 1, 2, 4))}}
  with pytest.raises(ValueError, match="scales none.*axis of size 1"):
    sgs_optax.sgs("acb").init(params)


def test_strict_accepts_equinox_biases_and_python_scalars():
  # Equinox keeps a conv bias as (C, 1, 1): no conv kernel, even under
  # strict; a Python float leaf is no kernel either.
  params = {"weight": jnp.ones((5, 3, 3, 3)), "bias": jnp.ones((5, 1, 1)),
            "temperature": 1.5}
  state = sgs_optax.sgs("acb", strict=True, kernel_layout="OIHW").init(params)
  assert list(state.scalings) == ["weight"]
  with pytest.raises(ValueError, match="'OIHW'"):
    # Read as HWIO, the 5x3 "kernel" has an even size: the message points to
    # the layout.
    sgs_optax.sgs("acb").init({"weight": jnp.ones((5, 4, 3, 3))})


@pytest.mark.parametrize("scaling", [2.0, np.float32(2.0), jnp.asarray(2.0)])
def test_a_scalar_scaling_raises(scaling):
  with pytest.raises(ValueError, match="scalar.*only rescales the learning"):
    sgs_optax.sgs(scaling)


def test_learned_even_kernel_raises_at_init_not_at_refresh():
  with pytest.raises(ValueError, match="Learned SGS: k has the even kernel"):
    sgs_optax.sgs(np.ones((4, 4)), learn=True).init(
        {"k": jnp.ones((4, 4, 2, 3))})


def test_clashing_path_names_raise():
  params = {"enc/conv": {"w": jnp.ones((3, 3, 2, 4))},
            "enc": {"conv": {"w": jnp.ones((3, 3, 2, 4))}}}
  with pytest.raises(ValueError, match="path name 'enc/conv/w'"):
    sgs_optax.sgs("acb").init(params)


def test_flax_serialization_round_trips_learned_matrices():
  serialization = pytest.importorskip("flax.serialization")
  params = {"stem": make_params()["stem"]}
  tx = optax.chain(sgs_optax.sgs(), optax.sgd(0.1, momentum=0.9))
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 6, 6, 1)))
  state = sgs_optax.refresh_scalings(tx.init(params), {
      "stem": {"kernel": sgs_optax.ConvInput(x, "SAME")}})
  blob = serialization.to_bytes(state)
  back = serialization.from_bytes(tx.init(params), blob)
  want = np.asarray(sgs_optax.get_scalings(state)["stem"]["kernel"])
  assert not np.allclose(want, 1.0)  # the refreshed matrix, not the start.
  np.testing.assert_array_equal(
      sgs_optax.get_scalings(back)["stem"]["kernel"], want)
  with pytest.raises(ValueError, match="same model"):
    serialization.from_bytes(tx.init({"other": params["stem"]}), blob)


@pytest.mark.parametrize("shape", [(3, 3, 0, 8), (3, 3, 4, 0), (0, 3, 4, 8)])
def test_zero_size_kernels_give_an_empty_result(shape):
  params = {"w": jnp.ones(shape), "v": jnp.ones((3, 3, 2, 2))}
  for tx in (sgs_optax.sgs("acb"), sgs_optax.sgs()):
    updates, _ = tx.update(params, tx.init(params))
    assert updates["w"].shape == shape and updates["w"].dtype == jnp.float32
