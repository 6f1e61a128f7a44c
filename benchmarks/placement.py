r"""How far merged + SGS training is from branched training, per optimizer.

A small conv net on the digits (two 3x3 convs of width 8, the second
strided, and a dense head) is trained twice in float64 on the same batches:
once with every 3x3 conv built from parallel branches 3x3/1x3/3x1/1x1 with
constant scalars (:class:`sgs_optax.BranchedConv`), by the optimizer itself,
and once as plain convs started at the merged weights, with SGS placed as a
candidate chain says. The deviation is the largest difference of the merged
kernels after ``--steps`` steps, relative to how far the branched kernels
moved (``rel. move``) and to the largest weight (``rel. weight``).

Two scalar sets: per-branch scalars ``1.0, 0.7, -1.3, 1.5`` and the same with
a per-output-channel 1x1 scalar of mixed signs. Placements:

* ``after S1``: ``chain(direction, sgs(S1), [decay], lr)``, ``S1 = sum
  |alpha_k| mask_k`` (exact for scale-invariant elementwise optimizers);
* ``before S``: ``chain(sgs(S), optimizer)``, ``S = sum alpha_k**2 mask_k``
  (exact for SGD);
* ``none``: the optimizer alone, for scale;
* and named misplacements (SGD's squared matrix after Adam, the matrix after
  ``optax.adamw``).

Optimizers that mix coordinates have no exact placement: Muon
(``optax.contrib.muon`` with each conv kernel read as a ``(kh*kw*I, O)``
matrix, as its users do), a minimal Shampoo-style Kronecker preconditioner
written here (optax has none), Adafactor's factored second moment, and
coupled L2 decay under Adam. The exact families run too, at negligible eps and
at optax's defaults (eps 1e-8, Adagrad's initial accumulator 0.1).
Deviations of the non-exact rows grow with ``--steps`` (the trajectories
part); compare the placements of a family with each other and with ``none``.

Run from the repository root::

  python -m benchmarks.placement              # every family, 100 steps
  python -m benchmarks.placement --families muon,adamw --steps 30
  python -m benchmarks.placement --tiny       # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import functools
import json
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib

from benchmarks import _data
import sgs_optax

KERNEL = (3, 3)
BRANCHES = [(3, 3), (1, 3), (3, 1), (1, 1)]
WIDTH = 8
# Per-output-channel 1x1 scalar of mixed signs (C_out = WIDTH).
PER_CHANNEL = np.array([0.5, -1.5, 2.0, -0.8, 1.2, -2.0, 0.7, 1.0])
SCALAR_SETS = {
    "per-branch": [1.0, 0.7, -1.3, 1.5],
    "per-channel": [1.0, 0.7, -1.3, PER_CHANNEL],
}
LR = 3e-3  # every scale-free direction (Adam, Lion, Muon, ...).
SGD_LR = 0.05
DECOUPLED = 0.05  # AdamW / Lion decoupled weight decay.
COUPLED = 5e-3  # L2 added to the gradient.
TINY_EPS = 1e-30


class Net(nn.Module):
  """Two 3x3 convs (the second strided) and a dense head."""

  branched: bool
  scales: Sequence[Any]

  def conv(self, name: str, strides: int) -> nn.Module:
    if self.branched:
      return sgs_optax.BranchedConv(
          WIDTH, KERNEL, BRANCHES, self.scales, strides=strides,
          param_dtype=jnp.float64, name=name)
    return nn.Conv(WIDTH, KERNEL, strides=strides, param_dtype=jnp.float64,
                   name=name)

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.conv("conv1", 1)(x))
    x = nn.relu(self.conv("conv2", 2)(x))
    return nn.Dense(10, param_dtype=jnp.float64, name="head")(
        x.mean(axis=(1, 2)))


def _inverse_fourth_root(gram: jax.Array, eps: float) -> jax.Array:
  """``gram**(-1/4)`` of a symmetric PSD matrix, small eigenvalues floored."""
  values, vectors = jnp.linalg.eigh(gram)
  values = jnp.maximum(values, eps * jnp.max(values) + 1e-300)
  return (vectors * values**-0.25) @ vectors.T


def kronecker_preconditioner(eps: float = 1e-12
                             ) -> optax.GradientTransformation:
  """A minimal Shampoo: ``L**(-1/4) G R**(-1/4)`` per matrix-shaped leaf.

  Each leaf of rank >= 2 is read as a ``(prod(shape[:-1]), shape[-1])``
  matrix ``G`` (a conv kernel as ``(kh*kw*I, O)``); ``L`` and ``R`` sum
  ``G G^T`` and ``G^T G`` over the steps. Other leaves get Adagrad's
  ``g / sqrt(sum g**2)``. No grafting, no blocking: the reference point, not
  a production optimizer.
  """

  def init(params):
    def stats(p):
      if p.ndim < 2:
        return jnp.zeros_like(p)
      rows, cols = int(np.prod(p.shape[:-1])), p.shape[-1]
      return (jnp.zeros((rows, rows), p.dtype), jnp.zeros((cols, cols),
                                                          p.dtype))
    return jax.tree.map(stats, params)

  def update(updates, state, params=None):
    del params

    def one(g, s):
      if g.ndim < 2:
        s = s + g**2
        return jnp.where(s > 0, g / jnp.sqrt(s), 0.0), s
      m = g.reshape(-1, g.shape[-1])
      left, right = s[0] + m @ m.T, s[1] + m.T @ m
      u = (_inverse_fourth_root(left, eps) @ m
           @ _inverse_fourth_root(right, eps))
      return u.reshape(g.shape), (left, right)

    flat = jax.tree.map(one, updates, state,
                        is_leaf=lambda x: isinstance(x, tuple))
    pick = lambda i: jax.tree.map(lambda _, pair: pair[i], updates, flat)
    return pick(0), pick(1)

  return optax.GradientTransformation(init, update)


def _muon_dims(params):
  """Conv kernels as ``(kh*kw*I, O)`` matrices; everything else to Adam."""
  def dims(p):
    if p.ndim == 4:
      return contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2),
                                          output_axis=3)
    return None
  return jax.tree.map(dims, params)


@dataclasses.dataclass(frozen=True)
class Family:
  """An optimizer family and the placements measured for it.

  Attributes:
    branched: the optimizer the branches are trained with.
    placements: name -> ``f(sgs_of) -> chain`` for the merged kernel, where
      ``sgs_of(power)`` is ``sgs(branch_scaling(..., power=power))``.
    exact: the placement that is exact with negligible eps, if any.
  """

  branched: Callable[[], optax.GradientTransformation]
  placements: dict[str, Callable[[Callable], optax.GradientTransformation]]
  exact: str | None = None


def _after(direction, decay=None, lr=LR):
  """``chain(direction, sgs(S1), [add_decayed_weights], lr)``."""
  def build(sgs_of):
    tail = [] if decay is None else [optax.add_decayed_weights(decay)]
    return optax.chain(direction(), sgs_of(1), *tail,
                       optax.scale_by_learning_rate(lr))
  return build


def _before(optimizer):
  return lambda sgs_of: optax.chain(sgs_of(2), optimizer())


def _alone(optimizer):
  return lambda sgs_of: optimizer()


def _family(optimizer, direction, decay=None, exact=True, extra=None):
  placements = {"after S1": _after(direction, decay),
                "before S": _before(optimizer), "none": _alone(optimizer)}
  placements.update(extra or {})
  return Family(optimizer, placements, "after S1" if exact else None)


def _families() -> dict[str, Family]:
  adam = lambda eps: lambda: optax.scale_by_adam(eps=eps)
  adamw = lambda: optax.adamw(LR, eps=TINY_EPS, weight_decay=DECOUPLED)
  muon = lambda: contrib.muon(LR, muon_weight_dimension_numbers=_muon_dims)
  shampoo = lambda: optax.chain(kronecker_preconditioner(),
                                optax.scale_by_learning_rate(LR))
  # Factored wherever the two largest axes are >= 4 (the 8x8 channel axes of
  # conv2; conv1's (3, 3, 1, 8) stays unfactored): a per-position factoring.
  factored = lambda: optax.scale_by_factored_rms(min_dim_size_to_factor=4)
  adafactor = lambda: optax.adafactor(LR)
  sgd = lambda: optax.sgd(SGD_LR, momentum=0.9)
  return {
      "sgd+momentum": Family(sgd, {"before S": _before(sgd),
                                   "none": _alone(sgd)}, "before S"),
      "adam": _family(lambda: optax.adam(LR, eps=TINY_EPS), adam(TINY_EPS)),
      "adamw": _family(adamw, adam(TINY_EPS), DECOUPLED, extra={
          "after S (squared)": lambda sgs_of: optax.chain(
              optax.scale_by_adam(eps=TINY_EPS), sgs_of(2),
              optax.add_decayed_weights(DECOUPLED),
              optax.scale_by_learning_rate(LR)),
          "after optax.adamw (old)": lambda sgs_of: optax.chain(
              adamw(), sgs_of(1))}),
      "rmsprop": _family(lambda: optax.rmsprop(LR, eps=TINY_EPS),
                         lambda: optax.scale_by_rms(eps=TINY_EPS)),
      "adagrad (from 0)": _family(
          lambda: optax.adagrad(LR, initial_accumulator_value=0.0,
                                eps=TINY_EPS),
          lambda: optax.scale_by_rss(0.0, eps=TINY_EPS)),
      "lion": _family(lambda: optax.lion(LR, weight_decay=DECOUPLED),
                      optax.scale_by_lion, DECOUPLED),
      "sign": _family(lambda: optax.sign_sgd(LR), optax.scale_by_sign),
      "adam (eps 1e-8)": _family(lambda: optax.adam(LR), adam(1e-8),
                                 exact=False),
      "rmsprop (eps 1e-8)": _family(lambda: optax.rmsprop(LR),
                                    optax.scale_by_rms, exact=False),
      "adagrad (default)": _family(lambda: optax.adagrad(LR),
                                   optax.scale_by_rss, exact=False),
      "adam + coupled L2": _family(
          lambda: optax.chain(optax.add_decayed_weights(COUPLED),
                              optax.adam(LR, eps=TINY_EPS)),
          lambda: optax.chain(optax.add_decayed_weights(COUPLED),
                              optax.scale_by_adam(eps=TINY_EPS)),
          exact=False),
      "muon": Family(muon, {
          "after S1": lambda sgs_of: optax.chain(muon(), sgs_of(1)),
          "before S": _before(muon), "none": _alone(muon)}),
      "shampoo-like": Family(shampoo, {
          "after S1": _after(kronecker_preconditioner),
          "before S": _before(shampoo), "none": _alone(shampoo)}),
      "adafactor (factored)": _family(
          lambda: optax.chain(factored(), optax.scale_by_learning_rate(LR)),
          factored, exact=False),
      # Also clips each leaf's update RMS and scales it by the leaf's RMS.
      "adafactor (optax)": Family(adafactor, {
          "after S1": lambda sgs_of: optax.chain(adafactor(), sgs_of(1)),
          "before S": _before(adafactor), "none": _alone(adafactor)}),
  }


FAMILIES = _families()


def _batches(train: tuple[np.ndarray, np.ndarray], steps: int, batch: int,
             seed: int):
  images, labels = train
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    index = rng.choice(len(images), batch, replace=False)
    yield jnp.asarray(images[index], jnp.float64), jnp.asarray(labels[index])


@functools.cache
def _gradient(branched: bool, scale_set: str):
  """The jitted loss gradient of one network, shared by every optimizer."""
  model = Net(branched, tuple(SCALAR_SETS[scale_set]))

  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return jax.jit(jax.grad(loss)), model


def _train(grad, params, tx, batches):
  update = jax.jit(tx.update)
  state = tx.init(params)
  for x, y in batches:
    updates, state = update(grad(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _merge(params, scale_set):
  merged = dict(params)
  for name in ("conv1", "conv2"):
    merged[name] = sgs_optax.merge_branches(params[name], KERNEL, BRANCHES,
                                            SCALAR_SETS[scale_set])
  return merged


def _sgs_of(scale_set: str):
  return lambda power: sgs_optax.sgs(sgs_optax.branch_scaling(
      KERNEL, BRANCHES, SCALAR_SETS[scale_set], power=power))


def _deviation(got, want, start) -> dict[str, float]:
  err = moved = 0.0
  for name in ("conv1", "conv2"):
    w, g, s = (np.asarray(t[name]["kernel"]) for t in (want, got, start))
    err = max(err, float(np.abs(g - w).max()))
    moved = max(moved, float(np.abs(w - s).max()))
  largest = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  whole = max(float(np.abs(np.asarray(g) - np.asarray(w)).max())
              for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  return {"rel_move": err / moved, "rel_weight": whole / largest}


def measure(family: str, scale_set: str, data, steps: int, batch: int,
            seed: int) -> dict[str, dict[str, float]]:
  """Deviation of every placement of ``family`` from branched training."""
  spec = FAMILIES[family]
  grad_b, model_b = _gradient(True, scale_set)
  grad_m, _ = _gradient(False, scale_set)
  x0 = jnp.zeros((1, *data[0].shape[1:]), jnp.float64)
  params = model_b.init(jax.random.key(seed), x0)["params"]
  start = _merge(params, scale_set)
  batches = lambda: _batches(data, steps, batch, seed)
  want = _merge(_train(grad_b, params, spec.branched(), batches()),
                scale_set)
  return {name: _deviation(
      _train(grad_m, start, build(_sgs_of(scale_set)), batches()), want,
      start) for name, build in spec.placements.items()}


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--families", default="all",
                      help=f"comma list of {', '.join(FAMILIES)}; default all")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tiny", action="store_true",
                      help="3 steps of batch 8: a smoke run")
  parser.add_argument("--out", default="results/placement.json",
                      help="JSON results; '' to skip")
  args = parser.parse_args(argv)
  names = (list(FAMILIES) if args.families == "all" else
           [f.strip() for f in args.families.split(",") if f.strip()])
  unknown = [n for n in names if n not in FAMILIES]
  if unknown:
    parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
  args.families = names
  if args.tiny:
    args.steps, args.batch_size = 3, 8
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parse(argv)
  with jax.enable_x64(True):
    x_train, y_train, _, _ = _data.load_dataset("digits", normalize=True)
    data = (x_train.astype(np.float64), y_train)
    results = {}
    print(f"digits, {args.steps} steps of batch {args.batch_size}, float64; "
          "deviation of merged + SGS from branched training (max |dW| "
          "relative to the branched kernels' move | to the largest weight)")
    for family in args.families:
      results[family] = {}
      for scale_set in SCALAR_SETS:
        rows = measure(family, scale_set, data, args.steps, args.batch_size,
                       args.seed)
        results[family][scale_set] = rows
        for name, dev in rows.items():
          mark = " (exact)" if name == FAMILIES[family].exact else ""
          print(f"  {family:22s} {scale_set:12s} {name + mark:32s} "
                f"{dev['rel_move']:9.2e} | {dev['rel_weight']:9.2e}")
  record = {"settings": {"steps": args.steps, "batch_size": args.batch_size,
                         "seed": args.seed, "lr": LR, "sgd_lr": SGD_LR,
                         "decoupled_decay": DECOUPLED, "coupled_l2": COUPLED},
            "results": results}
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
  return record


if __name__ == "__main__":
  main(sys.argv[1:])
