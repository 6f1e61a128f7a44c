"""Adam-family optimizers: SGS goes *after* the optimizer, CDG before it.

Run: python -m examples.adam_training [--epochs 6] [--tiny]

Adam divides a constant per-position gradient scale out again (m / sqrt(v)),
so SGS placed before Adam is nearly a no-op. After Adam it scales the update:
a per-position learning rate. This script trains a small CNN on digits with
`adamw` and with `chain(cdg, adamw, sgs("acb"))` and prints both accuracies.
"""

from __future__ import annotations

import argparse
import sys

import optax

import sgs_optax
from examples import quickstart


def optimizers(learning_rate: float = 3e-3) -> dict[str, optax.GradientTransformation]:
  return {
      "adamw": optax.adamw(learning_rate, weight_decay=1e-4),
      "cdg+adamw+sgs(acb)": optax.chain(
          sgs_optax.cdg(),                        # before: smooths the gradient
          optax.adamw(learning_rate, weight_decay=1e-4),
          sgs_optax.sgs("acb", normalize=True),   # after: scales the update
      ),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  data = quickstart.load(args.seed)
  if args.tiny:
    data, args.epochs = [d[:200] for d in data], 1
  results = {}
  for name, tx in optimizers().items():
    results[name] = quickstart.train(tx, data, epochs=args.epochs,
                                     batch_size=32, seed=args.seed)
    print(f"{name:>20}: test accuracy {results[name]:.4f}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
