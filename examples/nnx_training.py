"""Flax NNX: learned SGS and CDG in an ``nnx.Optimizer``, against plain SGD.

Run: python -m examples.nnx_training [--epochs 10] [--refresh-every 2] [--tiny]

The transforms go into the optax chain as usual. Every few epochs the conv
inputs of two training batches are captured (``capture_conv_inputs`` runs an
``eval()`` copy of the model, so BatchNorm uses its running statistics) and
the SGS matrices inside the optimizer's state are refreshed in place.

Expected output (default mode, 10 epochs, about 20 s on 2 CPU cores; the
digits are too easy for the two to differ by more than seed noise)::

  sgd                 test accuracy 0.978
  cdg+sgs (learned)   test accuracy 0.975
  conv1 SGS matrix: [[0.37 1.03 0.44] [0.96 3.40 0.96] [0.44 1.03 0.37]]
  conv2 SGS matrix: [[0.40 1.12 0.38] [0.71 3.77 0.71] [0.38 1.12 0.40]]
"""

from __future__ import annotations

import sys

from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax

from examples import data
import sgs_optax


class CNN(nnx.Module):
  """Two 3x3 convs with BatchNorm and a linear head, for 8x8 images."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.norm1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.norm2 = nnx.BatchNorm(32, rngs=rngs)
    self.head = nnx.Linear(32 * 4 * 4, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm1(self.conv1(x)))
    x = nnx.relu(self.norm2(self.conv2(x)))
    return self.head(x.reshape(x.shape[0], -1))


def refresh(model: CNN, optimizer: nnx.Optimizer, batch: np.ndarray) -> None:
  """Recomputes the SGS matrices inside an `nnx.Optimizer` in place."""
  captured = sgs_optax.capture_conv_inputs(model, batch)
  sgs_optax.refresh_scalings(optimizer.opt_state, captured)


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  grads = nnx.grad(loss_fn)(model)
  optimizer.update(model, grads)


def train(tx: optax.GradientTransformation, split: data.Split, *, epochs: int,
          refresh_every: int | None, batch_size: int,
          seed: int) -> tuple[float, nnx.Optimizer]:
  """Trains a CNN; returns its test accuracy and its optimizer.

  ``refresh_every`` is the refresh period in epochs (``None``: never).
  """
  model = CNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    batches = data.batches(len(split.x_train), batch_size, rng)
    if refresh_every and epoch % refresh_every == 0:
      refresh(model, optimizer, split.x_train[np.concatenate(batches[:2])])
    for idx in batches:
      train_step(model, optimizer, split.x_train[idx], split.y_train[idx])
  model.eval()
  logits = model(split.x_test)
  return float(jnp.mean(jnp.argmax(logits, -1) == split.y_test)), optimizer


def main(argv=None) -> dict[str, tuple[float, nnx.Optimizer]]:
  parser = data.parser(__doc__, epochs=10)
  parser.add_argument("--refresh-every", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args(argv)
  split, epochs = data.from_args(args)
  sgd = (optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  runs = {"sgd": (optax.chain(*sgd), None),
          "cdg+sgs (learned)": (optax.chain(sgs_optax.cdg(), sgs_optax.sgs(),
                                            *sgd), args.refresh_every)}
  results = {}
  for name, (tx, refresh_every) in runs.items():
    results[name] = train(tx, split, epochs=epochs,
                          refresh_every=refresh_every,
                          batch_size=args.batch_size, seed=args.seed)
    print(f"{name:<20}test accuracy {results[name][0]:.3f}")
  scalings = sgs_optax.get_scalings(
      nnx.as_pure(results["cdg+sgs (learned)"][1].opt_state))
  for name in ("conv1", "conv2"):
    matrix = np.asarray(scalings[name]["kernel"])
    row = np.array2string(matrix, formatter={"float_kind": "{:.2f}".format})
    print(f"{name} SGS matrix: {row}".replace("\n", ""))
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
