"""Train a small Flax CNN on scikit-learn's digits with SGD, then with SGS.

Run: python -m examples.quickstart [--epochs 8] [--seed 0] [--tiny]
Prints the final test accuracy of plain SGD and of SGD with the ACB preset.
"""

from __future__ import annotations

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import sgs_optax


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def load(seed):
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  return train_test_split(images, digits.target.astype(np.int32),
                          test_size=0.2, stratify=digits.target,
                          random_state=seed)


def train(tx, data, *, epochs, batch_size, seed):
  x_train, x_test, y_train, y_test = data
  model = CNN()
  key, init_key = jax.random.split(jax.random.key(seed))
  params = model.init(init_key, x_train[:1])["params"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(epochs):
    key, perm_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(perm_key, len(x_train)))
    for i in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      params, opt_state = step(params, opt_state, x_train[idx], y_train[idx])
  logits = model.apply({"params": params}, x_test)
  return float(jnp.mean(jnp.argmax(logits, -1) == y_test))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tiny", action="store_true",
                      help="one epoch on 200 images, for smoke tests")
  args = parser.parse_args(argv)
  data = load(args.seed)
  if args.tiny:
    data = [d[:200] for d in data]
    args.epochs = 1
  results = {}
  for name, first in (("sgd", optax.identity()),
                      ("sgd+sgs(acb)", sgs_optax.sgs("acb"))):
    tx = optax.chain(first, optax.add_decayed_weights(5e-4),
                     optax.sgd(0.05, momentum=0.9))
    results[name] = train(tx, data, epochs=args.epochs, batch_size=32,
                          seed=args.seed)
    print(f"{name:>14}: test accuracy {results[name]:.4f}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
