r"""Compares SGS, CDG and their baselines on one dataset and model, paired.

Run from the repository root::

  python -m benchmarks.compare            # digits, small VGG, all, tuned lr
  python -m benchmarks.compare --no-tune  # the families' default lr only
  python -m benchmarks.compare --methods sgs-acb,cdg --seeds 5
  python -m benchmarks.compare --recipe cifar100-vgg11 --data-dir DIR

Methods (``--methods``, comma separated or ``all``; by default all but the
two ``adamw+sgs-learned`` ones; the baselines they need, ``sgd`` or
``adamw``, are added when left out):

==========================  ==================================================
``sgd``                     SGD, momentum 0.9, coupled weight decay, cosine
                            schedule (``chain(add_decayed_weights(wd),
                            sgd(lr, 0.9))``)
``sgs-acb``                 ``chain(sgs("acb"), add_decayed_weights, sgd)``
``sgs-repvgg``              ``chain(sgs("repvgg"), add_decayed_weights, sgd)``
``sgs-learned``             ``chain(sgs(None), ...)``, matrices refreshed from
                            mutual information (``capture_conv_inputs`` +
                            ``refresh_scalings`` on ``--refresh-batches``
                            training batches) at epoch 0 and every
                            ``--refresh-every`` epochs
``cdg``                     ``chain(cdg(), add_decayed_weights, sgd)``
``cdg+sgs-learned``         ``chain(sgs(None), cdg(), add_decayed_weights,
                            sgd)``
``acb-branched``            the model built with ACB ``BranchedConv`` s, plain
                            SGD, started from the plain model's weights (extra
                            branches zero); evaluated after merging into the
                            plain model; exactly ``sgs-acb``, so it takes
                            ``sgs-acb``'s learning rate (below)
``repvgg-branched``         the same with RepVGG (KxK + 1x1) branches (and
                            ``sgs-repvgg``'s learning rate)
``adamw``                   ``optax.adamw`` with the cosine schedule (baseline
                            of:)
``adamw+sgs``               ``chain(scale_by_adam, sgs("acb"),
                            add_decayed_weights, scale_by_learning_rate)``:
                            exactly AdamW on the ACB branched network (SGS
                            after the direction, before the decoupled decay)
``adamw+sgs-learned``       the same with ``sgs(None)`` refreshed as in
                            ``sgs-learned``, the learned matrix applied as is
``adamw+sgs-learned-sqrt``  the same, applying the learned matrix's
                            elementwise square root (the per-tap
                            reparameterization's multiplier after a
                            scale-invariant direction)
==========================  ==================================================

Paired seeds: for a seed, every method starts from the same weights and sees
the same batches and augmentation, so the per-seed difference to the baseline
removes their shared noise; the table gives its mean and a 95% t-interval
and calls a method better or worse only where the interval excludes 0.

Tuning (``--tune``, the default on the embedded digits; ``--no-tune`` skips
it): per method, ``--tune-grid`` learning rates spaced by
``--tune-factor`` around its family's default, each trained for the full
schedule with ``--tune-seeds`` seeds on the training split minus a held-out,
stratified validation split, and scored by its final-epoch validation loss
(mean cross-entropy); of the rates within ``--tune-tolerance`` (15%) of the
lowest loss, the one nearest the default wins (``benchmarks/_stats.py``
says why the loss, not the accuracy, and why a tolerance). A
branched network reuses the search of the SGS method it equals exactly
(``tuned_as`` in the JSON), so the two never split on rounding. The final
seeds then train on the whole training split at the chosen rate and are
scored on the test split, which no choice ever sees.

Recipes (``--recipe``): the SGS paper's CIFAR protocols (see
``benchmarks/_recipes.py``), with a JSON line per epoch, orbax checkpoints
after every epoch (a rerun of the same command resumes), and the authors'
published figures beside ours.

The reported accuracy is the FINAL epoch's (never the best epoch). Data are
preloaded on the device; batches are gathered, augmented and normalised
inside ``jit``. At the start the job prints its measured images/s and the
projected training time.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

from benchmarks import _checkpoint
from benchmarks import _data
from benchmarks import _methods
from benchmarks import _models
from benchmarks import _recipes
from benchmarks import _report
from benchmarks import _stats
from benchmarks import _summary
from benchmarks import _train

# Kept importable from here (benchmarks.overhead uses them).
Hyper = _methods.Hyper
Method = _methods.Method
METHODS = _methods.METHODS
sgd_chain = _methods.sgd_chain

# Default epochs and batch size per dataset. The digits default (all methods x
# 3 seeds) is sized to finish in a few minutes on a busy 2-core CPU.
DEFAULT_EPOCHS = {"digits": 15, "mnist": 10, "fashion_mnist": 20,
                  "cifar10": 200, "cifar100": 200}
DEFAULT_BATCH_SIZE = {"digits": 64}
TINY = {"train": 192, "test": 96, "epochs": 2, "batch_size": 32, "seeds": 1,
        "prng_impl": "rbg"}
# Merged vs branched logits must agree to this relative tolerance (float32).
MERGE_RTOL = 1e-4
# Settings that determine a run: a checkpoint written with others is refused.
RUN_SETTINGS = ("dataset", "model", "width", "epochs", "batch_size",
                "momentum", "weight_decay", "adamw_weight_decay", "augment",
                "refresh_every", "refresh_batches", "prng_impl", "tiny",
                "split_seed", "val_fraction", "mock_data")


def _add_training_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dataset", default=None, choices=_data.DATASETS,
                 help="default: digits (or the recipe's)")
  p.add_argument("--model", default=None, choices=_models.MODELS,
                 help="default: small_vgg (or the recipe's)")
  p.add_argument("--width", type=int, default=None,
                 help="first conv width; default small_vgg 16, VGG and "
                 f"ResNet 64, {_models.TINY_WIDTH} with --tiny")
  p.add_argument("--epochs", type=int, default=None,
                 help=f"default per dataset: {DEFAULT_EPOCHS}")
  p.add_argument("--batch-size", type=int, default=None,
                 help="default 64 on digits, 128 otherwise")
  p.add_argument("--seeds", type=int, default=None,
                 help="number of final seeds (0..N-1); default 3 (1 with "
                 "--tiny)")
  p.add_argument("--methods", default=None,
                 help=f"comma list of {', '.join(METHODS)}, or all; "
                 f"default: {', '.join(_methods.DEFAULT_METHODS)} (a "
                 "recipe: sgd,sgs-learned)")
  p.add_argument("--lr", type=float, default=None,
                 help="SGD-family peak learning rate (the tuning grid's "
                 "centre); default 0.1 * batch_size / 128")
  p.add_argument("--momentum", type=float, default=0.9,
                 help="SGD momentum; default 0.9")
  p.add_argument("--weight-decay", type=float, default=5e-4,
                 help="coupled L2 (add_decayed_weights) of the SGD methods; "
                 "default 5e-4")
  p.add_argument("--adamw-lr", type=float, default=None,
                 help="AdamW peak learning rate; default 1e-3 * "
                 "batch_size / 128")
  p.add_argument("--adamw-weight-decay", type=float, default=5e-2,
                 help="AdamW's decoupled weight decay; default 0.05")
  p.add_argument("--augment", default=None, choices=("auto", "on", "off"),
                 help="random crop + flip; default auto: on for CIFAR only")
  p.add_argument("--refresh-every", type=int, default=None,
                 help="learned SGS: refresh every N epochs; default "
                 "max(1, round(epochs / 20)) (a recipe: the paper's)")
  p.add_argument("--refresh-batches", type=int, default=None,
                 help="learned SGS: batches per refresh; default 2")


def _add_job_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--recipe", default=None, choices=_recipes.RECIPES,
                 help="the SGS paper's protocol for a CIFAR dataset and model")
  p.add_argument("--tune", default=None, action=argparse.BooleanOptionalAction,
                 help="tune each method's learning rate on a validation "
                 "split first; default on for the embedded digits (the "
                 "whole job about 5 minutes on 2 CPU cores), off with "
                 "--tiny, a recipe or another dataset")
  p.add_argument("--tune-grid", type=int, default=5,
                 help="learning rates per method; default 5")
  p.add_argument("--tune-factor", type=float, default=3.0,
                 help="ratio of neighbouring grid values; default 3 (5 "
                 "values span 81x)")
  p.add_argument("--tune-seeds", type=int, default=1,
                 help="seeds per tuning trial; default 1")
  p.add_argument("--tune-tolerance", type=float,
                 default=_stats.TIE_TOLERANCE,
                 help="validation losses within this fraction of the lowest "
                 "tie (the tie goes to the rate nearest the default); "
                 f"default {_stats.TIE_TOLERANCE:g}, 0: the lowest loss wins")
  p.add_argument("--val-fraction", type=float, default=None,
                 help="share of the training split held out for tuning; "
                 "default 0.2 on digits, 0.1 otherwise")
  p.add_argument("--data-dir", default=None,
                 help="tfds data_dir with ArrayRecord files (never downloads)")
  p.add_argument("--mock-data", type=int, default=0, metavar="N",
                 help="offline plumbing check: N random examples per split "
                 "from tfds.testing.mock_data (accuracies mean nothing)")
  p.add_argument("--split-seed", type=int, default=0,
                 help="seed of the digits train/test split and of the "
                 "validation split; default 0")
  p.add_argument("--prng-impl", default=None,
                 choices=("threefry2x32", "rbg", "unsafe_rbg"),
                 help="jax.random.key implementation; default threefry2x32 "
                 "(rbg with --tiny: much faster to compile on CPU)")
  p.add_argument("--out", default=None,
                 help="JSON results; default results/compare.json (a recipe: "
                 "results/RECIPE.json; '' to skip)")
  p.add_argument("--plot", default=None,
                 help="PNG figure; default next to --out ('' to skip)")
  p.add_argument("--epoch-log", default=None,
                 help="append a JSON line per epoch here; default off (a "
                 "recipe: results/RECIPE.epochs.jsonl)")
  p.add_argument("--checkpoint-dir", default=None,
                 help="orbax checkpoints per run, resumed on a rerun; "
                 "default off (a recipe: results/RECIPE.ckpt)")
  p.add_argument("--checkpoint-every", type=int, default=1,
                 help="save every N epochs; default 1")
  p.add_argument("--dry-run", action="store_true",
                 help="load, compile, measure images/s and the projected "
                 "time, then stop")
  p.add_argument("--tiny", action="store_true",
                 help=f"smoke test: tiny model and data subset {TINY}")
  p.add_argument("--no-progress", action="store_true",
                 help="no tqdm progress bars (they only show on a terminal)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.compare", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_training_args(p)
  _add_job_args(p)
  args = p.parse_args(argv)
  try:
    _apply_recipe(args)
    _fill_defaults(args)
  except ValueError as e:
    p.error(str(e))
  return args


def _apply_recipe(args: argparse.Namespace) -> None:
  """Recipe values fill whatever was not given on the command line."""
  if args.recipe is None:
    args.dataset = args.dataset or "digits"
    args.model = args.model or "small_vgg"
    return
  recipe = _recipes.RECIPES[args.recipe]
  for name in ("dataset", "model"):
    if getattr(args, name) not in (None, getattr(recipe, name)):
      raise ValueError(f"--recipe {recipe.name} fixes --{name} "
                       f"{getattr(recipe, name)}")
  stem = f"results/{recipe.name}" + (".tiny" if args.tiny else "")
  defaults = {
      "dataset": recipe.dataset, "model": recipe.model,
      "epochs": None if args.tiny else recipe.epochs,
      "batch_size": None if args.tiny else recipe.batch_size,
      "lr": None if args.tiny else recipe.lr, "augment": recipe.augment,
      "refresh_every": recipe.refresh_every,
      "refresh_batches": recipe.refresh_batches,
      "methods": ",".join(recipe.methods), "out": f"{stem}.json",
      "epoch_log": f"{stem}.epochs.jsonl", "checkpoint_dir": f"{stem}.ckpt"}
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)


def _fill_defaults(args: argparse.Namespace) -> None:
  tiny = args.tiny
  if args.width is None:
    args.width = (_models.TINY_WIDTH if tiny else
                  _models.DEFAULT_WIDTH[args.model])
  if args.epochs is None:
    args.epochs = TINY["epochs"] if tiny else DEFAULT_EPOCHS[args.dataset]
  if args.batch_size is None:
    args.batch_size = (TINY["batch_size"] if tiny else
                       DEFAULT_BATCH_SIZE.get(args.dataset, 128))
  if args.prng_impl is None:
    args.prng_impl = TINY["prng_impl"] if tiny else "threefry2x32"
  if args.seeds is None:
    args.seeds = TINY["seeds"] if tiny else 3
  if args.lr is None:
    args.lr = 0.1 * args.batch_size / 128
  if args.adamw_lr is None:
    args.adamw_lr = 1e-3 * args.batch_size / 128
  if args.tune is None:
    args.tune = args.dataset == "digits" and not tiny and not args.recipe
  if args.val_fraction is None:
    args.val_fraction = _data.VALIDATION_FRACTION.get(
        args.dataset, _data.DEFAULT_VALIDATION_FRACTION)
  if args.refresh_every is None:
    args.refresh_every = max(1, round(args.epochs / 20))
  args.refresh_batches = args.refresh_batches or 2
  augment = args.augment or "auto"
  args.augment = augment == "on" or (
      augment == "auto" and args.dataset.startswith("cifar"))
  for name, default in (("out", "results/compare.json"), ("epoch_log", ""),
                        ("checkpoint_dir", "")):
    if getattr(args, name) is None:
      setattr(args, name, default)
  if args.plot is None:
    args.plot = os.path.splitext(args.out)[0] + ".png" if args.out else ""
  _parse_methods(args)
  if min(args.epochs, args.batch_size, args.seeds, args.tune_grid,
         args.tune_seeds) < 1:
    raise ValueError("--epochs, --batch-size, --seeds, --tune-grid and "
                     "--tune-seeds must be positive")
  if args.tune_tolerance < 0:
    raise ValueError("--tune-tolerance must be >= 0")
  if args.mock_data and args.dataset == "digits":
    raise ValueError("--mock-data is for the tfds datasets")


def _parse_methods(args: argparse.Namespace) -> None:
  if args.methods is None:
    names = list(_methods.DEFAULT_METHODS)
  elif args.methods == "all":
    names = list(METHODS)
  else:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
      raise ValueError(f"unknown methods {unknown}; choose from "
                       f"{list(METHODS)}")
  args.methods = _methods.with_baselines(names)


# -- data and phases ---------------------------------------------------------


def _load(args) -> _data.Dataset:
  if args.mock_data:
    tfds = _data._import_tfds(args.dataset)  # pylint: disable=protected-access
    with tfds.testing.mock_data(num_examples=args.mock_data):
      data = _data.load_raw(args.dataset, data_dir=args.data_dir)
  else:
    data = _data.load_raw(args.dataset, data_dir=args.data_dir,
                          seed=args.split_seed)
  if args.tiny:
    rng = np.random.default_rng(args.split_seed)
    tr = rng.permutation(len(data.x_train))[:TINY["train"]]
    te = rng.permutation(len(data.x_test))[:TINY["test"]]
    data = data._replace(x_train=data.x_train[tr], y_train=data.y_train[tr],
                         x_test=data.x_test[te], y_test=data.y_test[te])
  return data


@dataclasses.dataclass
class Job:
  """Everything the runs of one comparison share."""

  args: argparse.Namespace
  hyper: Hyper
  phases: dict[str, _train.Phase]
  plain_eval: _train.Trainer
  log: Any
  variables: dict[int, Any] = dataclasses.field(default_factory=dict)
  # Learning-rate searches by method name, shared with exact equivalents.
  tunings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def steps_per_epoch(self, phase: str) -> int:
    n = self.phases[phase].num_train
    return n // min(self.args.batch_size, n)

  def initial_variables(self, conv: str, seed: int):
    """The seed's plain initialisation; branched: its branched equivalent."""
    if seed not in self.variables:
      self.variables[seed] = self.plain_eval.init_variables(
          seed, self.phases["final"].train.images)
    plain = self.variables[seed]
    if conv == "plain":
      return plain
    return {"params": _models.branched_params_from_plain(plain["params"],
                                                         conv),
            "batch_stats": plain["batch_stats"]}


def _phases(args, data: _data.Dataset) -> dict[str, _train.Phase]:
  """"final": whole training split, scored on test; "tune": minus val."""
  train = _train.preload(data.x_train, data.y_train)
  test = _train.preload(data.x_test, data.y_test)
  everything = np.arange(len(data.x_train))
  phases = {"final": _train.Phase(
      train, everything, _train.normalization(data.x_train),
      {"test": (test, np.arange(len(data.x_test)))})}
  if args.tune:
    fit_index, val_index = _data.validation_split(
        data.y_train, args.val_fraction, args.split_seed)
    phases["tune"] = _train.Phase(
        train, fit_index, _train.normalization(data.x_train[fit_index]),
        {"val": (train, val_index)})
  return phases


class EpochLog:
  """Appends one JSON line per epoch (flushed), or does nothing."""

  def __init__(self, path: str):
    self.path = path
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def __call__(self, record: dict[str, Any]) -> None:
    if self.path:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


# -- runs --------------------------------------------------------------------


_TRAINERS: dict[Any, _train.Trainer] = {}


def _trainer(method: Method, job: Job) -> _train.Trainer:
  """One trainer per method and settings, kept for the process's life.

  Calling ``main`` again with the same settings (tests, a resumed run in a
  notebook) reuses the compiled step instead of compiling it again.
  """
  args = job.args
  conv = (_models.plain_conv if method.conv == "plain" else
          _models.branched_conv(method.conv))
  model = _models.make_model(args.model, _data.num_classes(args.dataset),
                             conv=conv, width=args.width, tiny=args.tiny)
  key = (method.name, model, args.augment, args.prng_impl, job.hyper)
  if key not in _TRAINERS:
    _TRAINERS[key] = _train.Trainer(
        model, method.build(job.hyper), augment=args.augment,
        refresh=method.learned, prng_impl=args.prng_impl)
  return _TRAINERS[key]


def _default_lr(method: Method, args) -> float:
  return args.adamw_lr if method.family == "adamw" else args.lr


def _initial_state(trainer, method, job: Job, phase: str, seed: int,
                   lr: float) -> _train.TrainState:
  return trainer.init(job.initial_variables(method.conv, seed), lr=lr,
                      total_steps=job.args.epochs * job.steps_per_epoch(phase))


def _run(trainer, method: Method, job: Job, phase: str, seed: int,
         lr: float) -> _train.RunResult:
  """One training run, resumed from its checkpoint when there is one."""
  args = job.args
  checkpoint = None
  if args.checkpoint_dir:
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    settings.update(phase=phase, method=method.name, lr=lr, seed=seed)
    checkpoint = _checkpoint.RunCheckpoint(
        os.path.join(args.checkpoint_dir, phase, method.name, f"lr{lr:.6g}",
                     f"seed{seed}"), settings, every=args.checkpoint_every)
  context = {"phase": phase, "method": method.name, "lr": lr, "seed": seed}
  try:
    return trainer.fit(
        _initial_state(trainer, method, job, phase, seed, lr),
        job.phases[phase], seed=seed, epochs=args.epochs,
        batch_size=args.batch_size,
        refresh_every=args.refresh_every if method.learned else None,
        refresh_batches=args.refresh_batches,
        progress=not args.no_progress,
        description=f"{phase} {method.name} lr {lr:.3g} seed {seed}",
        on_epoch=lambda record: job.log({**context, **record}),
        checkpoint=checkpoint)
  finally:
    if checkpoint is not None:
      checkpoint.close()


def _tune(trainer, method: Method, job: Job) -> dict[str, Any]:
  """The learning-rate search on the validation split."""
  args = job.args
  default = _default_lr(method, args)
  grid = _stats.lr_grid(default, args.tune_grid, args.tune_factor)
  seeds = list(range(args.tune_seeds))
  trials = []
  for lr in grid:
    results = [_run(trainer, method, job, "tune", seed, lr) for seed in seeds]
    losses = [r.final_loss("val") for r in results]
    accuracies = [r.final("val") for r in results]
    trials.append({"lr": lr, "val_loss": losses,
                   "val_loss_mean": float(np.mean(losses)),
                   "val_accuracy": accuracies,
                   "val_accuracy_mean": float(np.mean(accuracies)),
                   "val_loss_curves": [r.loss["val"] for r in results],
                   "val_curves": [r.accuracy["val"] for r in results]})
  scores = [t["val_loss_mean"] for t in trials]
  chosen = _stats.pick_lr(grid, scores, default, args.tune_tolerance)
  phase = job.phases["tune"]
  return {"method": method.name, "grid": grid, "default_lr": default,
          "seeds": seeds, "train_examples": phase.num_train,
          "val_examples": len(phase.evals["val"][1]), "trials": trials,
          "chosen_lr": chosen, "rule": _stats.pick_rule(args.tune_tolerance),
          "tie_tolerance": args.tune_tolerance,
          # How near each rate was to the tie's edge (1 + tie_tolerance).
          "loss_over_lowest": [float(v / np.nanmin(scores)) for v in scores]}


def _tuning(method: Method, job: Job) -> dict[str, Any]:
  """``method``'s search, run once per job for it and its exact equivalents.

  A method with ``tuned_as`` gets its equivalent's search (run here, with
  the equivalent's trainer, when that method is not in the job), so both
  train at one learning rate whichever of them a job runs.
  """
  source = _methods.tuning_source(method)
  if source.name not in job.tunings:
    job.tunings[source.name] = _tune(_trainer(source, job), source, job)
  return job.tunings[source.name]


def _merge_check(trainer, job: Job, result: _train.RunResult
                 ) -> dict[str, Any]:
  """Merged vs branched network on the test split (the merged one counts)."""
  state = result.final_state
  test, index = job.phases["final"].evals["test"]
  norm = job.phases["final"].norm
  branched = trainer.logits(
      {"params": state.params, "batch_stats": state.batch_stats}, test,
      index, norm)
  merged = job.plain_eval.logits(
      {"params": _models.merge_branched_params(state.params),
       "batch_stats": state.batch_stats}, test, index, norm)
  labels = np.asarray(test.labels)[index]
  diff = float(np.abs(branched - merged).max())
  scale = float(max(1.0, np.abs(branched).max()))
  return {
      "branched_final_test_accuracy": float(
          np.mean(branched.argmax(-1) == labels)),
      "merged_final_test_accuracy": float(np.mean(merged.argmax(-1) == labels)),
      "merge_max_abs_logit_diff": diff,
      "merge_prediction_agreement": float(
          np.mean(branched.argmax(-1) == merged.argmax(-1))),
      "merge_ok": bool(diff <= MERGE_RTOL * scale),
  }


def _final_runs(trainer, method: Method, job: Job, lr: float
                ) -> list[dict[str, Any]]:
  runs = []
  for seed in range(job.args.seeds):
    result = _run(trainer, method, job, "final", seed, lr)
    history = result.history()
    run = {"seed": seed, "test_accuracy": history.pop("accuracy")["test"],
           "test_loss": history.pop("loss")["test"],
           **{k: v for k, v in history.items() if k != "seed"}}
    run["final_test_accuracy"] = run["test_accuracy"][-1]
    if method.conv != "plain":
      run.update(_merge_check(trainer, job, result))
      # The deployed network is the merged one: its accuracy is the result.
      run["final_test_accuracy"] = run["merged_final_test_accuracy"]
    run["refresh_total_s"] = float(sum(result.refresh_time_s))
    if method.learned:
      run["final_scalings"] = _scalings_summary(result.final_state.opt_state)
    runs.append(run)
  return runs


def run_method(method: Method, job: Job) -> dict[str, Any]:
  """Tunes (if asked) and trains one method for every seed; its record."""
  args = job.args
  trainer = _trainer(method, job)
  tuning = _tuning(method, job) if args.tune else None
  lr = tuning["chosen_lr"] if tuning else _default_lr(method, args)
  runs = _final_runs(trainer, method, job, lr)
  finals = np.asarray([r["final_test_accuracy"] for r in runs])
  epoch_times = [t for r in runs for t in r["epoch_time_s"]]
  record = {
      "method": method.name, "baseline": None, "family": method.family,
      "model_conv": method.conv, "learned_refresh": method.learned,
      "refresh_every_epochs": args.refresh_every if method.learned else None,
      "lr": lr, "lr_default": _default_lr(method, args), "tuning": tuning,
      # Whose search chose the lr, where it is not the method's own.
      "tuned_as": method.tuned_as if tuning else None,
      "final_test_accuracy_mean": float(finals.mean()),
      "final_test_accuracy_std": float(finals.std(ddof=1)) if len(
          finals) > 1 else 0.0,
      "epoch_time_s_mean": float(np.mean(epoch_times)),
      "epoch_time_s_median": float(np.median(epoch_times)),
      "epoch_time_s_min": float(np.min(epoch_times)),
      "refresh_total_s_mean": float(np.mean([r["refresh_total_s"]
                                             for r in runs])),
      "refresh_count": len(runs[0]["refresh_time_s"]),
      "train_step_compile_s": trainer.compile_time_s,
      "refresh_compile_s": trainer.refresh_compile_time_s,
      "refresh_compilations": trainer.refresh_compilations(),
      "train_step_compilations": trainer.step_compilations(),
      "runs": runs,
  }
  if method.conv != "plain":
    record["merge_ok"] = all(r["merge_ok"] for r in runs)
    record["merge_max_abs_logit_diff"] = max(
        r["merge_max_abs_logit_diff"] for r in runs)
  return record


def add_paired_differences(records: list[dict[str, Any]]) -> None:
  """Every non-baseline record gains its paired difference to its baseline."""
  by_name = {r["method"]: r for r in records}
  for r in records:
    baseline = METHODS[r["method"]].baseline
    if baseline == r["method"]:
      continue
    base = by_name[baseline]
    r["baseline"] = baseline
    r["paired_difference"] = _stats.paired_difference(
        [run["final_test_accuracy"] for run in r["runs"]],
        [run["final_test_accuracy"] for run in base["runs"]],
        baseline).to_json()


def _scalings_summary(opt_state) -> dict[str, list[list[float]]]:
  """The learned SGS matrices at the end of a run, by layer name."""
  import sgs_optax  # pylint: disable=g-import-not-at-top
  out = {}
  for path, matrix in jax.tree_util.tree_flatten_with_path(
      sgs_optax.get_scalings(opt_state))[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    out[name] = np.round(np.asarray(matrix, np.float64), 4).tolist()
  return out


# -- start-up measurement ----------------------------------------------------


def device_name(device) -> str:
  """``"gpu: NVIDIA H200"``; the platform alone where the kind repeats it.

  A CPU device's kind is ``"cpu"``, which would print ``cpu:cpu``.
  """
  kind = str(device.device_kind)
  if kind.lower() == device.platform.lower():
    return device.platform
  return f"{device.platform}: {kind}"


def _hms(seconds: float) -> str:
  minutes, secs = divmod(round(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s"


def _projected_steps(methods: Sequence[Method], job: Job
                     ) -> tuple[int, str]:
  """Train steps of the whole job, and the runs it counts, in words."""
  args = job.args
  steps = len(methods) * args.seeds * job.steps_per_epoch("final")
  words = f"{len(methods)} methods x {args.seeds} final runs"
  if args.tune:
    searches = len({_methods.tuning_source(m).name for m in methods})
    trials = args.tune_grid * args.tune_seeds
    steps += searches * trials * job.steps_per_epoch("tune")
    words += f" + {searches} searches x {trials} tuning runs"
  return steps * args.epochs, words


def measure_start(methods: Sequence[Method], job: Job) -> dict[str, Any]:
  """Compiles every method, times the first's steps, projects the job."""
  args = job.args
  final = job.phases["final"]
  count = min(final.num_train, args.refresh_batches * args.batch_size)
  # Compiled now, so that no epoch timing has it (a dry run: the first only).
  for method in methods[:1] if args.dry_run else methods:
    trainer = _trainer(method, job)
    state = _initial_state(trainer, method, job, "final", 0,
                           _default_lr(method, args))
    if not trainer.compile_time_s:
      trainer.warm_up(state, final, args.batch_size,
                      refresh_count=count if method.learned else 0)
    if method is methods[0]:
      first, first_state = trainer, state
  # A smoke run only checks the measurement; a real one times ~1 s a round.
  timing = first.time_steps(first_state, final, args.batch_size,
                            budget_s=0.01 if args.tiny else 1.0,
                            rounds=2 if args.tiny else 3)
  steps, runs = _projected_steps(methods, job)
  device = jax.devices()[0]
  out = {"device": device_name(device),
         "method_timed": methods[0].name, **timing,
         "total_train_steps": steps,
         "projected_train_s": steps * timing["step_s_loop"],
         "accelerator_throughput": (
             "unmeasured (no accelerator here)" if device.platform == "cpu"
             else "measured above")}
  print(f"{out['device']}: {timing['images_per_s']:.0f} images/s "
        f"({methods[0].name}, batch {args.batch_size}; "
        f"{100 * timing['outside_jit_share']:.1f}% of the step time outside "
        "the jitted step); projected training time "
        f"{_hms(out['projected_train_s'])} for {runs}, {steps} steps (eval, "
        "refresh and compile excluded; every method timed as the first)",
        flush=True)
  if device.platform == "cpu":
    print("accelerator throughput: unmeasured (no accelerator here)",
          flush=True)
  return out


# -- the job -----------------------------------------------------------------


def _setup(args) -> Job:
  data = _load(args)
  phases = _phases(args, data)
  plain = _models.make_model(args.model, _data.num_classes(args.dataset),
                             width=args.width, tiny=args.tiny)
  job = Job(args, Hyper(momentum=args.momentum,
                        weight_decay=args.weight_decay,
                        adamw_weight_decay=args.adamw_weight_decay),
            phases, _train.Trainer(plain, optax.identity(),
                                   prng_impl=args.prng_impl),
            EpochLog(args.epoch_log))
  tune = (f"; tuning on {phases['tune'].num_train} train / "
          f"{len(phases['tune'].evals['val'][1])} val" if args.tune else "")
  print(f"{args.dataset}: {len(data.x_train)} train / {len(data.x_test)} test "
        f"images {data.x_train.shape[1:]} {data.x_train.dtype}{tune}; model "
        f"{args.model} width {args.width}, {args.epochs} epochs x "
        f"{job.steps_per_epoch('final')} steps, batch {args.batch_size}, "
        f"{args.seeds} seed(s), methods {', '.join(args.methods)}"
        + (f", recipe {args.recipe}" if args.recipe else ""), flush=True)
  return job


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the comparison; returns the results dict (also written by --out)."""
  args = parse_args(argv)
  start = time.perf_counter()
  job = _setup(args)
  methods = [METHODS[name] for name in args.methods]
  throughput = measure_start(methods, job)
  if args.dry_run:
    return {"settings": vars(args), "throughput": throughput}
  records = []
  for method in methods:
    records.append(run_method(method, job))
    r = records[-1]
    print(f"{method.name:<17} lr {r['lr']:.3g}  final test acc "
          f"{100 * r['final_test_accuracy_mean']:.2f} ± "
          f"{100 * r['final_test_accuracy_std']:.2f} %", flush=True)
  add_paired_differences(records)
  table = _summary.format_table(records, args.seeds, args.tune)
  verdict = _summary.verdict_summary(records)
  published = (_recipes.RECIPES[args.recipe].published()
               if args.recipe else None)
  total = time.perf_counter() - start
  print(f"\n{table}\n{verdict}")
  if published:
    print(f"Published ({published['source']}): "
          + ", ".join(f"{k} {v}" for k, v in
                      published["top1_percent"].items()))
  print(f"total wall time {total:.1f} s")
  results = {
      "settings": {**vars(args), "seeds_list": list(range(args.seeds)),
                   "steps_per_epoch": job.steps_per_epoch("final"),
                   "train_examples": job.phases["final"].num_train,
                   "input_shape": list(
                       job.phases["final"].train.images.shape[1:]),
                   "num_classes": _data.num_classes(args.dataset),
                   "schedule": "peak lr x cosine decay to 0 over the run",
                   "sgs_presets_normalized": False, "merge_rtol": MERGE_RTOL},
      "environment": _report.environment(),
      "date": datetime.datetime.now(datetime.UTC).isoformat(),
      "throughput": throughput, "methods": records, "table": table,
      "verdict": verdict, "published": published, "total_wall_time_s": total,
  }
  if args.out:
    _report.write_json(args.out, results)
  if args.plot:
    _summary.plot(records, args.plot,
                  f"{args.dataset} / {args.model}: {args.epochs} epochs, "
                  f"{args.seeds} seed(s)" + (", tuned lr" if args.tune else ""))
    print(f"wrote {args.plot}")
  return results


def cli(argv: Sequence[str] | None = None) -> None:
  """``main`` for the command line: a data or checkpoint problem is one
  message on stderr and exit status 2."""
  try:
    main(argv)
  except (_data.DataUnavailableError,
          _checkpoint.SettingsMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  cli(sys.argv[1:])
