"""Equinox: learned SGS and CDG on OIHW conv weights, against plain SGD.

Run: python -m examples.equinox_training [--epochs 8] [--tiny]

Equinox convs store PyTorch-style ``(C_out, C_in, kh, kw)`` weights:
``sgs_optax.conv_layouts`` reads that from the model (``"OIHW"`` for each conv
weight, ``None`` for the biases and the linear head), and both transforms get
that tree as ``kernel_layout``. The optimizer works on
``eqx.filter(model, eqx.is_array)``; the conv inputs are captured with the
plain-function form of ``capture_conv_inputs`` (the model is called per
example, so the function vmaps it), keyed like that same filtered model.

Expected output (default mode, 2 CPU cores, under a minute; the digits are
too easy for the two to differ by more than seed noise)::

  sgd                 test accuracy 0.956
  cdg+sgs (learned)   test accuracy 0.961
"""

from __future__ import annotations

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples import data
import sgs_optax


class CNN(eqx.Module):
  """Two 3x3 convs (OIHW) and a linear head, for 8x8 single-channel images."""

  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key: jax.Array):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1)
    self.conv2 = eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=k2)
    self.head = eqx.nn.Linear(32 * 4 * 4, 10, key=k3)

  def __call__(self, x: jax.Array) -> jax.Array:  # one (1, 8, 8) image.
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return self.head(x.reshape(-1))


def batched(model: CNN, x: jax.Array) -> jax.Array:
  return jax.vmap(model)(x)


def make_tx(method: str, lr: float,
            layouts: object) -> optax.GradientTransformation:
  sgd = (optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))
  if method == "sgd":
    return optax.chain(*sgd)
  return optax.chain(sgs_optax.cdg(kernel_layout=layouts),
                     sgs_optax.sgs(kernel_layout=layouts), *sgd)


def train(method: str, split: data.Split, *, epochs: int, batch_size: int,
          seed: int) -> tuple[float, optax.OptState]:
  """Trains one model; returns its test accuracy and optimizer state."""
  model = CNN(jax.random.key(seed))
  params, static = eqx.partition(model, eqx.is_array)
  # Traced on one abstract image: each conv weight's layout, from the model.
  layouts = sgs_optax.conv_layouts(model, jax.ShapeDtypeStruct((1, 8, 8),
                                                               jnp.float32))
  tx = make_tx(method, 0.05, layouts)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = batched(eqx.combine(p, static), x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def refresh(params, opt_state, x):
    captured = sgs_optax.capture_conv_inputs(
        lambda p, x: batched(eqx.combine(p, static), x), params, x)
    return sgs_optax.refresh_scalings(opt_state, captured)

  x_train = np.transpose(split.x_train, (0, 3, 1, 2))  # NCHW for Equinox.
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    batches = data.batches(len(x_train), batch_size, rng)
    if method != "sgd":
      opt_state = refresh(params, opt_state,
                          x_train[np.concatenate(batches[:2])])
    for idx in batches:
      params, opt_state = step(params, opt_state, x_train[idx],
                               split.y_train[idx])
  logits = batched(eqx.combine(params, static),
                   np.transpose(split.x_test, (0, 3, 1, 2)))
  return float(jnp.mean(jnp.argmax(logits, -1) == split.y_test)), opt_state


def main(argv=None) -> dict[str, tuple[float, optax.OptState]]:
  parser = data.parser(__doc__, epochs=8)
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args(argv)
  split, epochs = data.from_args(args)
  results = {}
  for method, label in (("sgd", "sgd"), ("cdg+sgs", "cdg+sgs (learned)")):
    results[method] = train(method, split, epochs=epochs,
                            batch_size=args.batch_size, seed=args.seed)
    print(f"{label:<20}test accuracy {results[method][0]:.3f}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
