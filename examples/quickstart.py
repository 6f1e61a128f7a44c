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

import optax

from examples import classify
from examples import data
from examples import models
import sgs_optax


def main(argv=None) -> dict[str, float]:
  args = data.parser(__doc__, epochs=20).parse_args(argv)
  split, epochs = data.from_args(args)
  sgd = (optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  results = {}
  for name, tx in (("sgd", optax.chain(*sgd)),
                   ("sgs(acb)+sgd", optax.chain(sgs_optax.sgs("acb"), *sgd))):
    results[name], _ = classify.fit(models.CNN(), tx, split, epochs=epochs,
                                    batch_size=32, seed=args.seed)
    print(f"{name:<14}test accuracy {results[name]:.3f}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
