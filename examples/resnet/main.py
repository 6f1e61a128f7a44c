"""Train a CIFAR-style ResNet (Flax linen) with SGD and learned SGS, resumably.

Run::

  python -m examples.resnet.main                      # 20 epochs, ~1 min
  python -m examples.resnet.main --tiny               # seconds, for tests
  python -m examples.resnet.main --checkpoint-dir /tmp/ckpt [--resume]
  python -m examples.resnet.main --sgs acb --no-baseline

It trains the plain SGD baseline, then the same recipe with SGS (learned by
default: the recipe of Detkov et al., 2023, see ``train.py``), on
scikit-learn's digits, and prints both test accuracies and the learned
matrices. The whole train state (params, BatchNorm statistics, optimizer state
with the SGS matrices, step, keys and refresh counter) is checkpointed with
orbax in ``<checkpoint-dir>/<sgs mode>``, so an interrupted run resumed with
``--resume`` ends bit-identical to an uninterrupted one.

Expected output (default mode, about a minute on 2 CPU cores; the digits are
too easy for learned SGS to beat the baseline by more than seed noise)::

  sgd
    epoch   5: loss 0.1686, test accuracy 0.972
    epoch  10: loss 0.0349, test accuracy 0.986
    epoch  15: loss 0.0184, test accuracy 0.986
    epoch  20: loss 0.0131, test accuracy 0.992
  sgd + learned sgs
    epoch   5: loss 0.1518, test accuracy 0.939
    epoch  10: loss 0.0560, test accuracy 0.981
    epoch  15: loss 0.0197, test accuracy 0.989
    epoch  20: loss 0.0171, test accuracy 0.992
  sgd                  test accuracy 0.992 after 440 steps, 0 refreshes
  sgd + learned sgs    test accuracy 0.992 after 440 steps, 20 refreshes
  SGS matrices, by conv:
    stage1_block1/conv1  [[0.32 1.02 0.39] [0.73 4.08 0.73] [0.39 1.02 0.32]]
    stage1_block1/conv2  [[0.16 0.87 0.44] [0.81 4.44 0.81] [0.44 0.87 0.16]]
    stage2_block1/conv1  [[0.23 0.88 0.49] [0.89 4.02 0.89] [0.49 0.88 0.23]]
    stage2_block1/conv2  [[0.33 0.57 0.36] [0.51 5.45 0.51] [0.36 0.57 0.33]]
    stage3_block1/conv1  [[0.34 0.60 0.36] [0.76 4.89 0.76] [0.36 0.60 0.34]]
    stage3_block1/conv2  [[0.44 0.50 0.41] [0.62 5.07 0.62] [0.41 0.50 0.44]]
    stem                 [[0.36 1.12 0.41] [1.00 3.22 1.00] [0.41 1.12 0.36]]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import os
import sys
from typing import Any

import jax
import numpy as np

from examples.resnet import config as config_lib
from examples.resnet import input_pipeline
from examples.resnet import train
import sgs_optax


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The flags, one per :class:`config_lib.Config` field, and the run's own."""
  defaults = config_lib.get_config()
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add = parser.add_argument
  add("--epochs", type=int, default=defaults.epochs)
  add("--batch-size", type=int, default=defaults.batch_size)
  add("--lr", type=float, default=defaults.learning_rate,
      help="peak learning rate (cosine decay)")
  add("--momentum", type=float, default=defaults.momentum)
  add("--wd", type=float, default=defaults.weight_decay,
      help="coupled weight decay")
  add("--sgs", choices=config_lib.SGS_MODES, default=defaults.sgs)
  add("--sgs-epochs", type=int, default=None,
      help="refresh period (default max(1, round(epochs / 20)))")
  add("--sgs-batches", type=int, default=defaults.sgs_batches)
  add("--width", type=int, default=defaults.width)
  add("--blocks", type=int, nargs="+", default=list(defaults.blocks))
  add("--no-augment", action="store_true")
  add("--num-train", type=int, help="use only the first N training images")
  add("--num-test", type=int, help="use only the first N test images")
  add("--seed", type=int, default=defaults.seed)
  add("--prng-impl", default=defaults.prng_impl,
      help="rbg, unsafe_rbg or threefry2x32")
  add("--checkpoint-dir", help="one subdirectory per run")
  add("--checkpoint-every", type=int, default=0,
      help="steps between checkpoints (0: every epoch)")
  add("--resume", action="store_true",
      help="continue from the latest checkpoint, if any")
  add("--stop-after", type=int, help="stop after N steps (with a checkpoint)")
  add("--no-baseline", action="store_true", help="skip the plain SGD run")
  add("--log-every", type=int, default=5, help="epochs between log lines")
  add("--tiny", action="store_true",
      help="seconds, for tests: get_tiny_config()'s epochs, batch size, "
      "width and training images override the flags")
  return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> config_lib.Config:
  """The run the flags describe."""
  config = config_lib.Config(
      epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
      momentum=args.momentum, weight_decay=args.wd, sgs=args.sgs,
      sgs_epochs=args.sgs_epochs, sgs_batches=args.sgs_batches,
      width=args.width, blocks=tuple(args.blocks), num_train=args.num_train,
      num_test=args.num_test, augment=not args.no_augment, seed=args.seed,
      prng_impl=args.prng_impl, checkpoint_dir=args.checkpoint_dir,
      checkpoint_every=args.checkpoint_every, resume=args.resume,
      stop_after=args.stop_after)
  if not args.tiny:
    return config
  tiny = config_lib.get_tiny_config()
  return dataclasses.replace(config, **{
      f: getattr(tiny, f) for f in ("epochs", "batch_size", "width",
                                    "num_train")})


def run(config: config_lib.Config, split, log_every: int) -> dict[str, Any]:
  """Trains one run (in its own checkpoint subdirectory) and evaluates it."""
  label = "sgd" if config.sgs == "none" else f"sgd + {config.sgs} sgs"
  if config.checkpoint_dir is not None:
    config = dataclasses.replace(
        config, checkpoint_dir=os.path.join(config.checkpoint_dir, config.sgs))
  print(label)
  state = train.train_and_evaluate(
      config, data=split, log=lambda line: print("  " + line),
      log_every=log_every)
  return {"label": label, "accuracy": train.evaluate(config, state, split),
          "step": int(state.step), "refresh_count": int(state.refresh_count),
          "state": state}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the baseline and the SGS run; returns the SGS run's results.

  The baseline's results are under the key ``"baseline"`` (absent with
  ``--no-baseline`` or ``--sgs none``).
  """
  args = parse_args(argv)
  config = config_from_args(args)
  split = input_pipeline.load(config)
  configs = [config]
  if config.sgs != "none" and not args.no_baseline:
    configs.insert(0, dataclasses.replace(config, sgs="none"))
  runs = [run(c, split, args.log_every) for c in configs]
  for result in runs:
    print(f"{result['label']:<20} test accuracy {result['accuracy']:.3f} "
          f"after {result['step']} steps, {result['refresh_count']} "
          "refreshes")
  if config.sgs != "none":
    scalings = sgs_optax.get_scalings(runs[-1]["state"].opt_state)
    print("SGS matrices, by conv:")
    for path, matrix in jax.tree_util.tree_leaves_with_path(scalings):
      name = jax.tree_util.keystr(path[:-1], simple=True, separator="/")
      row = np.array2string(np.asarray(matrix), max_line_width=200,
                            formatter={"float_kind": "{:.2f}".format})
      row = row.replace("\n", "")
      print(f"  {name:<20} {row}")
  results = runs[-1]
  if len(runs) == 2:
    results["baseline"] = runs[0]
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
