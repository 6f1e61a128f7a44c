"""Tests for capture_conv_inputs (Flax linen and NNX)."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import sgs_optax


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


def test_linen_capture_is_keyed_like_params_with_each_conv_geometry():
  model, variables, x = linen_setup()
  captured = sgs_optax.capture_conv_inputs(model, variables, x, train=False)
  assert set(captured) == {"stem", "block", "head"}
  assert set(captured["block"]) == {"shared", "down"}
  for path in (("stem",), ("block", "shared"), ("block", "down"), ("head",)):
    node_params, node_captured = variables["params"], captured
    for key in path:
      node_params, node_captured = node_params[key], node_captured[key]
    assert node_captured["kernel"].kernel_size == node_params["kernel"].shape[:2]
  np.testing.assert_array_equal(captured["stem"]["kernel"].inputs, x)
  # The stem's output, recomputed here, is the shared conv's first input.
  stem = variables["params"]["stem"]
  hidden = nn.relu(nn.Conv(4, (3, 3)).apply({"params": stem}, x))
  shared = captured["block"]["shared"]["kernel"]
  assert shared.inputs.shape == (4, 8, 8, 4)  # two calls, concatenated.
  np.testing.assert_allclose(shared.inputs[:2], hidden, rtol=1e-6)
  assert shared.padding_mode == "circular"
  # lax SAME with stride 2 on an even map pads (0, 1).
  assert captured["block"]["down"]["kernel"].padding == ((0, 1), (0, 1))
  assert captured["head"]["kernel"].padding == ((0, 0), (0, 0))


def test_linen_capture_does_not_mutate_and_jits():
  model, variables, x = linen_setup()
  before = jax.tree.map(np.asarray, variables)
  eager = sgs_optax.capture_conv_inputs(model, variables, x, train=False)
  jitted = jax.jit(lambda v, x: sgs_optax.capture_conv_inputs(
      model, v, x, train=False))(variables, x)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, variables))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               eager, jitted)


def test_linen_capture_rejects_mutable_and_non_modules():
  model, variables, x = linen_setup()
  with pytest.raises(ValueError, match="mutable"):
    sgs_optax.capture_conv_inputs(model, variables, x, mutable=["x"])
  with pytest.raises(TypeError, match="Flax"):
    sgs_optax.capture_conv_inputs(lambda x: x, variables, x)


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


def test_nnx_capture_is_keyed_like_the_optimizer_params_and_restores_mode():
  model = NnxNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  assert model.norm.use_running_average is False
  captured = sgs_optax.capture_conv_inputs(model, x)
  assert model.norm.use_running_average is False  # train mode restored.
  assert model.drop.deterministic is False
  jax.tree.map(np.testing.assert_array_equal, stats_before,
               jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  assert captured["stem"]["kernel"].inputs.shape == (2, 8, 8, 3)
  assert captured["layers"][0]["kernel"].padding == ((0, 1), (0, 1))
  assert (captured["layers"][1]["kernel"].kernel_size ==
          params["layers"][1]["kernel"].shape[:2])
  # Eval mode: the first layer's input is the BN-in-eval output, no dropout.
  model.eval()
  expected = model.norm(model.stem(x))
  np.testing.assert_allclose(captured["layers"][0]["kernel"].inputs, expected,
                             rtol=1e-5, atol=1e-6)
