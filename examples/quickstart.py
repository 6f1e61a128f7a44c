"""Quickstart: SGS with the ACB preset, against plain SGD, in Flax linen.

Run: python -m examples.quickstart [--epochs 20] [--seed 0] [--tiny]

``sgs_optax.sgs("acb")`` multiplies every 3x3 conv kernel's gradient by
``[[1, 2, 1], [2, 3, 2], [1, 2, 1]]``: training the conv so is exactly
training ACB's 3x3 + 1x3 + 3x1 branches and merging them, without the
branches. The baseline is the same chain without SGS, at the same learning
rate. The ACB matrix has mean 5/3, so with SGS the conv kernels take larger
steps on average, exactly as the branched network's do: that is part of what
the branches change.

Expected output (default mode, 20 epochs, about 15 s on 2 CPU cores; the
digits are too easy for the two to differ by more than seed noise, see
``python -m benchmarks.compare`` for a comparison over seeds)::

  sgd           test accuracy 0.975
  sgs(acb)+sgd  test accuracy 0.969
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sgs_optax
from examples import data
from examples import models


def train(tx: optax.GradientTransformation, split: data.Split, *,
          epochs: int, batch_size: int, seed: int) -> float:
  """Trains :class:`models.CNN` with ``tx``; returns its test accuracy."""
  model = models.CNN()
  params = model.init(jax.random.key(seed), split.x_train[:1])["params"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for idx in data.batches(len(split.x_train), batch_size, rng):
      params, opt_state = step(params, opt_state, split.x_train[idx],
                               split.y_train[idx])
  logits = model.apply({"params": params}, split.x_test)
  return float(jnp.mean(jnp.argmax(logits, -1) == split.y_test))


def main(argv=None) -> dict[str, float]:
  args = data.parser(__doc__, epochs=20).parse_args(argv)
  split, epochs = data.from_args(args)
  sgd = (optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  results = {}
  for name, tx in (("sgd", optax.chain(*sgd)),
                   ("sgs(acb)+sgd", optax.chain(sgs_optax.sgs("acb"), *sgd))):
    results[name] = train(tx, split, epochs=epochs, batch_size=32,
                          seed=args.seed)
    print(f"{name:<14}test accuracy {results[name]:.3f}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
