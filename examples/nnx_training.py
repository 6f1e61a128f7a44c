"""Flax NNX: learned SGS and CDG with `nnx.Optimizer` on scikit-learn's digits.

Run: python -m examples.nnx_training [--epochs 6] [--refresh-every 2] [--tiny]

The transforms go into the optax chain as usual; every few epochs the conv
inputs of two training batches are captured (in eval mode) and the SGS
matrices inside the optimizer state are refreshed from them.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import sgs_optax


class CNN(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.norm1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.norm2 = nnx.BatchNorm(32, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm1(self.conv1(x)))
    x = nnx.relu(self.norm2(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


def refresh(model: nnx.Module, optimizer: nnx.Optimizer, batch) -> None:
  """Recomputes the SGS matrices inside an `nnx.Optimizer` in place."""
  captured = sgs_optax.capture_conv_inputs(model, batch)
  sgs_optax.refresh_scalings(optimizer.opt_state, captured)


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--refresh-every", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  x_train, x_test, y_train, y_test = train_test_split(
      images, digits.target.astype(np.int32), test_size=0.2,
      stratify=digits.target, random_state=args.seed)
  if args.tiny:
    x_train, y_train, args.epochs = x_train[:256], y_train[:256], 1

  model = CNN(nnx.Rngs(args.seed))
  tx = optax.chain(sgs_optax.cdg(), sgs_optax.sgs(),
                   optax.add_decayed_weights(5e-4),
                   optax.sgd(0.05, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(args.seed)
  steps = len(x_train) // args.batch_size
  for epoch in range(args.epochs):
    order = rng.permutation(len(x_train))
    if epoch % args.refresh_every == 0:
      refresh(model, optimizer, x_train[order[:2 * args.batch_size]])
    for i in range(steps):
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      loss = train_step(model, optimizer, x_train[idx], y_train[idx])
    print(f"epoch {epoch}: loss {float(loss):.4f}")
  model.eval()
  accuracy = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
  scalings = sgs_optax.get_scalings(nnx.as_pure(optimizer.opt_state))
  for name in ("conv1", "conv2"):
    print(f"{name} SGS matrix:\n{np.round(np.asarray(scalings[name]['kernel']), 3)}")
  print(f"test accuracy {accuracy:.4f}")
  return accuracy, scalings


if __name__ == "__main__":
  main(sys.argv[1:])
