r"""What Channel-Directed Gradients cost: each solver side by side.

**Part 1: the update alone** on the conv-kernel gradients of a benchmark model
(CIFAR ResNet-18 by default: 20 kernels, 11.2 M float32 values): the jitted
``cdg(...).update`` for each metric, boundary and solver (``"fft"``,
``"dense"``, ``"tridiagonal"`` and ``None``, the platform's default), next to
a floor that only reads and writes every gradient (``-g``) and, for the FFT,
a variant that stacks same-shaped kernels (a ResNet stage's 3x3x64x64 ones)
so they share one transform, then splits them. All timers run in one process,
in interleaved rounds (the order rotated each round); the table gives the
median time per update, its ratio to the floor and to the FFT solver, and the
largest difference from the FFT solver relative to the largest update.

**Part 2 (``--step``): the share of a train step.** For each solver, the
update of ``chain(cdg(solver=...), add_decayed_weights(5e-4), sgd(0.1,
momentum=0.9))`` minus that of the same chain without ``cdg``, both on a
params-shaped gradient, as a share of the model's plain SGD train step at
``--batch-size`` (32x32x3 inputs, 100 classes): the ``upd +%`` column of
``benchmarks.overhead``, every solver in the same interleaved rounds.

Run from the repository root::

  python -m benchmarks.cdg_overhead                    # ResNet-18 kernels
  python -m benchmarks.cdg_overhead --step             # and step shares
  python -m benchmarks.cdg_overhead --tiny             # a smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _models
from benchmarks import _report
from sgs_optax import cdg

# (metric, boundary, solvers): reweighted_l2 is a closed form whatever the
# solver, and "tridiagonal" solves sobolev only.
CASES = (
    ("sobolev", "periodic", ("fft", "dense", "tridiagonal", None)),
    ("sobolev", "neumann", ("fft", "dense", "tridiagonal", None)),
    ("reweighted_sobolev", "periodic", ("fft", "dense", None)),
    ("reweighted_l2", "periodic", (None,)),
)


def kernel_gradients(model: str, tiny: bool) -> dict[str, jax.Array]:
  """Random float32 gradients shaped like ``model``'s 4-D conv kernels."""
  module = _models.make_model(model, 10, tiny=tiny)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  leaves = jax.tree_util.tree_leaves_with_path(shapes["params"])
  rng = np.random.default_rng(0)
  return {jax.tree_util.keystr(path): jnp.asarray(
      rng.standard_normal(leaf.shape), jnp.float32)
          for path, leaf in leaves if leaf.ndim == 4}


def _label(metric: str, boundary: str, solver: str | None) -> str:
  return f"{metric}/{boundary}/{solver or 'default'}"


def _stacked_fft(metric: str, boundary: str) -> Callable:
  """The FFT solver on same-shaped kernels stacked into one transform."""
  tx = cdg(metric=metric, boundary=boundary, solver="fft",
           kernel_layout="LHWIO")

  def update(grads):
    groups = {}
    for name, g in grads.items():
      groups.setdefault(g.shape, []).append(name)
    out = {}
    for names in groups.values():
      stacked = jnp.stack([grads[n] for n in names])
      smoothed = tx.update({"k": stacked}, optax.EmptyState())[0]["k"]
      out.update(zip(names, smoothed))
    return out

  return update


def update_timers(grads) -> dict[str, Callable]:
  """Jitted updates to time: the floor, every case, the stacked FFT."""
  timers = {"read+write (floor)": jax.jit(
      lambda g: jax.tree.map(jnp.negative, g))}
  for metric, boundary, solvers in CASES:
    for solver in solvers:
      tx = cdg(metric=metric, boundary=boundary, solver=solver)
      timers[_label(metric, boundary, solver)] = jax.jit(
          lambda g, tx=tx: tx.update(g, optax.EmptyState())[0])
    if "fft" in solvers:
      timers[_label(metric, boundary, "fft, stacked")] = jax.jit(
          _stacked_fft(metric, boundary))
  return timers


def _seconds_per_call(fn: Callable[[], object], calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def interleaved(timers: dict[str, Callable[[], object]], rounds: int,
                calls: int) -> dict[str, list[float]]:
  """Seconds per call of each timer, every round, order rotated per round."""
  for fn in timers.values():
    _seconds_per_call(fn, 2)  # compile and warm up
  names = list(timers)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(_seconds_per_call(timers[name], calls))
  return times


def _difference(out, ref) -> float:
  """max |out - ref| over every kernel, relative to max |ref|."""
  worst = max(float(jnp.max(jnp.abs(ref[k]))) for k in ref)
  return max(float(jnp.max(jnp.abs(out[k] - ref[k]))) for k in ref) / worst


def solver_rows(model: str, tiny: bool, rounds: int,
                calls: int) -> list[dict[str, object]]:
  """Part 1: one row per timer, with its ratios and its agreement."""
  grads = kernel_gradients(model, tiny)
  timers = update_timers(grads)
  times = interleaved({k: functools.partial(f, grads)
                       for k, f in timers.items()}, rounds, calls)
  median = {k: statistics.median(v) for k, v in times.items()}
  floor = median["read+write (floor)"]
  rows = []
  for name, seconds in median.items():
    row = {"timer": name, "ms": 1e3 * seconds, "x_floor": seconds / floor}
    if name.count("/") == 2:
      metric, boundary, _ = name.split("/")
      fft = _label(metric, boundary, "fft")
      if fft in median:
        row["x_fft"] = seconds / median[fft]
        row["difference"] = _difference(timers[name](grads),
                                        timers[fft](grads))
    rows.append(row)
  return rows


def solver_table(rows) -> str:
  lines = ["| update alone | ms | x floor | x fft | difference vs fft |",
           "|---|---|---|---|---|"]
  for r in rows:
    x_fft = f"{r['x_fft']:.2f}" if "x_fft" in r else "-"
    diff = f"{r['difference']:.1e}" if "difference" in r else "-"
    lines.append(f"| {r['timer']} | {r['ms']:.2f} | {r['x_floor']:.2f} | "
                 f"{x_fft} | {diff} |")
  return "\n".join(lines)


def _sgd(transform=None) -> optax.GradientTransformation:
  """``chain(transform, add_decayed_weights, sgd)``, as benchmarks.overhead."""
  base = (optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  return optax.chain(*((transform,) if transform else ()), *base)


def make_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
  """A jitted train step of ``model`` (BatchNorm statistics updated)."""

  def loss_fn(params, state, x, y):
    logits, state = model.apply({"params": params, **state}, x, train=True,
                                mutable=list(state))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, state

  @jax.jit
  def step(params, state, opt_state, x, y):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  return step


def step_shares(model_name: str, tiny: bool, batch_size: int, rounds: int,
                calls: int) -> dict[str, float]:
  """Part 2: each solver's extra update time, as a share of an SGD step.

  The update of ``chain(cdg(solver=...), add_decayed_weights, sgd)`` minus
  that of ``chain(add_decayed_weights, sgd)``, both on a params-shaped
  gradient, over the median train step of plain ``sgd``: the ``upd +%`` of
  ``benchmarks.overhead``, for every solver in one run.
  """
  model = _models.make_model(model_name, 100, tiny=tiny)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch_size, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 100, batch_size))
  variables = model.init(jax.random.key(0), x[:1])
  params = variables.pop("params")
  grads = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  sgd = _sgd()
  timers = {"sgd step": functools.partial(
      make_step(model, sgd), params, variables, sgd.init(params), x, y)}
  solvers = {"sgd": None, **{f"cdg(solver={s!r})": cdg(solver=s)
                             for s in (None, "fft", "dense", "tridiagonal")}}
  for name, transform in solvers.items():
    tx = _sgd(transform)
    update = jax.jit(tx.update)
    timers[f"{name} update"] = functools.partial(update, grads,
                                                 tx.init(params), params)
  times = interleaved(timers, rounds, calls)
  median = {k: statistics.median(v) for k, v in times.items()}
  step, base = median["sgd step"], median["sgd update"]
  print(f"  {model_name} sgd train step (batch {batch_size}): "
        f"{step * 1e3:.1f} ms; sgd update {base * 1e3:.2f} ms")
  shares = {}
  for name in solvers:
    if name != "sgd":
      extra = median[f"{name} update"] - base
      shares[name] = extra / step
      print(f"  {name:28s} update {extra * 1e3:+8.2f} ms = "
            f"{100 * shares[name]:+.2f} % of the step")
  return shares


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true",
                      help="tiny model and few rounds (a smoke test)")
  parser.add_argument("--model", default="resnet18", choices=_models.MODELS)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--calls", type=int, default=3,
                      help="updates (or steps) per timer per round")
  parser.add_argument("--step", action="store_true",
                      help="also give each solver's share of a train step "
                      "(part 2)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--out", default=None, help="write a JSON here")
  args = parser.parse_args(argv)
  if args.tiny:
    args.rounds, args.calls, args.batch_size = 2, 1, 4
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"{args.model}{' (tiny)' if args.tiny else ''} conv kernels; median "
        f"of {args.rounds} interleaved rounds of {args.calls} calls")
  rows = solver_rows(args.model, args.tiny, args.rounds, args.calls)
  print(solver_table(rows))
  ratios = {r["timer"]: r["x_floor"] for r in rows}
  if args.step or args.tiny:
    shares = step_shares(args.model, args.tiny, args.batch_size, args.rounds,
                         args.calls)
    # Shares may be negative (noise); the smoke test wants positive ratios.
    ratios.update({f"1 + share {k}": 1 + v for k, v in shares.items()})
  if args.out:
    _report.write_json(args.out, {"environment": _report.environment(),
                                  "rows": rows, "ratios": ratios})
  return ratios


if __name__ == "__main__":
  main()
