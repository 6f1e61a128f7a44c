"""Adam-family optimizers: CDG goes before the optimizer, SGS after it.

Run: python -m examples.adam_training [--epochs 10] [--seed 0] [--tiny]

Adam divides a constant per-position gradient scale out again
(``m / sqrt(v)``), so SGS placed before Adam is nearly a no-op: its run ends
where plain ``adamw`` does. After Adam, SGS scales the update instead: a
per-position learning rate. There it is used with ``normalize=True``, which
divides the ACB matrix ``[[1, 2, 1], [2, 3, 2], [1, 2, 1]]`` by its mean 5/3,
so that the kernels' mean learning rate stays ``adamw``'s and the comparison
is at equal step size (unnormalised, SGS after Adam would multiply the
learning rate of each kernel by 5/3 on average, up to 3 at the centre).

Expected output (default mode, 10 epochs, about 20 s on 2 CPU cores). SGS
before Adam ends where ``adamw`` does, as said; the recommended chain learns
as well as ``adamw``, and the digits are too easy for it to do better::

  adamw               test accuracy 0.975
  sgs(acb)+adamw      test accuracy 0.975
  cdg+adamw+sgs(acb)  test accuracy 0.975
"""

from __future__ import annotations

import sys

import optax

import sgs_optax
from examples import classify
from examples import data
from examples import models


def optimizers(
    learning_rate: float = 3e-3) -> dict[str, optax.GradientTransformation]:
  """The baseline, SGS misplaced before Adam, and the recommended chain."""
  adamw = lambda: optax.adamw(learning_rate, weight_decay=1e-4)
  return {
      "adamw": adamw(),
      "sgs(acb)+adamw": optax.chain(sgs_optax.sgs("acb"), adamw()),
      "cdg+adamw+sgs(acb)": optax.chain(
          sgs_optax.cdg(),                       # before: smooths the gradient
          adamw(),
          sgs_optax.sgs("acb", normalize=True),  # after: scales the update
      ),
  }


def main(argv=None) -> dict[str, float]:
  args = data.parser(__doc__, epochs=10).parse_args(argv)
  split, epochs = data.from_args(args)
  results = {}
  for name, tx in optimizers().items():
    results[name], _ = classify.fit(models.CNN(), tx, split, epochs=epochs,
                                    batch_size=32, seed=args.seed)
    print(f"{name:<20}test accuracy {results[name]:.3f}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
