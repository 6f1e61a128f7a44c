r"""Compares SGS, CDG and their baselines on one dataset and model.

Run from the repository root::

  python -m benchmarks.compare                      # digits, small VGG, all
  python -m benchmarks.compare --methods sgd,sgs-acb --seeds 5 \
      --out results.json --plot results.png
  python -m benchmarks.compare --dataset cifar100 --model vgg11 \
      --data-dir ~/tensorflow_datasets --epochs 200 --batch-size 128

Methods (``--methods``, comma separated, default all):

==================  ==========================================================
``sgd``             SGD, momentum 0.9, coupled weight decay, cosine schedule
                    (``chain(add_decayed_weights(wd), sgd(lr, 0.9))``)
``sgs-acb``         ``chain(sgs("acb"), add_decayed_weights, sgd)``
``sgs-repvgg``      ``chain(sgs("repvgg"), add_decayed_weights, sgd)``
``sgs-learned``     ``chain(sgs(None), ...)``, matrices refreshed from mutual
                    information (``capture_conv_inputs`` + ``refresh_scalings``
                    on 2 training batches) at epoch 0 and every
                    ``max(1, round(epochs / 20))`` epochs
``cdg``             ``chain(cdg(), add_decayed_weights, sgd)``
``cdg+sgs-learned`` ``chain(sgs(None), cdg(), add_decayed_weights, sgd)``
``acb-branched``    the model built with ACB ``BranchedConv`` s, plain SGD;
                    evaluated after merging into the plain model
``repvgg-branched`` the same with RepVGG (KxK + 1x1) branches
``adamw``           ``optax.adamw`` with the cosine schedule
``adamw+sgs``       ``chain(adamw, sgs("acb"))``: SGS after Adam scales the
                    update, a per-position learning rate
==================  ==========================================================

Every method of a model starts from the same weights for a given seed. SGS
presets are unnormalised (exactly the branched networks' dynamics). The
reported accuracy is the FINAL epoch's test accuracy (never the best epoch),
mean and sample standard deviation over seeds. "s/epoch" counts the train
steps only; the learned methods' refresh time is reported apart, and compile
times are measured once per method before the timed runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

import sgs_optax

from benchmarks import _data
from benchmarks import _models
from benchmarks import _report
from benchmarks import _train

# Default epochs and batch size per dataset. The digits default (all methods x
# 3 seeds) is sized to finish well under 10 minutes on a busy 2-core CPU.
DEFAULT_EPOCHS = {"digits": 15, "mnist": 10, "fashion_mnist": 20,
                  "cifar10": 200, "cifar100": 200}
DEFAULT_BATCH_SIZE = {"digits": 64}
TINY = {"train": 192, "test": 96, "epochs": 2, "batch_size": 32, "seeds": 1,
        "prng_impl": "rbg"}
# Merged vs branched logits must agree to this relative tolerance (float32).
MERGE_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Hyper:
  lr: float
  momentum: float
  weight_decay: float
  adamw_lr: float
  adamw_weight_decay: float
  total_steps: int


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  build: Callable[[Hyper], optax.GradientTransformation]
  conv: str = "plain"  # "plain", "acb" or "repvgg" (BranchedConv).
  learned: bool = False


def _cosine(lr: float, h: Hyper):
  return optax.cosine_decay_schedule(lr, max(1, h.total_steps))


def sgd_chain(h: Hyper, *first: optax.GradientTransformation):
  return optax.chain(
      *first,
      optax.add_decayed_weights(h.weight_decay),
      optax.sgd(_cosine(h.lr, h), momentum=h.momentum),
  )


def _adamw(h: Hyper):
  return optax.adamw(_cosine(h.adamw_lr, h),
                     weight_decay=h.adamw_weight_decay)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("sgd", sgd_chain),
    Method("sgs-acb", lambda h: sgd_chain(h, sgs_optax.sgs("acb"))),
    Method("sgs-repvgg", lambda h: sgd_chain(h, sgs_optax.sgs("repvgg"))),
    Method("sgs-learned", lambda h: sgd_chain(h, sgs_optax.sgs()), learned=True),
    Method("cdg", lambda h: sgd_chain(h, sgs_optax.cdg())),
    Method("cdg+sgs-learned",
           lambda h: sgd_chain(h, sgs_optax.sgs(), sgs_optax.cdg()), learned=True),
    Method("acb-branched", sgd_chain, conv="acb"),
    Method("repvgg-branched", sgd_chain, conv="repvgg"),
    Method("adamw", _adamw),
    Method("adamw+sgs", lambda h: optax.chain(_adamw(h), sgs_optax.sgs("acb"))),
]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.compare",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="digits", choices=_data.DATASETS,
                 help="default: digits")
  p.add_argument("--model", default="small_vgg", choices=_models.MODELS,
                 help="default: small_vgg")
  p.add_argument("--width", type=int, default=None,
                 help="first conv width; default small_vgg 16, vgg11 and "
                 f"resnet18 64, {_models.TINY_WIDTH} with --tiny")
  p.add_argument("--epochs", type=int, default=None,
                 help=f"default per dataset: {DEFAULT_EPOCHS}")
  p.add_argument("--batch-size", type=int, default=None,
                 help="default 64 on digits, 128 otherwise")
  p.add_argument("--seeds", type=int, default=None,
                 help="number of seeds (0..N-1); default 3 (1 with --tiny)")
  p.add_argument("--methods", default="all",
                 help=f"comma list of {', '.join(METHODS)}; default: all")
  p.add_argument("--data-dir", default=None,
                 help="tfds data_dir with ArrayRecord files (never downloads)")
  p.add_argument("--split-seed", type=int, default=0,
                 help="seed of the digits train/test split; default 0")
  p.add_argument("--lr", type=float, default=None,
                 help="SGD peak learning rate; default 0.1 * batch_size / 128")
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
  p.add_argument("--augment", default="auto", choices=("auto", "on", "off"),
                 help="random crop + flip; default auto: on for CIFAR only")
  p.add_argument("--prng-impl", default=None,
                 choices=("threefry2x32", "rbg", "unsafe_rbg"),
                 help="jax.random.key implementation; default threefry2x32 "
                 "(rbg with --tiny: much faster to compile on CPU)")
  p.add_argument("--out", default="results/compare.json",
                 help="write the JSON results here ('' to skip)")
  p.add_argument("--plot", default="results/compare.png",
                 help="write a PNG figure here ('' to skip)")
  p.add_argument("--tiny", action="store_true",
                 help=f"smoke test: tiny model and data subset {TINY}")
  p.add_argument("--no-progress", action="store_true",
                 help="no tqdm progress bars")
  args = p.parse_args(argv)
  if args.width is None:
    args.width = (_models.TINY_WIDTH if args.tiny else
                  _models.DEFAULT_WIDTH[args.model])
  if args.epochs is None:
    args.epochs = TINY["epochs"] if args.tiny else DEFAULT_EPOCHS[args.dataset]
  if args.batch_size is None:
    args.batch_size = (TINY["batch_size"] if args.tiny else
                       DEFAULT_BATCH_SIZE.get(args.dataset, 128))
  if args.prng_impl is None:
    args.prng_impl = TINY["prng_impl"] if args.tiny else "threefry2x32"
  if args.seeds is None:
    args.seeds = TINY["seeds"] if args.tiny else 3
  if args.lr is None:
    args.lr = 0.1 * args.batch_size / 128
  if args.adamw_lr is None:
    args.adamw_lr = 1e-3 * args.batch_size / 128
  if args.methods == "all":
    args.methods = list(METHODS)
  else:
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
      p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
  if args.epochs < 1 or args.batch_size < 1 or args.seeds < 1:
    p.error("--epochs, --batch-size and --seeds must be positive")
  return args


def _load(args):
  data = _data.load_dataset(args.dataset, data_dir=args.data_dir,
                            seed=args.split_seed, normalize=True)
  if args.tiny:
    rng = np.random.default_rng(args.split_seed)
    x_train, y_train, x_test, y_test = data
    tr = rng.permutation(len(x_train))[:TINY["train"]]
    te = rng.permutation(len(x_test))[:TINY["test"]]
    data = (x_train[tr], y_train[tr], x_test[te], y_test[te])
  return data


def _conv_factory(kind: str):
  return _models.plain_conv if kind == "plain" else _models.branched_conv(kind)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, dtype=np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return float(values.mean()), std


def run_method(method: Method, args, data, hyper: Hyper, plain_eval,
               init_cache: dict[Any, Any] | None = None):
  """Trains one method for every seed; returns its JSON-ready record.

  ``init_cache`` maps ``(conv kind, seed)`` to initial model variables, shared
  between the methods of one model (so they start from the same weights and
  the slow-to-compile init runs once per model).
  """
  init_cache = {} if init_cache is None else init_cache
  x_train, y_train, x_test, y_test = data
  n_classes = _data.num_classes(args.dataset)
  model = _models.make_model(args.model, n_classes,
                             conv=_conv_factory(method.conv), width=args.width,
                             tiny=args.tiny)
  augment = (args.augment == "on" or
             (args.augment == "auto" and args.dataset.startswith("cifar")))
  trainer = _train.Trainer(model, method.build(hyper), augment=augment,
                           refresh=method.learned, prng_impl=args.prng_impl)
  refresh_every = max(1, round(args.epochs / 20)) if method.learned else None
  batch = min(args.batch_size, len(x_train))

  def initial_state(seed):
    key = (method.conv, seed)
    if key not in init_cache:
      init_cache[key] = trainer.init_variables(seed, x_train)
    return trainer.init(seed, x_train, init_cache[key])

  trainer.warm_up(initial_state(0), x_train[:batch], y_train[:batch],
                  refresh_images=x_train[:2 * batch])
  runs = []
  for seed in range(args.seeds):
    result = trainer.fit(
        initial_state(seed), data, seed=seed, epochs=args.epochs,
        batch_size=args.batch_size, refresh_every=refresh_every,
        progress=not args.no_progress,
        description=f"{method.name} seed {seed}")
    run = {field.name: getattr(result, field.name)
           for field in dataclasses.fields(result)
           if field.name != "final_state"}
    if method.conv != "plain":
      state = result.final_state
      branched_vars = {"params": state.params,
                       "batch_stats": state.batch_stats}
      merged_vars = {"params": _models.merge_branched_params(state.params),
                     "batch_stats": state.batch_stats}
      branched_logits = trainer.logits(branched_vars, x_test)
      merged_logits = plain_eval.logits(merged_vars, x_test)
      diff = float(np.abs(branched_logits - merged_logits).max())
      scale = float(max(1.0, np.abs(branched_logits).max()))
      run["branched_final_test_accuracy"] = float(
          np.mean(branched_logits.argmax(-1) == y_test))
      run["merged_final_test_accuracy"] = float(
          np.mean(merged_logits.argmax(-1) == y_test))
      run["merge_max_abs_logit_diff"] = diff
      run["merge_prediction_agreement"] = float(
          np.mean(branched_logits.argmax(-1) == merged_logits.argmax(-1)))
      run["merge_ok"] = bool(diff <= MERGE_RTOL * scale)
      # The deployed network is the merged one: its accuracy is the result.
      run["final_test_accuracy"] = run["merged_final_test_accuracy"]
    run["refresh_total_s"] = float(sum(result.refresh_time_s))
    if method.learned:
      run["final_scalings"] = _scalings_summary(result.final_state.opt_state)
    runs.append(run)
  finals = [r["final_test_accuracy"] for r in runs]
  mean, std = _mean_std(finals)
  epoch_times = [t for r in runs for t in r["epoch_time_s"]]
  record = {
      "method": method.name,
      "model_conv": method.conv,
      "learned_refresh": method.learned,
      "refresh_every_epochs": refresh_every,
      "final_test_accuracy_mean": mean,
      "final_test_accuracy_std": std,
      "epoch_time_s_mean": float(np.mean(epoch_times)),
      "epoch_time_s_median": float(np.median(epoch_times)),
      "epoch_time_s_min": float(np.min(epoch_times)),
      "refresh_total_s_mean": float(np.mean([r["refresh_total_s"]
                                             for r in runs])),
      "refresh_count": len(runs[0]["refresh_time_s"]),
      "train_step_compile_s": trainer.compile_time_s,
      "refresh_compile_s": trainer.refresh_compile_time_s,
      "refresh_jitted": trainer.refresh_jitted,
      "refresh_compilations": trainer.refresh_compilations(),
      "train_step_compilations": trainer.step_compilations(),
      "runs": runs,
  }
  if method.conv != "plain":
    record["merge_ok"] = all(r["merge_ok"] for r in runs)
    record["merge_max_abs_logit_diff"] = max(
        r["merge_max_abs_logit_diff"] for r in runs)
  return record


def _scalings_summary(opt_state) -> dict[str, list[list[float]]]:
  """The learned SGS matrices at the end of a run, by layer name."""
  import sgs_optax  # pylint: disable=g-import-not-at-top
  out = {}
  for path, matrix in jax.tree_util.tree_flatten_with_path(
      sgs_optax.get_scalings(opt_state))[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    out[name] = np.round(np.asarray(matrix, np.float64), 4).tolist()
  return out


def format_table(records: Sequence[dict[str, Any]], seeds: int) -> str:
  """The comparison table (final test accuracy, mean ± std over seeds)."""
  base = next((r for r in records if r["method"] == "sgd"), None)
  header = (f"{'method':<17} {'final test acc (%)':>20} {'vs sgd':>7} "
            f"{'s/epoch':>8} {'refresh s':>9} {'compile s':>9}  notes")
  lines = [header, "-" * len(header)]
  for r in records:
    acc = (f"{100 * r['final_test_accuracy_mean']:6.2f} ± "
           f"{100 * r['final_test_accuracy_std']:5.2f}")
    delta = "" if base is None else "{:+.2f}".format(
        100 * (r["final_test_accuracy_mean"]
               - base["final_test_accuracy_mean"]))
    refresh = (f"{r['refresh_total_s_mean']:.2f}"
               if r["learned_refresh"] else "-")
    notes = []
    if r["learned_refresh"]:
      notes.append(f"{r['refresh_count']} refreshes/run")
    if "merge_ok" in r:
      notes.append("merged == branched" if r["merge_ok"] else
                   "MERGED != BRANCHED")
      notes.append(f"max |dlogit| {r['merge_max_abs_logit_diff']:.1e}")
    if r["learned_refresh"] and r["refresh_compilations"] > 1:
      notes.append(f"refresh compiled {r['refresh_compilations']}x")
    if r["train_step_compilations"] != 1:
      notes.append(f"train step compiled {r['train_step_compilations']}x")
    lines.append(
        f"{r['method']:<17} {acc:>20} {delta:>7} "
        f"{r['epoch_time_s_median']:8.3f} {refresh:>9} "
        f"{r['train_step_compile_s'] + r['refresh_compile_s']:9.1f}  "
        + ", ".join(notes))
  lines.append(f"(final-epoch test accuracy over {seeds} seed(s); std is the "
               "sample std; s/epoch = median train-step time per epoch, no "
               "eval, no refresh; refresh s = total per run; compile s = train "
               "step + refresh, once per method)")
  return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], path: str, title: str) -> None:
  """Test-accuracy curves (mean ± std) and final-accuracy bars with std."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_curve, ax_bar) = plt.subplots(
      1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
  cmap = plt.get_cmap("tab10")
  for i, r in enumerate(records):
    curves = 100 * np.array([run["test_accuracy"] for run in r["runs"]])
    epochs = np.arange(1, curves.shape[1] + 1)
    mean = curves.mean(0)
    std = curves.std(0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
    ax_curve.plot(epochs, mean, color=cmap(i % 10), label=r["method"])
    ax_curve.fill_between(epochs, mean - std, mean + std, color=cmap(i % 10),
                          alpha=0.15, linewidth=0)
  ax_curve.set_xlabel("epoch")
  ax_curve.set_ylabel("test accuracy (%)")
  ax_curve.set_title("test accuracy per epoch (mean ± std over seeds)")
  ax_curve.grid(alpha=0.3)
  ax_curve.legend(fontsize=8)
  means = np.array([100 * r["final_test_accuracy_mean"] for r in records])
  stds = np.array([100 * r["final_test_accuracy_std"] for r in records])
  xs = np.arange(len(records))
  ax_bar.bar(xs, means, yerr=stds, capsize=4,
             color=[cmap(i % 10) for i in range(len(records))])
  ax_bar.set_xticks(xs, [r["method"] for r in records], rotation=45,
                    ha="right", fontsize=8)
  if len(records):
    low = float(np.min(means - stds))
    high = float(np.max(means + stds))
    pad = max(0.5, 0.15 * (high - low))
    ax_bar.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
  ax_bar.set_ylabel("final test accuracy (%)")
  ax_bar.set_title("final-epoch test accuracy (± std)")
  ax_bar.grid(axis="y", alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the comparison; returns the results dict (also written by --out)."""
  args = parse_args(argv)
  start = time.perf_counter()
  data = _load(args)
  x_train = data[0]
  steps_per_epoch = len(x_train) // min(args.batch_size, len(x_train))
  hyper = Hyper(lr=args.lr, momentum=args.momentum,
                weight_decay=args.weight_decay, adamw_lr=args.adamw_lr,
                adamw_weight_decay=args.adamw_weight_decay,
                total_steps=args.epochs * steps_per_epoch)
  print(f"{args.dataset}: {len(x_train)} train / {len(data[2])} test images "
        f"{x_train.shape[1:]}, model {args.model} width {args.width}"
        f", {args.epochs} epochs x {steps_per_epoch} steps, batch "
        f"{args.batch_size}, {args.seeds} seed(s)", flush=True)

  selected = [METHODS[name] for name in args.methods]

  plain_eval = _train.Trainer(
      _models.make_model(args.model, _data.num_classes(args.dataset),
                         width=args.width, tiny=args.tiny), optax.identity())
  records = []
  init_cache = {}
  for method in selected:
    record = run_method(method, args, data, hyper, plain_eval, init_cache)
    records.append(record)
    print(f"{method.name:<17} final test acc "
          f"{100 * record['final_test_accuracy_mean']:.2f} ± "
          f"{100 * record['final_test_accuracy_std']:.2f} %  "
          f"({record['epoch_time_s_median']:.3f} s/epoch)", flush=True)

  table = format_table(records, args.seeds)
  print()
  print(table)
  total = time.perf_counter() - start
  print(f"total wall time {total:.1f} s")
  results = {
      "settings": {
          **{k: v for k, v in vars(args).items()},
          "steps_per_epoch": steps_per_epoch,
          "total_steps": hyper.total_steps,
          "schedule": "cosine_decay_schedule(peak, total_steps) per method",
          "sgs_presets_normalized": False,
          "train_examples": int(len(x_train)),
          "test_examples": int(len(data[2])),
          "input_shape": list(x_train.shape[1:]),
          "num_classes": _data.num_classes(args.dataset),
          "seeds_list": list(range(args.seeds)),
          "merge_rtol": MERGE_RTOL,
      },
      "environment": _report.environment(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "methods": records,
      "table": table,
      "total_wall_time_s": total,
  }
  if args.out:
    _report.write_json(args.out, results)
  if args.plot:
    plot(records, args.plot,
         f"{args.dataset} / {args.model}: {args.epochs} epochs, "
         f"{args.seeds} seed(s)")
    print(f"wrote {args.plot}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
