"""Adam-family optimizers: CDG before the optimizer, SGS after its direction.

Run: python -m examples.adam_training [--epochs 10] [--seed 0] [--tiny]

Adam divides a constant per-position gradient scale out again
(``m / sqrt(v)``), so SGS placed before Adam is nearly a no-op: its run ends
where plain ``adamw`` does. Placed after Adam's direction and before the
decoupled weight decay and the learning rate, the ACB matrix
``[[1, 2, 1], [2, 3, 2], [1, 2, 1]]`` makes the chain, CDG aside, exactly
AdamW on the ACB branched network (3x3 + 1x3 + 3x1, unit scalars;
docs/placement.md): each tap's step times its count of branches, 5/3 on
average. CDG goes on the raw gradient, before everything.

Expected output (default mode, 10 epochs, about 20 s on 2 idle CPU cores).
SGS before Adam ends where ``adamw`` does, as said; the exact chain learns as
well as ``adamw`` (two test digits apart, within one seed's noise)::

  adamw               test accuracy 0.975
  sgs(acb)+adamw      test accuracy 0.975
  cdg+adamw+sgs(acb)  test accuracy 0.981
"""

from __future__ import annotations

import sys

import optax

from examples import classify
from examples import data
from examples import models
import sgs_optax


def optimizers(learning_rate: float = 3e-3, weight_decay: float = 1e-4
               ) -> dict[str, optax.GradientTransformation]:
  """The baseline, SGS misplaced before Adam, and the exact chain."""
  adamw = lambda: optax.adamw(learning_rate, weight_decay=weight_decay)
  return {
      "adamw": adamw(),
      "sgs(acb)+adamw": optax.chain(sgs_optax.sgs("acb"), adamw()),
      "cdg+adamw+sgs(acb)": optax.chain(
          sgs_optax.cdg(),                   # before: smooths the gradient
          optax.scale_by_adam(),             # Adam's direction
          sgs_optax.sgs("acb"),              # after it: scales the direction
          optax.add_decayed_weights(weight_decay),  # decay, unscaled
          optax.scale_by_learning_rate(learning_rate),
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
