"""Tests for capture_conv_inputs: one mechanism, every front door.

Expected inputs are computed by hand: the model's own intermediate values
recomputed with plain lax/jnp calls, transposed and padded as the conv reads
them.
"""

import equinox as eqx
from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgs_optax


def is_record(x):
  return isinstance(x, sgs_optax.ConvInput)


def same_keys(captured, params):
  """Whether `captured` has the structure of `params`, None as a leaf."""
  return (jax.tree.structure(captured, is_leaf=lambda x: x is None or
                             is_record(x)) == jax.tree.structure(params))


def test_plain_function_nchw_oihw_is_recorded_channels_last():
  def net(params, x):
    y = jax.lax.conv_general_dilated(
        x, params["w1"], (1, 1), "SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    y = jax.nn.relu(y)
    return jax.lax.conv_general_dilated(
        y, params["w2"], (2, 2), ((0, 1), (2, 0)), rhs_dilation=(1, 2),
        feature_group_count=2, dimension_numbers=("NCHW", "OIHW", "NCHW"))

  key = jax.random.key(0)
  params = {"w1": jax.random.normal(key, (4, 3, 3, 3)),
            "w2": jax.random.normal(key, (6, 2, 3, 5)), "b": jnp.zeros(4)}
  x = jax.random.normal(key, (2, 3, 8, 8))
  captured = sgs_optax.capture_conv_inputs(net, params, x)
  first, second = captured["w1"], captured["w2"]
  assert captured["b"] is None
  np.testing.assert_array_equal(first.inputs, np.transpose(x, (0, 2, 3, 1)))
  assert first.padding == ((1, 1), (1, 1)) and first.kernel_size == (3, 3)
  hidden = jax.nn.relu(jax.lax.conv_general_dilated(
      x, params["w1"], (1, 1), "SAME",
      dimension_numbers=("NCHW", "OIHW", "NCHW")))
  np.testing.assert_allclose(second.inputs,
                             np.transpose(hidden, (0, 2, 3, 1)), rtol=1e-6)
  assert second.padding == ((0, 1), (2, 0))
  assert second.dilation == (1, 2) and second.strides == (2, 2)
  assert second.kernel_size == (3, 5) and second.feature_group_count == 2


def test_kernels_derived_from_one_param_are_followed_several_are_not():
  def standardized(w):
    return (w - w.mean()) / (w.std() + 1e-5)

  def net(params, x):
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = conv(x, jnp.transpose(standardized(params["ws"]), (1, 0, 2, 3))
             .astype(jnp.bfloat16).astype(jnp.float32))
    y = jax.checkpoint(conv)(y, params["remat"])
    return conv(y, params["a"] + params["b"])  # merged on the fly.

  key = jax.random.key(1)
  params = {name: jax.random.normal(key, (3, 3, 2, 2))
            for name in ("ws", "remat", "a", "b")}
  x = jax.random.normal(key, (1, 5, 5, 2))
  captured = jax.jit(lambda p, x: sgs_optax.capture_conv_inputs(
      net, p, x))(params, x)
  assert is_record(captured["ws"]) and is_record(captured["remat"])
  assert captured["a"] is None and captured["b"] is None


def test_custom_vjp_and_inner_jit_are_followed():
  @jax.custom_vjp
  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO",
                                                           "NHWC"))

  conv.defvjp(lambda x, w: (conv(x, w), (x, w)), lambda res, g: (None, None))
  net = jax.jit(lambda p, x: conv(x, p["w"]))
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
  captured = sgs_optax.capture_conv_inputs(net, {"w": jnp.ones((3, 3, 3, 1))},
                                           x)
  np.testing.assert_array_equal(captured["w"].inputs, x)
  assert captured["w"].padding == ((0, 0), (0, 0))


class Block(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    shared = nn.Conv(4, (3, 3), padding="CIRCULAR", name="shared")
    x = shared(nn.relu(shared(x)))
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Conv(2, (3, 3), strides=2, name="down")(x)


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
    x = Block(name="block")(x, train)
    return nn.Conv(3, (1, 1), name="head")(x)


def linen_setup():
  model = LinenNet()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  return model, variables, x


def test_linen_is_keyed_like_params_with_each_conv_geometry():
  model, variables, x = linen_setup()
  captured = sgs_optax.capture_conv_inputs(model, variables, x, train=False)
  assert same_keys(captured, variables["params"])
  np.testing.assert_array_equal(captured["stem"]["kernel"].inputs, x)
  assert captured["stem"]["bias"] is None
  # CIRCULAR pads before the conv: the input is recorded wrapped, VALID.
  stem = variables["params"]["stem"]
  hidden = nn.relu(nn.Conv(4, (3, 3)).apply({"params": stem}, x))
  shared = captured["block"]["shared"]["kernel"]
  assert shared.inputs.shape == (4, 10, 10, 4)  # two calls, pooled.
  np.testing.assert_allclose(
      shared.inputs[:2], jnp.pad(hidden, ((0, 0), (1, 1), (1, 1), (0, 0)),
                                 mode="wrap"), rtol=1e-6)
  assert shared.padding == ((0, 0), (0, 0))
  # lax SAME with stride 2 on an even map pads (0, 1).
  assert captured["block"]["down"]["kernel"].padding == ((0, 1), (0, 1))


def test_linen_train_mode_discards_mutations_and_jits():
  model, variables, x = linen_setup()
  before = jax.tree.map(np.asarray, variables)
  eager = sgs_optax.capture_conv_inputs(model, variables, x, train=True)
  jitted = jax.jit(lambda v, x: sgs_optax.capture_conv_inputs(
      model, v, x, train=True))(variables, x)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, variables))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               eager, jitted)
  with pytest.raises(ValueError, match="train=False"):
    sgs_optax.capture_conv_inputs(model, variables, x, mutable=["x"])
  with pytest.raises(TypeError, match="Equinox"):
    sgs_optax.capture_conv_inputs(object())


def test_one_conv_at_two_resolutions_gives_one_record_per_geometry():
  class Twice(nn.Module):

    @nn.compact
    def __call__(self, x):
      conv = nn.Conv(3, (3, 3), name="conv")
      return conv(x).mean() + conv(x[:, ::2, ::2]).mean()

  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  variables = Twice().init(jax.random.key(0), x)
  captured = sgs_optax.capture_conv_inputs(Twice(), variables, x)
  records = captured["conv"]["kernel"]
  assert isinstance(records, tuple) and len(records) == 2
  np.testing.assert_array_equal(records[0].inputs, x)
  np.testing.assert_array_equal(records[1].inputs, x[:, ::2, ::2])


def test_transposed_conv_input_is_recorded_with_inserted_zeros():
  class Up(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.ConvTranspose(2, (3, 3), strides=(2, 2), name="up")(x)

  x = jax.random.normal(jax.random.key(4), (1, 4, 4, 3))
  variables = Up().init(jax.random.key(0), x)
  record = sgs_optax.capture_conv_inputs(Up(), variables, x)["up"]["kernel"]
  dilated = np.zeros((1, 7, 7, 3), np.float32)
  dilated[:, ::2, ::2] = x
  np.testing.assert_array_equal(record.inputs, dilated)
  assert record.kernel_size == (3, 3)


class ScanLayer(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Conv(4, (3, 3), name="conv")(x)), None


class ScanNet(nn.Module):
  """A stem, then three conv layers under nn.scan (kernels (3, 3, 3, 4, 4))."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    layers = nn.scan(ScanLayer, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=3)
    return layers(name="layers")(x, None)[0]


def test_nn_scan_gives_per_layer_inputs():
  x = jax.random.normal(jax.random.key(5), (2, 6, 6, 3))
  variables = ScanNet().init(jax.random.key(0), x)
  captured = sgs_optax.capture_conv_inputs(ScanNet(), variables, x)
  record = captured["layers"]["conv"]["kernel"]
  assert record.inputs.shape == (3, 2, 6, 6, 4)
  kernels = variables["params"]["layers"]["conv"]
  h = nn.Conv(4, (3, 3)).apply({"params": variables["params"]["stem"]}, x)
  for layer in range(3):
    np.testing.assert_allclose(record.inputs[layer], h, rtol=1e-5, atol=1e-6)
    layer_params = jax.tree.map(lambda a, i=layer: a[i], kernels)
    h = nn.relu(nn.Conv(4, (3, 3)).apply({"params": layer_params}, h))


def test_scan_reusing_one_kernel_pools_iterations_into_the_batch():
  def net(params, x):
    def step(h, _):
      y = jax.lax.conv_general_dilated(h, params["w"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO",
                                                          "NHWC"))
      return jnp.tanh(y), None
    return jax.lax.scan(step, x, None, length=2)[0]

  x = jax.random.normal(jax.random.key(6), (3, 5, 5, 2))
  params = {"w": 0.3 * jnp.ones((3, 3, 2, 2))}
  record = sgs_optax.capture_conv_inputs(net, params, x)["w"]
  assert record.inputs.shape == (6, 5, 5, 2)
  np.testing.assert_allclose(record.inputs[:3], x, rtol=1e-6)


class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.layers = nnx.List([
        nnx.Conv(4, 4, (3, 3), strides=2, rngs=rngs),
        nnx.Conv(4, 4, (1, 1), rngs=rngs),
    ])

  def __call__(self, x):
    x = self.drop(self.norm(self.stem(x)))
    for layer in self.layers:
      x = layer(x)
    return x


def test_nnx_is_keyed_like_the_optimizer_params_and_leaves_the_model():
  model = NnxNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  captured = sgs_optax.capture_conv_inputs(model, x)
  assert model.norm.use_running_average is False  # still in train mode.
  jax.tree.map(np.testing.assert_array_equal, stats_before,
               jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  assert same_keys(captured, params)
  assert captured["layers"][0]["kernel"].padding == ((0, 1), (0, 1))
  model.eval()
  expected = model.norm(model.stem(x))  # eval: running stats, no dropout.
  np.testing.assert_allclose(captured["layers"][0]["kernel"].inputs, expected,
                             rtol=1e-5, atol=1e-6)


class EqxNet(eqx.Module):
  first: eqx.nn.Conv2d
  second: eqx.nn.Conv2d

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.first = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1)
    self.second = eqx.nn.Conv2d(4, 4, 3, stride=2, padding="SAME", key=k2)

  def __call__(self, x):
    return self.second(jax.nn.relu(self.first(x)))


def test_equinox_module_and_vmapped_function():
  model = EqxNet(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (5, 3, 8, 8))
  batched = sgs_optax.capture_conv_inputs(lambda m, x: jax.vmap(m)(x),
                                          model, x)
  np.testing.assert_array_equal(batched.first.weight.inputs,
                                np.transpose(x, (0, 2, 3, 1)))
  hidden = jax.vmap(lambda v: jax.nn.relu(model.first(v)))(x)
  np.testing.assert_allclose(batched.second.weight.inputs,
                             np.transpose(hidden, (0, 2, 3, 1)), rtol=1e-5,
                             atol=1e-6)
  assert batched.second.weight.padding == ((0, 1), (0, 1))
  assert batched.first.bias is None
  single = sgs_optax.capture_conv_inputs(model, x[0])
  np.testing.assert_allclose(single.second.weight.inputs,
                             batched.second.weight.inputs[:1], rtol=1e-5,
                             atol=1e-6)
  assert same_keys(batched, eqx.filter(model, eqx.is_array))


class NDNet(nn.Module):
  """A 1-D and a 3-D branch of Flax convs, SAME padded, one strided."""

  @nn.compact
  def __call__(self, seq, vol):
    s = nn.relu(nn.Conv(4, (9,), name="c1a")(seq))
    s = nn.Conv(4, (5,), strides=2, name="c1b")(s)
    v = nn.relu(nn.Conv(3, (3, 3, 3), name="c3a")(vol))
    v = nn.Conv(2, (3, 1, 5), strides=2, name="c3b")(v)
    return s.mean(axis=1).sum(-1) + v.mean(axis=(1, 2, 3)).sum(-1)


def test_one_d_and_three_d_flax_convs_are_captured():
  seq = jax.random.normal(jax.random.key(0), (2, 16, 3))
  vol = jax.random.normal(jax.random.key(1), (2, 6, 5, 4, 2))
  model = NDNet()
  params = model.init(jax.random.key(2), seq, vol)["params"]
  captured = sgs_optax.capture_conv_inputs(model, {"params": params}, seq,
                                           vol)
  assert same_keys(captured, params)
  # First layers read the data; second layers the first layers' outputs,
  # recomputed here with lax.
  def conv(x, p, letters, pads):
    return jax.lax.conv_general_dilated(
        x, p["kernel"], (1,) * len(letters), pads,
        dimension_numbers=(f"N{letters}C", f"{letters}IO",
                           f"N{letters}C")) + p["bias"]

  hidden_seq = jax.nn.relu(conv(seq, params["c1a"], "W", [(4, 4)]))
  hidden_vol = jax.nn.relu(conv(vol, params["c3a"], "DHW", [(1, 1)] * 3))
  expected = {"c1a": (seq, ((4, 4),), (9,)),
              "c1b": (hidden_seq, ((1, 2),), (5,)),
              "c3a": (vol, ((1, 1),) * 3, (3, 3, 3)),
              "c3b": (hidden_vol, ((0, 1), (0, 0), (1, 2)), (3, 1, 5))}
  for name, (inputs, pads, size) in expected.items():
    record = captured[name]["kernel"]
    np.testing.assert_allclose(record.inputs, inputs, rtol=1e-5, atol=1e-6)
    assert record.padding == pads, name
    assert record.kernel_size == size, name
  # lax's own SAME pads, for the strided layers.
  assert tuple(jax.lax.padtype_to_pads((16,), (5,), (2,), "SAME")) == ((1, 2),)
  assert tuple(map(tuple, jax.lax.padtype_to_pads(
      (6, 5, 4), (3, 1, 5), (2, 2, 2), "SAME"))) == ((0, 1), (0, 0), (1, 2))
  assert captured["c1a"]["bias"] is None


def test_linen_params_instead_of_variables_raise():
  model, variables, x = linen_setup()
  with pytest.raises(ValueError, match=r"pass the variables dict "
                     r"\(\{'params': \.\.\.\}"):
    sgs_optax.capture_conv_inputs(model, variables["params"], x)
  with pytest.raises(ValueError, match="not the params alone"):
    sgs_optax.capture_conv_inputs(model, x)


# conv_layouts: the same walk, on abstract values, naming each kernel's axes.


def abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def layouts_without_warning(*args, **kwargs):
  """conv_layouts; any warning it raises fails the test (pyproject)."""
  return sgs_optax.conv_layouts(*args, **kwargs)


def test_conv_layouts_of_a_plain_function_compose_transposes():
  def net(params, x, seq):  # NCHW / NCW inputs, kernels stored four ways.
    y = jax.lax.conv_general_dilated(
        x, params["oihw"], (1, 1), "SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    # Stored (kw, kh, I, O), cast, transposed to HWIO and standardised on
    # the way: the axes survive casts and arithmetic with its own mean.
    w = jnp.transpose(params["whio"].astype(jnp.bfloat16), (1, 0, 2, 3))
    w = w.astype(jnp.float32)
    y = jax.lax.conv_general_dilated(
        y, (w - w.mean()) / w.std(), (1, 1), "SAME",
        dimension_numbers=("NCHW", "HWIO", "NCHW"))
    # A 1-D kernel stored with a leading size-1 axis that a reshape drops:
    # the conv never reads that axis, so no layout of the leaf's rank fits.
    w = params["extra"].reshape(params["extra"].shape[1:])
    z = jax.lax.conv_general_dilated(
        seq, w, (1,), "SAME", dimension_numbers=("NCW", "WIO", "NCW"))
    # One with a size-1 axis added: (O, I, W) read as (O, I, 1, W).
    v = jax.lax.conv_general_dilated(
        x, params["oiw"][:, :, None, :], (1, 1), "SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y.mean() + z.mean() + v.mean() + params["scale"].sum()

  params = {"oihw": jnp.ones((4, 3, 3, 3)), "whio": jnp.ones((5, 3, 4, 4)),
            "extra": jnp.ones((1, 3, 4, 4)), "oiw": jnp.ones((2, 3, 5)),
            "scale": jnp.ones((4,))}
  inputs = (jnp.ones((2, 3, 6, 6)), jnp.ones((2, 4, 7)))
  with pytest.warns(UserWarning) as caught:
    got = sgs_optax.conv_layouts(net, abstract(params), *abstract(inputs))
  (message,) = [str(w.message) for w in caught]
  # The size-1 axis added by the indexing is the conv's H: no leaf axis.
  assert "extra: a conv reads it along axes" in message
  assert "oiw: a conv reads it along axes" in message
  assert got == {"oihw": "OIHW", "whio": "WHIO", "extra": None, "oiw": None,
                 "scale": None}


def test_conv_layouts_of_a_linen_model_abstract_inputs():
  model, variables, x = linen_setup()
  got = layouts_without_warning(model, abstract(variables), abstract(x),
                                train=False)
  assert got == {
      "stem": {"kernel": "HWIO", "bias": None},
      "block": {"shared": {"kernel": "HWIO", "bias": None},
                "down": {"kernel": "HWIO", "bias": None},
                "BatchNorm_0": {"scale": None, "bias": None}},
      "head": {"kernel": "HWIO", "bias": None}}
  with pytest.raises(ValueError, match="conv_layouts.*train=False"):
    sgs_optax.conv_layouts(model, variables, x, mutable=True)


def test_conv_layouts_of_nnx_equinox_and_nd_models():
  nnx_model = NnxNet(nnx.Rngs(0))
  got = layouts_without_warning(nnx_model, jnp.ones((2, 8, 8, 3)))
  assert jax.tree.structure(got, is_leaf=lambda v: v is None) == (
      jax.tree.structure(nnx.as_pure(nnx.state(nnx_model, nnx.Param))))
  assert got["stem"]["kernel"] == "HWIO" and got["norm"]["scale"] is None
  assert [layer["kernel"] for layer in got["layers"].values()] == [
      "HWIO", "HWIO"]
  eqx_model = EqxNet(jax.random.key(0))
  got = layouts_without_warning(lambda m, x: jax.vmap(m)(x), eqx_model,
                                jnp.ones((2, 3, 8, 8)))
  assert (got.first.weight, got.second.weight, got.first.bias) == (
      "OIHW", "OIHW", None)
  assert got == layouts_without_warning(eqx_model, jnp.ones((3, 8, 8)))
  # The tree is an Equinox module, hence callable: still a layout tree.
  params = eqx.filter(eqx_model, eqx.is_array)
  tx = sgs_optax.sgs("acb", kernel_layout=got)
  updates, _ = tx.update(params, tx.init(params))
  np.testing.assert_allclose(updates.first.weight,
                             params.first.weight * acb_matrix(3), rtol=1e-6)
  np.testing.assert_array_equal(updates.first.bias, params.first.bias)
  nnx_params = nnx.as_pure(nnx.state(nnx_model, nnx.Param))
  tx = sgs_optax.cdg(kernel_layout=layouts_without_warning(
      nnx_model, jnp.ones((2, 8, 8, 3))))
  updates, _ = tx.update(nnx_params, tx.init(nnx_params))
  np.testing.assert_allclose(
      updates["stem"]["kernel"],
      sobolev_dense(nnx_params["stem"]["kernel"], 3, 1.0), rtol=1e-5,
      atol=1e-7)
  seq, vol = jnp.ones((2, 16, 3)), jnp.ones((2, 6, 5, 4, 2))
  params = NDNet().init(jax.random.key(2), seq, vol)["params"]
  got = layouts_without_warning(NDNet(), {"params": params}, seq, vol)
  assert {name: got[name]["kernel"] for name in got} == {
      "c1a": "WIO", "c1b": "WIO", "c3a": "DHWIO", "c3b": "DHWIO"}


def test_conv_layouts_warn_and_give_none_where_no_permutation_fits():
  conv = lambda x, w, dims=("NHWC", "HWIO", "NHWC"): (
      jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=dims))

  def net(params, x):
    y = conv(x, params["merged"].reshape(3, 3, 4, 4))  # (9, 4, 4): merged.
    y = conv(y, params["two"]) + conv(y, params["two"],
                                      ("NHWC", "HWOI", "NHWC"))
    y = conv(y, params["a"] + params["b"])  # one kernel from two leaves.
    y = jax.lax.cond(y.sum() > 0, lambda v: conv(v, params["in_cond"]),
                     lambda v: v, y)
    return conv(y, params["fine"])

  params = {name: jnp.ones(shape) for name, shape in [
      ("merged", (9, 4, 4)), ("two", (3, 3, 4, 4)), ("a", (3, 3, 4, 4)),
      ("b", (3, 3, 4, 4)), ("in_cond", (3, 3, 4, 4)), ("fine", (3, 3, 4, 4))]}
  with pytest.warns(UserWarning) as caught:
    got = sgs_optax.conv_layouts(net, params, jnp.ones((1, 5, 5, 4)))
  assert got == {"merged": None, "two": None, "a": None, "b": None,
                 "in_cond": None, "fine": "HWIO"}
  (message,) = [str(w.message) for w in caught]
  for name, why in [("merged", "not a permutation"),
                    ("two", "different layouts ['HWIO', 'HWOI']"),
                    ("a", "other params leaves"), ("b", "other params leaves"),
                    ("in_cond", "cond body")]:
    assert f"{name}: " in message and why in message, (name, message)
  assert "fine" not in message


def test_conv_layouts_under_vmap_over_kernels_is_not_a_permutation():
  # vmap over stacked kernels folds the layer axis into the conv's output
  # channels: the stack gets no layout (a scan would give "LHWIO").
  def net(params, x):
    conv = lambda w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vmap(conv)(params["stack"])

  def scanned(params, x):
    def step(h, w):
      return jnp.tanh(jax.lax.conv_general_dilated(
          h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      ), None
    return jax.lax.scan(step, x, params["stack"])[0]

  params = {"stack": jnp.ones((2, 3, 3, 4, 4))}
  x = jnp.ones((1, 5, 5, 4))
  with pytest.warns(UserWarning, match="stack: a conv reads it along axes"):
    assert sgs_optax.conv_layouts(net, params, x) == {"stack": None}
  assert layouts_without_warning(scanned, params, x) == {"stack": "LHWIO"}


class DoneWhen(nn.Module):
  """Issue 18's model: a stem, a (3, 3, 8, 8) parameter used as a dense
  mixing, an nn.scan stack, a ConvTranspose (and one transposing its
  kernel)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    mix = self.param("mix", nn.initializers.normal(1.0), (3, 3, 8, 8))
    x = jnp.einsum("nhwc,ijcd->nhwd", x, mix) / 9.0
    layers = nn.scan(ScanLayer8, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=3)
    x = layers(name="stack")(x, None)[0]
    x = nn.ConvTranspose(8, (3, 3), strides=(2, 2), name="up")(x)
    return nn.ConvTranspose(6, (3, 3), strides=(2, 2), transpose_kernel=True,
                            name="up_t")(x)


class ScanLayer8(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Conv(8, (3, 3), name="conv")(x)), None


def acb_matrix(k):
  """ACB's S by explicit loops: KxK everywhere, 1xK on the centre row, Kx1
  on the centre column (SPEC 1.2), unit scales."""
  s = np.ones((k, k))
  for i in range(k):
    for j in range(k):
      s[i, j] += (i == k // 2) + (j == k // 2)
  return s


def sobolev_dense(g, axis, lam):
  """G^{-1} g along `axis` by a dense solve of the periodic Sobolev metric
  G = I - lam * Laplacian (SPEC 2.1)."""
  n = g.shape[axis]
  laplacian = -2 * np.eye(n) + np.roll(np.eye(n), 1, 0) + np.roll(
      np.eye(n), -1, 0)
  metric = np.eye(n) - lam * laplacian
  moved = np.moveaxis(np.asarray(g, np.float64), axis, -1)
  return np.moveaxis(np.linalg.solve(metric, moved[..., None])[..., 0], -1,
                     axis)


def test_done_when_conv_layouts_drive_sgs_and_cdg_to_exactly_the_convs():
  model = DoneWhen()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  variables = model.init(jax.random.key(1), x)
  params = variables["params"]
  layouts = layouts_without_warning(model, variables, x)
  assert layouts == {
      "stem": {"kernel": "HWIO", "bias": None}, "mix": None,
      "stack": {"conv": {"kernel": "LHWIO", "bias": None}},
      "up": {"kernel": "HWIO", "bias": None},
      "up_t": {"kernel": "HWOI", "bias": None}}
  grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))(
      params)
  convs = {"stem": (grads["stem"]["kernel"], "HWIO"),
           "up": (grads["up"]["kernel"], "HWIO"),
           "up_t": (grads["up_t"]["kernel"], "HWOI")}

  tx = sgs_optax.sgs("acb", kernel_layout=layouts)
  updates, _ = tx.update(grads, tx.init(params))
  s = acb_matrix(3)
  for name, (g, layout) in convs.items():
    # The spatial axes are the first two in both layouts.
    want = np.asarray(g) * s[:, :, None, None]
    np.testing.assert_allclose(updates[name]["kernel"], want, rtol=1e-6)
  stack = np.asarray(grads["stack"]["conv"]["kernel"])
  np.testing.assert_allclose(updates["stack"]["conv"]["kernel"],
                             stack * s[None, :, :, None, None], rtol=1e-6)
  assert (np.asarray(updates["mix"]) == np.asarray(grads["mix"])).all()
  # Not vacuous: the default layout string scales the mixing parameter.
  default, _ = sgs_optax.sgs("acb").update(grads, sgs_optax.sgs("acb").init(
      params))
  assert not np.array_equal(default["mix"], grads["mix"])

  tx = sgs_optax.cdg(kernel_layout=layouts)
  updates, _ = tx.update(grads, tx.init(params))
  outputs = {"stem": 3, "up": 3, "up_t": 2}
  for name, (g, _) in convs.items():
    np.testing.assert_allclose(updates[name]["kernel"],
                               sobolev_dense(g, outputs[name], 1.0),
                               rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(updates["stack"]["conv"]["kernel"],
                             sobolev_dense(stack, 4, 1.0), rtol=1e-5,
                             atol=1e-7)
  assert (np.asarray(updates["mix"]) == np.asarray(grads["mix"])).all()
  default, _ = sgs_optax.cdg().update(grads, optax.EmptyState())
  assert not np.array_equal(default["mix"], grads["mix"])
