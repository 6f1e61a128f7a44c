"""Tests for refresh_scalings: plumbing of captured inputs into SGS states.

The estimator itself is checked against an independent implementation in
dependence_test.py; here the expected matrices come from calling it directly
on the right input with the right geometry.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgs_optax


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
      dilation=record.dilation, padding_mode=record.padding_mode, **kwargs)
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


def test_nan_keeps_previous_and_missing_capture_keeps_previous():
  _, params, x, captured = setup()
  state = sgs_optax.sgs("acb").init(params)
  constant = sgs_optax.ConvInput(
      jnp.ones_like(captured["stem"]["kernel"].inputs),
      captured["stem"]["kernel"].padding, kernel_size=(3, 3),
      padding_mode="circular")  # No zero padding: every channel constant.
  new = sgs_optax.refresh_scalings(state, {"stem": {"kernel": constant}})
  scalings = sgs_optax.get_scalings(new)
  np.testing.assert_array_equal(scalings["stem"]["kernel"],
                                sgs_optax.branch_scaling((3, 3), [(3, 3), (
                                    1, 3), (3, 1)]))
  np.testing.assert_array_equal(
      scalings["wide"]["kernel"],
      sgs_optax.get_scalings(state)["wide"]["kernel"])


def test_per_channel_state_gets_the_layer_matrix_broadcast():
  _, params, _, captured = setup()
  tree = jax.tree.map(lambda _: None, params)
  tree["stem"]["kernel"] = jnp.ones((3, 3, 6))
  state = sgs_optax.sgs(tree).init(params)
  new = sgs_optax.refresh_scalings(state, captured)
  got = sgs_optax.get_scalings(new)["stem"]["kernel"]
  assert got.shape == (3, 3, 6)
  want = expected_scaling(captured["stem"]["kernel"], (3, 3))
  for c in range(6):
    np.testing.assert_allclose(got[..., c], want, rtol=1e-6)


def test_every_sgs_state_in_nested_wrappers_is_refreshed():
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
  from sgs_optax._spatial import find_states
  states = find_states(new)
  assert len(states) == 2
  for s in states:
    np.testing.assert_allclose(s.scalings["stem"]["kernel"], want, rtol=1e-6)


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
      sgs_optax.get_scalings(
          sgs_optax.refresh_scalings(tx.init(params), captured))["stem"][
              "kernel"], rtol=1e-6)
  params, state = step(params, state)
  assert step._cache_size() == 1


def test_mismatched_trees_raise_naming_the_layer():
  _, params, _, captured = setup()
  state = sgs_optax.sgs().init(params)
  with pytest.raises(ValueError, match="extra/kernel"):
    sgs_optax.refresh_scalings(state, {**captured, "extra": captured["stem"]})
  bad = {"stem": {"kernel": sgs_optax.ConvInput(
      captured["stem"]["kernel"].inputs, ((1, 1), (2, 2)),
      kernel_size=(5, 5))}}
  with pytest.raises(ValueError, match="stem"):
    sgs_optax.refresh_scalings(state, bad)
  with pytest.raises(ValueError, match="no SpatialScalingState"):
    sgs_optax.refresh_scalings(optax.sgd(0.1).init(params), captured)
