"""Each optimizer family's documented SGS placement equals branched training.

The golden trajectory is a branched conv network trained by the optimizer
itself: plain lax code with one VALID (dilated) conv per branch and merging
tap by tap (the helpers of tests/equivalence_test.py), in float64, with
per-branch and per-output-channel scalars of both signs. The merged network
starts at the merged weights and is trained with the chain that
docs/placement.md gives for the family: SGD's matrix ``sum alpha**2 mask``
before the optimizer, or ``sum |alpha| mask`` after a scale-invariant
direction and before decoupled decay and the learning rate. Nothing from
sgs_optax is used but ``branch_scaling`` and ``sgs``, the code under test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgs_optax

from equivalence_test import loop_merge
from equivalence_test import nd_branched_conv
from equivalence_test import nd_plain_conv

STEPS = 8
CHANNELS = (2, 3, 3)  # input, conv1 and conv2 output channels.
LR = 0.02
SGD_LR = 0.2
WD = 0.1  # weight decay: coupled for SGD, decoupled for AdamW and Lion.
EPS = 1e-30  # negligible next to every gradient's magnitude.

# kernel, branches, dilations, scales (per-channel ones have C_out = 3),
# spatial input size. Every set mixes signs.
BRANCH_SETS = {
    # The check: 3x3/1x3/3x1/1x1, a per-channel 1x1 of mixed signs.
    "2d": ((3, 3), [(3, 3), (1, 3), (3, 1), (1, 1)], None,
           [1.0, 0.7, -1.3, np.array([0.5, -1.5, 2.0])], (6, 5)),
    "1d_dilated": ((7,), [(7,), (3,), (3,), (1,)], [(1,), (1,), (2,), (1,)],
                   [-1.0, 0.5, np.array([0.5, -1.0, 2.0]), 2.0], (12,)),
    "3d": ((3, 3, 3), [(3, 3, 3), (1, 3, 3), (3, 1, 1), (1, 1, 1)], None,
           [1.0, -0.7, np.array([1.5, -0.5, 1.0]), 1.5], (4, 5, 4)),
    "2d_dilated": ((7, 7), [(7, 7), (3, 3), (3, 3)],
                   [(1, 1), (2, 2), (3, 3)],
                   [1.0, -1.3, np.array([0.5, -1.0, 2.0])], (9, 8)),
}


def sgd_family(**kwargs):
  """SGD's matrix (power 2) on the gradient, before the optimizer."""
  return lambda scaled: (optax.sgd(SGD_LR, **kwargs),
                         optax.chain(scaled(2), optax.sgd(SGD_LR, **kwargs)))


def after_direction(direction, branched, decay=None):
  """``chain(direction, sgs(S1), [add_decayed_weights], lr)``."""
  def chains(scaled):
    tail = [] if decay is None else [optax.add_decayed_weights(decay)]
    return branched(), optax.chain(direction(), scaled(1), *tail,
                                   optax.scale_by_learning_rate(LR))
  return chains


# name -> f(scaled) -> (optimizer of the branches, chain of the merged
# kernel), where scaled(power) is sgs(branch_scaling(..., power=power)).
FAMILIES = {
    "sgd": sgd_family(),
    "momentum": sgd_family(momentum=0.9),
    "nesterov": sgd_family(momentum=0.9, nesterov=True),
    "sgd_coupled_decay": lambda scaled: (
        optax.chain(optax.add_decayed_weights(WD),
                    optax.sgd(SGD_LR, momentum=0.9)),
        optax.chain(scaled(2), optax.add_decayed_weights(WD),
                    optax.sgd(SGD_LR, momentum=0.9))),
    "adam": after_direction(lambda: optax.scale_by_adam(eps=EPS),
                            lambda: optax.adam(LR, eps=EPS)),
    "adamw": after_direction(
        lambda: optax.scale_by_adam(eps=EPS),
        lambda: optax.adamw(LR, eps=EPS, weight_decay=WD), decay=WD),
    "nadamw": after_direction(
        lambda: optax.scale_by_adam(eps=EPS, nesterov=True),
        lambda: optax.adamw(LR, eps=EPS, weight_decay=WD, nesterov=True),
        decay=WD),
    "rmsprop": after_direction(lambda: optax.scale_by_rms(eps=EPS),
                               lambda: optax.rmsprop(LR, eps=EPS)),
    # optax.rmsprop applies momentum after the learning rate: a linear trace,
    # so the matrix may go before it.
    "rmsprop_centered_momentum": lambda scaled: (
        optax.rmsprop(LR, eps=EPS, centered=True, momentum=0.9),
        optax.chain(optax.scale_by_stddev(eps=EPS), scaled(1),
                    optax.scale_by_learning_rate(LR), optax.trace(0.9))),
    "adagrad": after_direction(
        lambda: optax.scale_by_rss(initial_accumulator_value=0.0, eps=EPS),
        lambda: optax.adagrad(LR, initial_accumulator_value=0.0, eps=EPS)),
    "lion": after_direction(optax.scale_by_lion,
                            lambda: optax.lion(LR, weight_decay=WD),
                            decay=WD),
    # optax.sign_sgd and optax.signum spelled out (recent optax aliases).
    "sign": after_direction(optax.scale_by_sign, lambda: optax.chain(
        optax.scale_by_sign(), optax.scale_by_learning_rate(LR))),
    "signum": lambda scaled: (
        optax.chain(optax.ema(0.9, debias=False), optax.scale_by_sign(),
                    optax.scale_by_learning_rate(LR)),
        optax.chain(optax.ema(0.9, debias=False), optax.scale_by_sign(),
                    scaled(1), optax.scale_by_learning_rate(LR))),
}


def batches(spatial, steps, seed):
  key = jax.random.key(seed)
  for _ in range(steps):
    key, kx, ky = jax.random.split(key, 3)
    yield (jax.random.normal(kx, (3, *spatial, CHANNELS[0]), jnp.float64),
           jax.random.randint(ky, (3,), 0, 3))


def init_branches(branches, key):
  """Branch kernels ``(*branch, C_in, C_out)`` of two convs and a head."""
  params = {}
  for name, cin, cout in (("conv1", CHANNELS[0], CHANNELS[1]),
                          ("conv2", CHANNELS[1], CHANNELS[2])):
    params[name] = []
    for branch in branches:
      key, sub = jax.random.split(key)
      params[name].append(0.4 * jax.random.normal(
          sub, (*branch, cin, cout), jnp.float64))
  params["head"] = 0.4 * jax.random.normal(key, (CHANNELS[2], 3), jnp.float64)
  return params


@functools.cache
def gradients(branch_set):
  """Jitted gradients of the branched and the merged network, and merge.

  Compiled once per branch set and shared by every optimizer (which runs
  unjitted): the networks, not the optimizers, are what is slow to compile.
  """
  kernel, branches, dilations, alphas, _ = BRANCH_SETS[branch_set]
  n = len(kernel)
  dilations = dilations or [(1,) * n] * len(branches)
  axes = tuple(range(1, n + 1))

  def branched_logits(p, x):
    h = x
    for name, stride in (("conv1", 1), ("conv2", 2)):
      h = jax.nn.relu(nd_branched_conv(h, p[name], kernel, branches,
                                       dilations, alphas, stride))
    return h.mean(axis=axes) @ p["head"]

  def plain_logits(p, x):
    h = jax.nn.relu(nd_plain_conv(x, p["conv1"], 1))
    h = jax.nn.relu(nd_plain_conv(h, p["conv2"], 2))
    return h.mean(axis=axes) @ p["head"]

  def grad(logits):
    def loss(p, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(
          logits(p, x), y).mean()
    return jax.jit(jax.grad(loss))

  def merge(p):
    return {"head": np.asarray(p["head"]), **{
        name: loop_merge(p[name], kernel, branches, dilations, alphas)
        for name in ("conv1", "conv2")}}

  return grad(branched_logits), grad(plain_logits), merge


def train(grad, params, tx, batches_):
  state = tx.init(params)
  for x, y in batches_:
    updates, state = tx.update(grad(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  return params


def trajectories(branch_set, chains, steps=STEPS):
  """(merged after branched training, merged training, merged start).

  ``chains(scaled)`` gives the branches' optimizer and the merged chain;
  ``scaled(power)`` is the transform under test for this branch set.
  """
  kernel, branches, dilations, alphas, spatial = BRANCH_SETS[branch_set]
  n = len(kernel)
  dilations = dilations or [(1,) * n] * len(branches)

  def scaled(power):
    return sgs_optax.sgs(
        sgs_optax.branch_scaling(kernel, branches, alphas, dilations,
                                 power=power),
        kernel_layout="DHW"[-n:] + "IO")

  branched_tx, merged_tx = chains(scaled)
  branched_grad, plain_grad, merge = gradients(branch_set)
  params = init_branches(branches, jax.random.key(5))
  start = merge(params)
  trained_b = train(branched_grad, params, branched_tx,
                    batches(spatial, steps, 7))
  trained_m = train(plain_grad, jax.tree.map(jnp.asarray, start), merged_tx,
                    batches(spatial, steps, 7))
  return merge(trained_b), trained_m, start


def relative_errors(branch_set, chains, steps=STEPS):
  """(max |merged - branched| / max |branched|, smallest relative move)."""
  with jax.enable_x64(True):
    want, got, start = trajectories(branch_set, chains, steps)
    largest = max(float(np.abs(w).max()) for w in want.values())
    err = max(float(np.abs(np.asarray(got[k]) - want[k]).max())
              for k in want)
    moved = min(float(np.abs(want[k] - start[k]).max() / np.abs(start[k]).max())
                for k in ("conv1", "conv2"))
  return err / largest, moved


FAST = [(family, "2d") for family in FAMILIES] + [
    ("adamw", "1d_dilated"), ("lion", "2d_dilated")]
SLOW = [(family, branch_set) for family in FAMILIES
        for branch_set in BRANCH_SETS if (family, branch_set) not in FAST]


def check_exact(family, branch_set, steps=STEPS):
  err, moved = relative_errors(branch_set, FAMILIES[family], steps)
  assert moved > 0.05, moved  # the kernels really trained.
  assert err < 1e-9, err


@pytest.mark.parametrize("family, branch_set", FAST)
def test_documented_placement_equals_branched_training(family, branch_set):
  check_exact(family, branch_set)


@pytest.mark.slow
@pytest.mark.parametrize("family, branch_set", SLOW)
def test_documented_placement_equals_branched_training_everywhere(
    family, branch_set):
  check_exact(family, branch_set)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["adam", "adamw", "lion", "rmsprop",
                                    "adagrad", "sign"])
def test_exact_for_thirty_steps(family):
  check_exact(family, "2d", steps=30)


def test_the_power_and_the_place_matter():
  """The harness can fail: nearby placements are measurably off."""
  adam = lambda: optax.scale_by_adam(eps=EPS)
  adamw = lambda: optax.adamw(LR, eps=EPS, weight_decay=WD)
  wrong = {
      # SGD's squared matrix after the direction.
      "squared": lambda scaled: (adamw(), optax.chain(
          adam(), scaled(2), optax.add_decayed_weights(WD),
          optax.scale_by_learning_rate(LR))),
      # The matrix after optax.adamw: it scales the decay too.
      "after_adamw": lambda scaled: (adamw(), optax.chain(
          optax.adamw(LR, eps=EPS, weight_decay=WD), scaled(1))),
      # The matrix before Adam: divided out again (up to the sign).
      "before_adam": lambda scaled: (adamw(), optax.chain(
          scaled(1), optax.adamw(LR, eps=EPS, weight_decay=WD))),
      # SGD's matrix, linear: SGD needs the squares.
      "sgd_linear": lambda scaled: (optax.sgd(SGD_LR), optax.chain(
          scaled(1), optax.sgd(SGD_LR))),
  }
  for name, chains in wrong.items():
    err, _ = relative_errors("2d", chains)
    assert err > 1e-3, (name, err)
