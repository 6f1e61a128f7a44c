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

**Part 2 (``--step``): the whole train step** of a small Flax CNN (3 convs)
with ``optax.chain(cdg(solver=...), optax.sgd(0.1, momentum=0.9))`` against
plain ``optax.sgd(0.1, momentum=0.9)``, interleaved the same way.

Run from the repository root::

  python -m benchmarks.cdg_overhead                    # ResNet-18 kernels
  python -m benchmarks.cdg_overhead --model vgg11 --step
  python -m benchmarks.cdg_overhead --tiny             # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from collections.abc import Callable, Sequence

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


class SmallCNN(nn.Module):
  """Three 3x3 convs with ReLU, global average pooling, a dense head."""

  features: Sequence[int] = (32, 64, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.relu(nn.Conv(f, (3, 3), strides=1 if i == 0 else 2)(x))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


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


def make_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def step_ratios(features: Sequence[int], image_size: int, batch_size: int,
                rounds: int, steps: int) -> dict[str, float]:
  """Part 2: median step time of ``chain(cdg(solver), sgd)`` over ``sgd``."""
  variants = {"sgd": None, **{
      f"cdg(solver={s!r})+sgd": cdg(solver=s)
      for s in (None, "fft", "dense", "tridiagonal")}}
  model = SmallCNN(tuple(features))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch_size, image_size, image_size, 3)),
                  jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch_size))
  params = model.init(jax.random.key(0), x[:1])["params"]
  timers = {}
  for name, transform in variants.items():
    sgd = optax.sgd(0.1, momentum=0.9)
    tx = sgd if transform is None else optax.chain(transform, sgd)
    # The same state every call: steps are independent and equally costly.
    timers[name] = functools.partial(make_step(model, tx), params,
                                     tx.init(params), x, y)
  times = interleaved(timers, rounds, steps)
  base = statistics.median(times["sgd"])
  return {name: statistics.median(ts) / base for name, ts in times.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true",
                      help="tiny model and few rounds (a smoke test)")
  parser.add_argument("--model", default="resnet18", choices=_models.MODELS)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--calls", type=int, default=3,
                      help="updates (or steps) per timer per round")
  parser.add_argument("--step", action="store_true",
                      help="also time whole steps of a small CNN (part 2)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--out", default=None, help="write a JSON here")
  args = parser.parse_args(argv)
  features, image_size = (32, 64, 64), 32
  if args.tiny:
    args.rounds, args.calls, features, image_size = 2, 1, (4, 8), 8
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"{args.model}{' (tiny)' if args.tiny else ''} conv kernels; median "
        f"of {args.rounds} interleaved rounds of {args.calls} calls")
  rows = solver_rows(args.model, args.tiny, args.rounds, args.calls)
  print(solver_table(rows))
  ratios = {r["timer"]: r["x_floor"] for r in rows}
  if args.step or args.tiny:
    steps = step_ratios(features, image_size, args.batch_size, args.rounds,
                        args.calls)
    for name, ratio in steps.items():
      print(f"  step {name:36s} x{ratio:.3f}")
    ratios.update({f"step {k}": v for k, v in steps.items()})
  if args.out:
    _report.write_json(args.out, {"environment": _report.environment(),
                                  "rows": rows, "ratios": ratios})
  return ratios


if __name__ == "__main__":
  main()
