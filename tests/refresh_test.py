"""Tests for refresh_scalings: plumbing of captured inputs into SGS states.

The estimator itself is checked against an independent implementation in
dependence_test.py; here the expected matrices come from calling it directly
on the right input with the right geometry.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgs_optax

from capture_test import ScanNet


class Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), name="stem")(x))
    x = nn.relu(nn.Conv(6, (3, 5), strides=2, name="wide")(x))
    x = nn.Conv(4, (1, 1), name="point")(x)
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def setup():
  model = Net()
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 8, 8, 3)))
  params = model.init(jax.random.key(1), x)["params"]
  captured = sgs_optax.capture_conv_inputs(model, {"params": params}, x)
  return model, params, x, captured


def expected_scaling(record, kernel_size, **kwargs):
  d = sgs_optax.spatial_dependence(
      record.inputs, kernel_size, padding=record.padding,
      dilation=record.dilation or 1, padding_mode=record.padding_mode,
      **kwargs)
  return np.asarray(d / jnp.mean(d))


def test_refresh_writes_each_layers_matrix():
  _, params, _, captured = setup()
  tx = optax.chain(sgs_optax.sgs(), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  new = sgs_optax.refresh_scalings(state, captured)
  scalings = sgs_optax.get_scalings(new)
  for name, size in (("stem", (3, 3)), ("wide", (3, 5))):
    got = np.asarray(scalings[name]["kernel"])
    want = expected_scaling(captured[name]["kernel"], size)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.shape == size and not np.allclose(got, 1.0)
    np.testing.assert_allclose(got.mean(), 1.0, rtol=1e-5)
  # The strided conv's asymmetric SAME pads were used, not symmetric ones.
  assert captured["wide"]["kernel"].padding == ((0, 1), (1, 2))
  assert scalings["point"]["kernel"] is None
  # Other parts of the state are untouched.
  jax.tree.map(np.testing.assert_array_equal, state[1], new[1])


def test_refresh_with_diagonal_removal_and_k():
  _, params, _, captured = setup()
  state = sgs_optax.sgs().init(params)
  new = sgs_optax.refresh_scalings(state, captured, k=3.0,
                                   diagonal_removal=True)
  want = expected_scaling(captured["stem"]["kernel"], (3, 3), k=3.0,
                          diagonal_removal=True)
  np.testing.assert_allclose(sgs_optax.get_scalings(new)["stem"]["kernel"],
                             want, rtol=1e-6)


def test_nan_keeps_previous_matrix():
  _, params, _x, captured = setup()
  state = sgs_optax.sgs("acb", learn=True).init(params)
  constant = sgs_optax.ConvInput(
      jnp.ones_like(captured["stem"]["kernel"].inputs),
      captured["stem"]["kernel"].padding, kernel_size=(3, 3),
      padding_mode="circular")  # No zero padding: every channel constant.
  new = sgs_optax.refresh_scalings(
      state, {**captured, "stem": {"kernel": constant}})
  scalings = sgs_optax.get_scalings(new)
  np.testing.assert_array_equal(scalings["stem"]["kernel"],
                                sgs_optax.branch_scaling((3, 3), [(3, 3), (
                                    1, 3), (3, 1)]))
  want = expected_scaling(captured["wide"]["kernel"], (3, 5))
  np.testing.assert_allclose(scalings["wide"]["kernel"], want, rtol=1e-6)


def test_learned_kernel_without_captured_input_raises():
  _, params, _, captured = setup()
  state = sgs_optax.sgs().init(params)
  with pytest.raises(ValueError, match="wide/kernel"):
    sgs_optax.refresh_scalings(state, {"stem": captured["stem"]})


def test_constant_states_are_never_refreshed():
  _, params, _, captured = setup()
  tx = optax.chain(sgs_optax.cdg(), optax.scale_by_adam(),
                   sgs_optax.sgs("acb"), optax.add_decayed_weights(1e-2),
                   optax.scale_by_learning_rate(1e-3))
  with pytest.raises(ValueError, match="no learned SGS state"):
    sgs_optax.refresh_scalings(tx.init(params), captured)


def test_per_channel_state_gets_the_layer_matrix_broadcast():
  _, params, _, captured = setup()
  tree = jax.tree.map(lambda _: None, params)
  tree["stem"]["kernel"] = jnp.ones((3, 3, 6))
  state = sgs_optax.sgs(tree, learn=True).init(params)
  new = sgs_optax.refresh_scalings(state, captured)
  got = sgs_optax.get_scalings(new)["stem"]["kernel"]
  assert got.shape == (3, 3, 6)
  want = expected_scaling(captured["stem"]["kernel"], (3, 3))
  for c in range(6):
    np.testing.assert_allclose(got[..., c], want, rtol=1e-6)


def test_only_learned_states_in_nested_wrappers_are_refreshed():
  _, params, _, captured = setup()
  conv_mask = lambda p: jax.tree.map(lambda x: x.ndim == 4, p)
  labels = jax.tree.map(lambda x: "conv" if x.ndim == 4 else "rest", params)
  tx = optax.chain(
      optax.masked(sgs_optax.sgs(), conv_mask),
      optax.partition({"conv": sgs_optax.sgs("acb"),
                       "rest": optax.identity()}, labels),
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
  )
  state = tx.init(params)
  new = sgs_optax.refresh_scalings(state, captured)
  want = expected_scaling(captured["stem"]["kernel"], (3, 3))
  learned = new[0].inner_state.scalings
  constant = new[1].inner_states["conv"].inner_state.scalings
  np.testing.assert_allclose(learned["stem/kernel"], want, rtol=1e-6)
  np.testing.assert_array_equal(constant["stem/kernel"],
                                state[1].inner_states["conv"].inner_state
                                .scalings["stem/kernel"])
  assert not np.allclose(learned["stem/kernel"], constant["stem/kernel"])


def test_refresh_jits_and_does_not_recompile_the_train_step():
  model, params, x, captured = setup()
  tx = optax.chain(sgs_optax.sgs(), optax.sgd(0.1))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  refresh = jax.jit(sgs_optax.refresh_scalings)
  params, state = step(params, state)
  before = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  state = refresh(state, captured)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == before
  np.testing.assert_allclose(
      sgs_optax.get_scalings(state)["stem"]["kernel"],
      expected_scaling(captured["stem"]["kernel"], (3, 3)), rtol=1e-6)
  params, state = step(params, state)
  assert step._cache_size() == 1


def test_mismatched_trees_raise_naming_the_layer():
  _, params, _, captured = setup()
  state = sgs_optax.sgs().init(params)
  with pytest.raises(ValueError, match="extra/kernel"):
    sgs_optax.refresh_scalings(state, {**captured, "extra": captured["stem"]})
  bad = {**captured, "stem": {"kernel": sgs_optax.ConvInput(
      captured["stem"]["kernel"].inputs, ((1, 1), (2, 2)),
      kernel_size=(5, 5))}}
  with pytest.raises(ValueError, match="stem"):
    sgs_optax.refresh_scalings(state, bad)
  with pytest.raises(ValueError, match="no SpatialScalingState"):
    sgs_optax.refresh_scalings(optax.sgd(0.1).init(params), captured)


def test_raw_arrays_and_nchw_inputs_raise():
  _, params, x, captured = setup()
  state = sgs_optax.sgs().init(params)
  with pytest.raises(ValueError, match="not a ConvInput"):
    sgs_optax.refresh_scalings(state, {"stem": {"kernel": x}})
  nchw = jnp.transpose(captured["stem"]["kernel"].inputs, (0, 3, 1, 2))
  bad = {**captured, "stem": {"kernel": sgs_optax.ConvInput(
      nchw, ((1, 1), (1, 1)))}}
  with pytest.raises(ValueError, match="channels last"):
    sgs_optax.refresh_scalings(state, bad)


def test_calls_at_two_resolutions_are_weighted_by_their_pixels():
  _, params, _x, captured = setup()
  record = captured["stem"]["kernel"]
  small = sgs_optax.ConvInput(record.inputs[:, ::2, ::2], ((1, 1), (1, 1)))
  state = sgs_optax.sgs().init(params)
  new = sgs_optax.refresh_scalings(
      state, {**captured, "stem": {"kernel": (record, small)}})
  d_big = np.asarray(sgs_optax.spatial_dependence(record.inputs, (3, 3),
                                                  padding=record.padding))
  d_small = np.asarray(sgs_optax.spatial_dependence(small.inputs, (3, 3),
                                                    padding=small.padding))
  big_pixels, small_pixels = 4 * 8 * 8, 4 * 4 * 4
  d = (big_pixels * d_big + small_pixels * d_small) / (big_pixels +
                                                       small_pixels)
  np.testing.assert_allclose(sgs_optax.get_scalings(new)["stem"]["kernel"],
                             d / d.mean(), rtol=1e-5)
  assert not np.allclose(d_big / d_big.mean(), d / d.mean(), rtol=1e-3)


def test_padding_string_is_resolved_with_the_records_strides():
  _, params, _, captured = setup()
  inputs = captured["wide"]["kernel"].inputs[..., :6]  # (4, 8, 8, 6)
  record = sgs_optax.ConvInput(inputs, "SAME", strides=(2, 2))
  state = sgs_optax.sgs().init(params)
  new = sgs_optax.refresh_scalings(
      state, {**captured, "wide": {"kernel": record}})
  # SAME with stride 2 on 8 pixels pads (0, 1) and (1, 2): lax's rule, not
  # stride 1's (1, 1) and (2, 2).
  pads = jax.lax.padtype_to_pads((8, 8), (3, 5), (2, 2), "SAME")
  assert tuple(map(tuple, pads)) == ((0, 1), (1, 2))
  want = expected_scaling(sgs_optax.ConvInput(inputs, pads), (3, 5))
  got = np.asarray(sgs_optax.get_scalings(new)["wide"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  stride_one = expected_scaling(sgs_optax.ConvInput(inputs, "SAME"), (3, 5))
  assert not np.allclose(got, stride_one, rtol=1e-3)


def test_an_entry_undefined_in_one_call_comes_from_the_others():
  _, params, _, captured = setup()
  record = captured["stem"]["kernel"]
  # Constant maps, no padding: every off-centre entry of this call is
  # undefined (NaN).
  flat = sgs_optax.ConvInput(jnp.ones_like(record.inputs), "VALID")
  d_flat = sgs_optax.spatial_dependence(flat.inputs, padding="VALID")
  assert np.isnan(d_flat).sum() == 8
  state = sgs_optax.sgs().init(params)
  new = sgs_optax.refresh_scalings(
      state, {**captured, "stem": {"kernel": (record, flat)}})
  np.testing.assert_allclose(sgs_optax.get_scalings(new)["stem"]["kernel"],
                             expected_scaling(record, (3, 3)), rtol=1e-5)


def test_stacked_layers_get_one_matrix_each():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)))
  params = ScanNet().init(jax.random.key(1), x)["params"]
  layout = lambda p: jax.tree.map(
      lambda a: {4: "HWIO", 5: "LHWIO"}.get(a.ndim), p)
  tx = optax.chain(sgs_optax.sgs(kernel_layout=layout), optax.sgd(0.1))
  captured = sgs_optax.capture_conv_inputs(ScanNet(), {"params": params}, x)
  state = sgs_optax.refresh_scalings(tx.init(params), captured)
  got = np.asarray(sgs_optax.get_scalings(state)["layers"]["conv"]["kernel"])
  record = captured["layers"]["conv"]["kernel"]
  assert got.shape == (3, 3, 3)
  for layer in range(3):
    want = expected_scaling(dataclasses.replace(
        record, inputs=record.inputs[layer]), (3, 3))
    np.testing.assert_allclose(got[layer], want, rtol=1e-5)
  assert not np.allclose(got[0], got[2])
  # Each stacked layer's gradient is scaled by its own matrix.
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(
      updates["layers"]["conv"]["kernel"][:, :, :, 0, 0], -0.1 * got,
      rtol=1e-6)


def test_nnx_optimizer_state_is_refreshed_in_place():
  from flax import nnx

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)

    def __call__(self, x):
      return self.conv(x)

  model = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.chain(sgs_optax.sgs(), optax.sgd(0.1)),
                      wrt=nnx.Param)
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)))

  @nnx.jit
  def refresh(model, opt, x):
    sgs_optax.refresh_scalings(opt.opt_state,
                               sgs_optax.capture_conv_inputs(model, x))

  refresh(model, opt, x)
  got = sgs_optax.get_scalings(nnx.as_pure(opt.opt_state))["conv"]["kernel"]
  want = expected_scaling(sgs_optax.ConvInput(x, ((1, 1), (1, 1))), (3, 3))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)
  opt.update(model, grads)  # the refreshed state still updates the model.


def test_transposed_conv_is_learned_from_its_dilated_input():
  class Up(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.ConvTranspose(2, (3, 3), strides=(2, 2), name="up")(x)

  x = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 6, 6, 3)))
  params = Up().init(jax.random.key(0), x)["params"]
  state = sgs_optax.sgs(strict=True).init(params)
  captured = sgs_optax.capture_conv_inputs(Up(), {"params": params}, x)
  new = sgs_optax.refresh_scalings(state, captured)
  dilated = jnp.zeros((2, 11, 11, 3)).at[:, ::2, ::2].set(x)
  record = captured["up"]["kernel"]
  want = expected_scaling(sgs_optax.ConvInput(dilated, record.padding),
                          (3, 3))
  np.testing.assert_allclose(sgs_optax.get_scalings(new)["up"]["kernel"],
                             want, rtol=1e-5)


def direct_scaling(inputs, kernel_size, pads):
  """The estimator run directly, normalised to mean 1 by hand."""
  d = np.asarray(sgs_optax.spatial_dependence(inputs, kernel_size,
                                              padding=pads), np.float64)
  return d / d.mean()


def test_one_d_and_three_d_kernels_are_learned_from_hand_built_inputs():
  keys = jax.random.split(jax.random.key(7), 3)
  x1 = jax.nn.relu(jax.random.normal(keys[0], (3, 40, 3)))
  x31 = jax.nn.relu(jax.random.normal(keys[1], (2, 48, 2)))
  x3 = jax.nn.relu(jax.random.normal(keys[2], (2, 6, 7, 5, 2)))
  params = {"c1": jnp.ones((9, 3, 5)), "c31": jnp.ones((31, 2, 2)),
            "c3": jnp.ones((3, 3, 3, 2, 4)), "bias": jnp.ones(4)}
  layouts = {"c1": "WIO", "c31": "WIO", "c3": "DHWIO", "bias": None}
  state = optax.chain(sgs_optax.sgs(kernel_layout=layouts),
                      optax.sgd(0.1)).init(params)
  inputs = {"c1": (x1, (9,), ((4, 4),)), "c31": (x31, (31,), ((15, 15),)),
            "c3": (x3, (3, 3, 3), ((1, 1), (0, 2), (1, 1)))}
  captured = {name: sgs_optax.ConvInput(x, pads, kernel_size=size)
              for name, (x, size, pads) in inputs.items()}
  captured["bias"] = None
  new = jax.jit(sgs_optax.refresh_scalings)(state, captured)
  scalings = sgs_optax.get_scalings(new)
  for name, (x, size, pads) in inputs.items():
    got = np.asarray(scalings[name])
    assert got.shape == size and not np.allclose(got, 1.0)
    np.testing.assert_allclose(got, direct_scaling(x, size, pads), rtol=1e-5)
    assert got[tuple(s // 2 for s in size)] == got.max()


def test_stacked_one_d_layers_get_one_mean_one_matrix_each():
  x = jax.nn.relu(jax.random.normal(jax.random.key(8), (2, 3, 30, 2)))
  # The second layer sees a smoothed input: a different dependence.
  x = x.at[1].set(jnp.cumsum(x[1], axis=1) / 10)
  params = {"stack": jnp.ones((2, 5, 2, 3))}
  state = sgs_optax.sgs(kernel_layout="LWIO").init(params)
  captured = {"stack": sgs_optax.ConvInput(x, ((2, 2),), kernel_size=(5,))}
  got = np.asarray(sgs_optax.get_scalings(
      sgs_optax.refresh_scalings(state, captured))["stack"])
  assert got.shape == (2, 5)
  for layer in range(2):
    np.testing.assert_allclose(
        got[layer], direct_scaling(x[layer], (5,), ((2, 2),)), rtol=1e-5)
  assert not np.allclose(got[0], got[1], rtol=1e-2)


class BoxedNet(nn.Module):
  """Kernels boxed by nn.with_partitioning, Flax's sharding recipe."""

  @nn.compact
  def __call__(self, x):
    init = nn.with_partitioning(nn.initializers.lecun_normal(),
                                (None, None, None, "model"))
    x = nn.relu(nn.Conv(4, (3, 3), kernel_init=init, name="c1")(x))
    return nn.Conv(4, (3, 3), kernel_init=init, name="c2")(x)


@pytest.mark.parametrize("boxed", [True, False])
def test_boxed_params_are_learned_when_captured_in_the_optimizers_form(
    boxed):
  x = jax.nn.relu(jax.random.normal(jax.random.key(3), (4, 8, 8, 3)))
  variables = BoxedNet().init(jax.random.key(0), x)
  assert isinstance(variables["params"]["c1"]["kernel"], nn.Partitioned)
  plain = nn.unbox(variables)
  # The optimizer and the capture see the params in the same form.
  seen = variables if boxed else plain
  state = optax.chain(sgs_optax.sgs(), optax.sgd(0.1)).init(seen["params"])
  captured = sgs_optax.capture_conv_inputs(BoxedNet(), seen, x)
  got = nn.unbox(sgs_optax.get_scalings(
      sgs_optax.refresh_scalings(state, captured)))
  c1 = plain["params"]["c1"]
  hidden = jax.nn.relu(jax.lax.conv_general_dilated(
      x, c1["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + c1["bias"])
  pads = ((1, 1), (1, 1))
  np.testing.assert_allclose(got["c1"]["kernel"],
                             direct_scaling(x, (3, 3), pads), rtol=1e-5)
  np.testing.assert_allclose(got["c2"]["kernel"],
                             direct_scaling(hidden, (3, 3), pads), rtol=1e-5)
  # Captured in the other form, the keys differ by the box: a clear error.
  other = plain if boxed else variables
  with pytest.raises(ValueError, match=r"nn\.unbox\(variables\)"):
    sgs_optax.refresh_scalings(
        state, sgs_optax.capture_conv_inputs(BoxedNet(), other, x))


def test_weight_norm_kernel_is_not_captured_and_the_error_says_why():
  class Normed(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.WeightNorm(nn.Conv(4, (3, 3), name="c"))(x)

  x = jnp.ones((2, 8, 8, 3))
  variables = Normed().init(jax.random.key(0), x)
  state = sgs_optax.sgs().init(variables["params"])
  captured = sgs_optax.capture_conv_inputs(Normed(), variables, x)
  assert captured["c"]["kernel"] is None
  with pytest.raises(ValueError, match=r"\['c/kernel'\].*several params "
                     r"\(e\.g\. nn\.WeightNorm"):
    sgs_optax.refresh_scalings(state, captured)


def test_case2_scan_model_on_a_rank_4_layout_string_raises_at_refresh():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)))
  variables = ScanNet().init(jax.random.key(1), x)
  params = variables["params"]
  captured = sgs_optax.capture_conv_inputs(ScanNet(), variables, x)
  # The default "HWIO" selects the stem only; the stacked kernels would be
  # skipped silently.
  state = sgs_optax.sgs().init(params)
  assert list(sgs_optax.get_scalings(state)["layers"]["conv"].values()) == [
      None, None]
  with pytest.raises(ValueError, match=(
      r"\['layers/conv/kernel'\].*rank \[5\].*'HWIO'.*'LHWIO'.*"
      r"conv_layouts.*mask")):
    sgs_optax.refresh_scalings(state, captured)
  # Said explicitly, leaving the stack unscaled is fine.
  for tx in (sgs_optax.sgs(mask={"stem": True, "layers": False}),
             sgs_optax.sgs(kernel_layout={"stem": {"kernel": "HWIO",
                                                   "bias": None},
                                          "layers": {"conv": {
                                              "kernel": None,
                                              "bias": None}}})):
    sgs_optax.refresh_scalings(tx.init(params), captured)
  # The layouts read from the model learn every layer.
  tx = sgs_optax.sgs(kernel_layout=sgs_optax.conv_layouts(
      ScanNet(), variables, x))
  new = sgs_optax.get_scalings(sgs_optax.refresh_scalings(tx.init(params),
                                                          captured))
  assert new["layers"]["conv"]["kernel"].shape == (3, 3, 3)
  assert not np.allclose(new["layers"]["conv"]["kernel"], 1.0)


def whio_net(params, x):
  """A conv whose kernel is stored (kw, kh, I, O) and transposed."""
  return jax.lax.conv_general_dilated(
      x, jnp.transpose(params["w"], (1, 0, 2, 3)), (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kh, kw", [(3, 5), (3, 3)])
def test_case3_matrix_is_stored_in_the_parameters_axis_order(kh, kw):
  # Inputs correlated along W far more than along H: the measured (kh, kw)
  # matrix is not symmetric, so storing it unmoved would be caught.
  noise = jax.random.normal(jax.random.key(0), (4, 12, 12 + 4, 2))
  x = jax.nn.relu(sum(noise[:, :, i:i + 12] for i in range(5)))
  params = {"w": jnp.ones((kw, kh, 2, 3))}
  layouts = sgs_optax.conv_layouts(whio_net, params, x)
  assert layouts == {"w": "WHIO"}
  captured = sgs_optax.capture_conv_inputs(whio_net, params, x)
  assert captured["w"].kernel_size == (kh, kw)  # as the conv reads it.
  tx = sgs_optax.sgs(kernel_layout=layouts)
  state = sgs_optax.refresh_scalings(tx.init(params), captured)
  got = np.asarray(sgs_optax.get_scalings(state)["w"])
  measured = expected_scaling(captured["w"], (kh, kw))  # rows: H.
  assert not np.allclose(measured, measured.T if kh == kw else 0.0,
                         atol=1e-3)
  assert got.shape == (kw, kh)
  for h in range(kh):
    for w in range(kw):
      np.testing.assert_allclose(got[w, h], measured[h, w], rtol=1e-6)
  # The update puts the large factors on the parameter's W axis.
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state)
  np.testing.assert_allclose(updates["w"][:, :, 0, 0], got, rtol=1e-6)


def test_case3_axis_order_mismatch_is_named():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
  params = {"w": jnp.ones((5, 3, 2, 3))}  # stored (kw, kh, I, O)
  captured = sgs_optax.capture_conv_inputs(whio_net, params, x)
  state = sgs_optax.sgs().init(params)  # "HWIO": reads (kh, kw) = (5, 3).
  with pytest.raises(ValueError, match=(
      r"size \(3, 5\) \(axes H, W.*'HWIO'.*\(5, 3\).*another order.*"
      r"'WHIO'.*conv_layouts")):
    sgs_optax.refresh_scalings(state, captured)


def test_case7_zero_size_inputs():
  # No input channels: the kernel has no entries and keeps its matrix.
  params = {"w": jnp.ones((3, 3, 0, 8)), "v": jnp.ones((3, 3, 2, 8))}
  state = sgs_optax.sgs("acb", learn=True).init(params)
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 6, 6, 2)))
  record = lambda inputs: sgs_optax.ConvInput(inputs, ((1, 1), (1, 1)),
                                              kernel_size=(3, 3))
  new = sgs_optax.refresh_scalings(
      state, {"w": record(jnp.zeros((2, 6, 6, 0))), "v": record(x)})
  before, after = sgs_optax.get_scalings(state), sgs_optax.get_scalings(new)
  np.testing.assert_array_equal(after["w"], before["w"])
  np.testing.assert_allclose(after["v"], expected_scaling(record(x), (3, 3)),
                             rtol=1e-6)
  # Inputs without pixels: a clear error, not a ZeroDivisionError.
  for empty in (jnp.zeros((0, 6, 6, 2)), jnp.zeros((2, 0, 0, 2))):
    with pytest.raises(ValueError, match="'v'.*hold no pixels"):
      sgs_optax.refresh_scalings(state, {"w": record(jnp.zeros((2, 6, 6, 0))),
                                         "v": record(empty)})


def test_both_counting_paths_give_the_same_matrices():
  _, params, _, captured = setup()
  state = sgs_optax.sgs().init(params)
  refresh = jax.jit(sgs_optax.refresh_scalings,
                    static_argnames=("diagonal_removal", "counting"))
  for removal in (False, True):
    got = {counting: sgs_optax.get_scalings(refresh(
        state, captured, diagonal_removal=removal, counting=counting))
           for counting in ("scatter", "matmul")}
    for name, size in (("stem", (3, 3)), ("wide", (3, 5))):
      matmul = np.asarray(got["matmul"][name]["kernel"])
      np.testing.assert_array_equal(matmul, got["scatter"][name]["kernel"])
      want = expected_scaling(captured[name]["kernel"], size,
                              diagonal_removal=removal)
      np.testing.assert_allclose(matmul, want, rtol=1e-6)
  with pytest.raises(ValueError, match="one of 'scatter', 'matmul' or None"):
    sgs_optax.refresh_scalings(state, captured, counting="histogram")


def test_refresh_on_a_given_device_equals_the_refresh_in_place():
  _, params, _, captured = setup()
  tx = optax.chain(sgs_optax.sgs(), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  here = sgs_optax.refresh_scalings(state, captured)
  host = jax.devices("cpu")[-1]
  there = sgs_optax.refresh_scalings(state, captured, device=host)
  for name in ("stem", "wide"):
    got = sgs_optax.get_scalings(there)[name]["kernel"]
    want = sgs_optax.get_scalings(here)[name]["kernel"]
    assert not np.allclose(got, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.sharding == state[0].scalings[f"{name}/kernel"].sharding
  # Only the learned matrices were replaced: the momentum is the same arrays.
  assert all(a is b for a, b in zip(jax.tree.leaves(there[1]),
                                    jax.tree.leaves(state[1])))
  # Moving arrays between devices needs an eager call.
  with pytest.raises(ValueError, match="outside jax.jit"):
    jax.jit(lambda s, c: sgs_optax.refresh_scalings(s, c, device=host))(
        state, captured)
