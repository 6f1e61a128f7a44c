r"""Per-step overhead of Channel-Directed Gradients on a small Flax CNN.

Times a full jitted train step (forward, backward, optimizer update, apply)
of ``optax.chain(cdg(...), optax.sgd(0.1, momentum=0.9))`` against plain
``optax.sgd(0.1, momentum=0.9)``, in one process, over interleaved rounds, and
reports the median step time of each and their ratio.

Run from the repository root::

  python -m benchmarks.cdg_overhead            # 3 convs (32, 64, 64 ch.)
  python -m benchmarks.cdg_overhead --tiny     # a seconds-long smoke run
  python -m benchmarks.cdg_overhead --rounds 30 --steps 20 --batch-size 32
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgs_optax._channel import cdg


class SmallCNN(nn.Module):
  """Three 3x3 convs with ReLU, global average pooling, a dense head."""

  features: Sequence[int] = (32, 64, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.relu(nn.Conv(f, (3, 3), strides=1 if i == 0 else 2)(x))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


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


def _seconds_per_call(fn: Callable[[], object], calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def run(
    features: Sequence[int],
    image_size: int,
    batch_size: int,
    rounds: int,
    steps: int,
    variants: dict[str, optax.GradientTransformation | None],
) -> dict[str, list[float]]:
  """Seconds per call of every timer, interleaved round by round.

  Timers: the full train step with ``chain(variant, sgd)`` (plain ``sgd`` for
  ``None``), and (``"... alone"``) the variant's update alone on a
  params-shaped gradient, which is much less noisy than a difference of whole
  steps.
  """
  sgd = lambda: optax.sgd(0.1, momentum=0.9)
  model = SmallCNN(tuple(features))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch_size, image_size, image_size, 3)),
                  jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch_size))
  params = model.init(jax.random.key(0), x[:1])["params"]
  timers = {}
  for name, transform in variants.items():
    tx = sgd() if transform is None else optax.chain(transform, sgd())
    step, opt_state = make_step(model, tx), tx.init(params)
    # The same state every call: steps are independent and equally costly.
    timers[name] = functools.partial(step, params, opt_state, x, y)
  for name, transform in variants.items():
    if transform is not None:
      update = jax.jit(lambda g, t=transform: t.update(g, t.init(g), g)[0])
      label = f"{name.removesuffix('+sgd')} alone"
      timers[label] = functools.partial(update, params)
  for fn in timers.values():
    _seconds_per_call(fn, 3)  # compile and warm up
  times = {name: [] for name in timers}
  for _ in range(rounds):
    for name, fn in timers.items():
      times[name].append(_seconds_per_call(fn, steps))
  return times


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true",
                      help="tiny model and few rounds (a smoke test)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--features", default="32,64,64")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args(argv)
  features = [int(f) for f in args.features.split(",")]
  if args.tiny:
    features, args.image_size, args.batch_size = [4, 8], 8, 4
    args.rounds, args.steps = 3, 2

  variants = {
      "sgd": None,
      "cdg()+sgd": cdg(),
      "cdg(boundary='neumann')+sgd": cdg(boundary="neumann"),
      "cdg(metric='reweighted_l2')+sgd": cdg(metric="reweighted_l2"),
  }
  times = run(features, args.image_size, args.batch_size, args.rounds,
              args.steps, variants)
  base = statistics.median(times["sgd"])
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; features "
        f"{features}, {args.image_size}x{args.image_size}x3, batch "
        f"{args.batch_size}; median of {args.rounds} interleaved rounds of "
        f"{args.steps} steps")
  ratios = {}
  for name, ts in times.items():
    med = statistics.median(ts)
    ratios[name] = med / base
    print(f"  {name:42s} {med * 1e3:8.3f} ms   x{ratios[name]:.3f}")
  return ratios


if __name__ == "__main__":
  main()
