r"""Per-step time and memory of every method, and SGS's whole-training overhead.

Run from the repository root::

  python -m benchmarks.overhead                       # VGG-11 + ResNet-18
  python -m benchmarks.overhead --models vgg11 --rounds 10 --batch-size 128
  python -m benchmarks.overhead --tiny                # a smoke run (compiles)

**Part 1: per-step cost, side by side.** For each model (CIFAR VGG-11 and
ResNet-18, 32x32x3 synthetic inputs, full width 64 by default) it builds one
:class:`benchmarks._train.Trainer` per method, with the optax chains of
:mod:`benchmarks.compare` (SGD momentum 0.9, coupled weight decay 5e-4, cosine
schedule):

==================  ==========================================================
``sgd``             ``chain(add_decayed_weights, sgd)`` on the plain model
``sgs``             ``chain(sgs("acb"), add_decayed_weights, sgd)``
``cdg``             ``chain(cdg(), add_decayed_weights, sgd)``
``sgs+cdg``         ``chain(sgs("acb"), cdg(), add_decayed_weights, sgd)``
``sgs-learned``     ``chain(sgs(None), ...)`` (projection model only: its step
                    is timed here, its refresh in part 2)
``acb-branched``    the model built with ACB ``BranchedConv`` s, plain SGD
``repvgg-branched`` the same with RepVGG (KxK + 1x1) branches
==================  ==========================================================

Each train step (the Trainer's jitted ``train_step``) is compiled ahead of
time with ``.lower(...).compile()`` (timed: the compile time) and its
``memory_analysis()`` gives the memory: argument + output + temp - alias bytes
(the Trainer does not donate the state, so alias is 0 and the state counts
twice, as input and output). XLA's ``peak_memory_in_bytes`` is recorded too.
Then the steps are timed in interleaved rounds: every round runs every method
(in an order rotated each round) for ``--steps-per-round`` steps and blocks;
the reported time is the median over rounds of the per-step time, and the
ratio to ``sgd`` is the ratio of the medians (the median of the per-round
paired ratios, and its interquartile range, are printed as a noise gauge).
Whole steps of seconds on a shared CPU vary by several percent from round to
round, more than the 2% goal of SGS; so the optimizer update alone
(``tx.update`` jitted on a params-shaped gradient, ``--update-calls`` calls per
round, in the same rounds) is timed as well, and ``upd +%`` is its extra time
over ``sgd``'s update as a percentage of ``sgd``'s whole step: the much less
noisy estimate of what SGS and CDG add.

**Part 2: whole-training overhead of learned SGS** (``sgs-learned`` vs ``sgd``,
refreshes and their compile included).

* A short real run: the small VGG on scikit-learn's digits
  (:func:`benchmarks._data.load_raw`), ``--real-epochs`` epochs of
  ``Trainer.fit`` at batch 64, the learned SGS refreshed at every epoch from 2
  batches (the paper refreshes every 5 epochs, so this is 5x the refresh rate
  per epoch, and a digits epoch is only ~22 steps: this run is refresh-heavy by
  construction and checks the accounting, not the goal). The two methods
  alternate epoch by epoch; the ratio adds the train-step and refresh compiles.
* A projection to the paper's CIFAR-100 schedule (200 epochs of 50000 images,
  refresh every 5 epochs from 2 batches of 128 = 256 images: 40 refreshes and
  one refresh compile) from the projection model's (VGG-11) measured per-step
  time of ``sgd`` and ``sgs-learned`` (part 1's rounds), its refresh time on
  ``--refresh-images`` images (timed in the first rounds of part 1, steady
  state) and its refresh compile time. At ``--batch-size`` B the schedule has
  ``200 * ceil(50000 / B)`` steps (391 per epoch at 128, 1563 at 32): the
  default B = 32 keeps the run affordable on a CPU, with the refresh still on
  256 images as in the paper.

Memory and time ratios are printed next to the goals: SGS <= 1.02x the step
time of SGD, CDG <= 1.05x, the branched ACB network >= 1.5x the time and >=
1.3x the memory of SGS, learned SGS over the paper's schedule <= 1.03x. The
published peers are GPU figures from the OREPA paper (ImageNet ResNet-18,
4xV100): DBB 2.8x the time and 1.8x the memory of the plain network, OREPA
1.4x and 1.24x. The official SGS code reports +5% to +13% GPU hours (its MI
pass runs in numpy on the CPU).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import datetime
import functools
import math
import os
import statistics
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _data
from benchmarks import _models
from benchmarks import _report
from benchmarks import _train
from benchmarks import compare

MODELS = ("vgg11", "resnet18")
DEFAULTS = {"rounds": 5, "steps_per_round": 1, "update_calls": 5,
            "refresh_repeats": 2, "refresh_images": 256, "real_epochs": 3}
TINY = {"rounds": 2, "steps_per_round": 1, "update_calls": 2,
        "refresh_repeats": 1, "refresh_images": 16, "real_epochs": 2,
        "batch_size": 8}
# The paper's CIFAR-100 schedule (official README / dependence.py settings).
PAPER = {"epochs": 200, "train_images": 50000, "batch_size": 128,
         "refresh_every": 5, "refresh_batches": 2}
GOALS = {"sgs_time": 1.02, "cdg_time": 1.05, "acb_time_vs_sgs": 1.5,
         "acb_memory_vs_sgs": 1.3, "learned_training": 1.03}
# OREPA paper, ImageNet ResNet-18 on 4xV100, relative to the plain network.
PEERS = {"DBB": {"time": 2.8, "memory": 1.8},
         "OREPA": {"time": 1.4, "memory": 1.24}}
REAL_RUN = {"dataset": "digits", "model": "small_vgg", "batch_size": 64,
            "refresh_batches": 2}


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  conv: str  # "plain", "acb" or "repvgg".
  build: Callable[[compare.Hyper], optax.GradientTransformation]
  goal: str = ""
  learned: bool = False


def _sgs_cdg(h: compare.Hyper) -> optax.GradientTransformation:
  import sgs_optax  # pylint: disable=g-import-not-at-top
  return compare.sgd_chain(h, sgs_optax.sgs("acb"), sgs_optax.cdg())


METHODS = (
    Method("sgd", "plain", compare.METHODS["sgd"].build),
    Method("sgs", "plain", compare.METHODS["sgs-acb"].build,
           goal=f"<= {GOALS['sgs_time']}x time"),
    Method("cdg", "plain", compare.METHODS["cdg"].build,
           goal=f"<= {GOALS['cdg_time']}x time"),
    Method("sgs+cdg", "plain", _sgs_cdg),
    Method("sgs-learned", "plain", compare.METHODS["sgs-learned"].build,
           learned=True),
    Method("acb-branched", "acb", compare.METHODS["acb-branched"].build,
           goal=(f">= {GOALS['acb_time_vs_sgs']}x time, >= "
                 f"{GOALS['acb_memory_vs_sgs']}x mem of sgs")),
    Method("repvgg-branched", "repvgg",
           compare.METHODS["repvgg-branched"].build),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.overhead", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODELS),
                 help=f"comma list of {', '.join(MODELS)}; default: both")
  p.add_argument("--batch-size", type=int, default=None,
                 help=f"default 32 ({TINY['batch_size']} with --tiny)")
  p.add_argument("--num-classes", type=int, default=100,
                 help="classes of the head; default 100 (CIFAR-100)")
  p.add_argument("--width", type=int, default=None,
                 help="first conv width; default 64 "
                 f"({_models.TINY_WIDTH} with --tiny)")
  p.add_argument("--rounds", type=int, default=None,
                 help=f"interleaved rounds; default {DEFAULTS['rounds']} "
                 f"({TINY['rounds']} with --tiny)")
  p.add_argument("--steps-per-round", type=int, default=None,
                 help="train steps per method per round; default "
                 f"{DEFAULTS['steps_per_round']}")
  p.add_argument("--update-calls", type=int, default=None,
                 help="optimizer-update-alone calls per method per round; "
                 f"default {DEFAULTS['update_calls']} (0: skip)")
  p.add_argument("--refresh-images", type=int, default=None,
                 help="images per learned-SGS refresh; default "
                 f"{DEFAULTS['refresh_images']} (the paper's 2 x 128)")
  p.add_argument("--refresh-repeats", type=int, default=None,
                 help="steady-state refreshes timed (one in each of the "
                 f"first rounds); default {DEFAULTS['refresh_repeats']}")
  p.add_argument("--real-epochs", type=int, default=None,
                 help="epochs per method of the digits run (0: skip); "
                 f"default {DEFAULTS['real_epochs']}")
  p.add_argument("--out", default="results/overhead.json",
                 help="write the JSON results here ('' to skip)")
  p.add_argument("--tiny", action="store_true",
                 help=f"smoke test: width {_models.TINY_WIDTH}, {TINY}")
  args = p.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = [m for m in args.models if m not in MODELS]
  if unknown or not args.models:
    p.error(f"unknown models {unknown}; choose from {list(MODELS)}")
  base = TINY if args.tiny else DEFAULTS
  for name in ("rounds", "steps_per_round", "update_calls", "refresh_images",
               "refresh_repeats", "real_epochs"):
    if getattr(args, name) is None:
      setattr(args, name, base[name])
  if args.batch_size is None:
    args.batch_size = TINY["batch_size"] if args.tiny else 32
  if args.width is None and args.tiny:
    args.width = _models.TINY_WIDTH
  if min(args.rounds, args.steps_per_round, args.batch_size,
         args.refresh_images, args.num_classes) < 1:
    p.error("--rounds, --steps-per-round, --batch-size, --refresh-images and "
            "--num-classes must be positive")
  args.refresh_repeats = max(1, min(args.refresh_repeats, args.rounds))
  args.projection_model = "vgg11" if "vgg11" in args.models else args.models[0]
  return args


def _hyper(batch_size: int) -> dict[str, Any]:
  """The paper's SGD settings; the lr scales with the batch (0.1 at 128)."""
  steps = PAPER["epochs"] * math.ceil(PAPER["train_images"] / batch_size)
  return {"lr": 0.1 * batch_size / 128, "total_steps": steps,
          **dataclasses.asdict(compare.Hyper())}


def _on_device(images: jax.Array, labels: jax.Array) -> _train.Phase:
  """A phase over a batch already on the device, passed through unscaled."""
  channels = images.shape[-1]
  return _train.Phase(_train.DeviceSplit(images, labels),
                      np.arange(len(images)),
                      _train.Normalization(jnp.zeros(channels),
                                           jnp.ones(channels)), {})


def _memory(compiled) -> dict[str, int | None]:
  stats = compiled.memory_analysis()
  get = lambda name: int(getattr(stats, name, 0) or 0)  # pylint: disable=g-long-lambda
  out = {name: get(f"{name}_size_in_bytes")
         for name in ("argument", "output", "temp", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  peak = getattr(stats, "peak_memory_in_bytes", None)
  out["xla_peak"] = int(peak) if peak else None
  return out


def _median(values: Sequence[float]) -> float:
  return float(statistics.median(values))


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
  q = np.percentile(np.asarray(values, np.float64), [25, 75])
  return float(q[0]), float(q[1])


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - wall, time.process_time() - cpu


def _log(message: str) -> None:
  print(message, flush=True)


# -- part 1 ------------------------------------------------------------------


class _Inputs(NamedTuple):
  """The synthetic data every method of a model is timed on."""

  images: jax.Array
  phase: Any  # the train batch, on the device.
  refresh_phase: Any  # the refresh images, on the device.
  step_args: tuple  # train_step's arguments after the state.


def _inputs(args) -> _Inputs:
  rng = np.random.default_rng(0)
  batch = args.batch_size
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, args.num_classes, batch), jnp.int32)
  refresh_images = jnp.asarray(
      rng.normal(size=(args.refresh_images, 32, 32, 3)), jnp.float32)
  phase = _on_device(images, labels)
  refresh_phase = _on_device(refresh_images,
                             jnp.zeros(len(refresh_images), jnp.int32))
  step_args = (phase.train, jnp.arange(batch), phase.norm, None,
               jnp.asarray(0, jnp.int32))
  return _Inputs(images, phase, refresh_phase, step_args)


def _compile_update(run: dict[str, Any], tx, state) -> None:
  """Compiles the optimizer update alone, for the low-noise overhead."""
  grads = jax.tree.map(
      lambda p: 1e-3 * jax.random.normal(jax.random.key(1), p.shape, p.dtype),
      state.params)
  update = jax.jit(tx.update)
  compiled, run["record"]["update_compile_s"], _ = _timed(
      lambda: update.lower(grads, state.opt_state, state.params).compile())
  compiled(grads, state.opt_state, state.params)
  run["update_fn"] = functools.partial(compiled, grads, state.opt_state,
                                       state.params)


def _compile_refresh(run: dict[str, Any], inputs: _Inputs, args) -> None:
  """Compiles the refresh and runs it once, untimed, before the steps."""
  trainer, state, phase = run["trainer"], run["state"], inputs.refresh_phase
  refresh_args = (state, phase.train, jnp.asarray(phase.train_index),
                  phase.norm)
  _, run["record"]["refresh_compile_s"], _ = _timed(
      lambda: trainer.refresh_step.lower(*refresh_args).compile())
  run["state"] = trainer.refresh(state, phase, phase.train_index)
  run["record"]["refresh_images"] = args.refresh_images


def _prepare(name: str, method: Method, args, inputs: _Inputs,
             variables: dict[str, Any]) -> dict[str, Any]:
  """Builds, compiles and measures the memory of one method's step."""
  conv = (_models.plain_conv if method.conv == "plain"
          else _models.branched_conv(method.conv))
  model = _models.make_model(name, args.num_classes, conv=conv,
                             width=args.width, tiny=args.tiny)
  tx = method.build(compare.Hyper())
  # rbg keys: the same steps, much faster model inits to compile on CPU.
  trainer = _train.Trainer(model, tx, refresh=method.learned, prng_impl="rbg")
  record = {"method": method.name, "conv": method.conv}
  if method.conv not in variables:
    variables[method.conv], record["init_s"], _ = _timed(
        lambda: trainer.init_variables(0, np.asarray(inputs.images)))
  hyper = _hyper(args.batch_size)
  state = trainer.init(variables[method.conv], lr=hyper["lr"],
                       total_steps=hyper["total_steps"])
  key = trainer.run_key(0)
  step_args = (*inputs.step_args[:3], key, inputs.step_args[4])
  compiled, record["compile_s"], _ = _timed(
      lambda: trainer.train_step.lower(state, *step_args).compile())
  record["memory"] = _memory(compiled)
  # The first call reuses that executable (checked: step_compilations).
  trainer.warm_up(state, inputs.phase, args.batch_size)
  record["first_call_s"] = trainer.compile_time_s
  record["params"] = sum(int(np.prod(a.shape))
                         for a in jax.tree.leaves(state.params))
  run = {"method": method, "trainer": trainer, "state": state,
         "step_args": step_args, "record": record, "step": [],
         "step_cpu": [], "update": [], "refresh": [], "refresh_cpu": []}
  if args.update_calls and method.conv == "plain":
    _compile_update(run, tx, state)
  if method.learned:
    _compile_refresh(run, inputs, args)
  return run


def _log_prepared(name: str, run: dict[str, Any]) -> None:
  record = run["record"]
  extra = (f", update compile {record['update_compile_s']:.1f} s"
           if "update_compile_s" in record else "")
  if "refresh_compile_s" in record:
    extra += f", refresh compile {record['refresh_compile_s']:.1f} s"
  _log(f"  {name} {record['method']}: step compile {record['compile_s']:.1f} s"
       f"{extra}, memory {record['memory']['total'] / 2**20:.1f} MiB")


def _time_once(run: dict[str, Any], args, inputs: _Inputs,
               refresh: bool) -> None:
  """One round of one method: its steps, its update alone, its refresh."""
  trainer = run["trainer"]

  def steps():
    state = run["state"]
    for _ in range(args.steps_per_round):
      state, _ = trainer.train_step(state, *run["step_args"])
    return state

  run["state"], wall, cpu = _timed(steps)
  run["step"].append(wall / args.steps_per_round)
  run["step_cpu"].append(cpu / args.steps_per_round)
  if "update_fn" in run:

    def updates():
      out = None
      for _ in range(args.update_calls):
        out = run["update_fn"]()
      return out

    _, wall, _ = _timed(updates)
    run["update"].append(wall / args.update_calls)
  if refresh:
    phase = inputs.refresh_phase
    _, wall, cpu = _timed(lambda: trainer.refresh(
        run["state"], phase, phase.train_index).opt_state)
    run["refresh"].append(wall)
    run["refresh_cpu"].append(cpu)


def _summarize(run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
  """A method's record: medians, ratios against SGD, compilation counts."""
  record = run["record"]
  record.update(step_s=run["step"], step_cpu_s=run["step_cpu"],
                step_s_median=_median(run["step"]),
                step_cpu_s_median=_median(run["step_cpu"]))
  record["time_ratio"] = record["step_s_median"] / _median(base["step"])
  record["cpu_time_ratio"] = (record["step_cpu_s_median"]
                              / _median(base["step_cpu"]))
  paired = [a / b for a, b in zip(run["step"], base["step"])]
  record.update(paired_time_ratios=paired,
                paired_time_ratio_median=_median(paired),
                paired_time_ratio_iqr=_quartiles(paired))
  record["memory_ratio"] = (record["memory"]["total"]
                            / base["record"]["memory"]["total"])
  if run["update"]:
    record.update(update_s=run["update"],
                  update_s_median=_median(run["update"]))
    record["update_overhead_of_step"] = (
        (record["update_s_median"] - _median(base["update"]))
        / _median(base["step"]))
  if run["refresh"]:
    record.update(refresh_s=run["refresh"], refresh_cpu_s=run["refresh_cpu"],
                  refresh_s_median=_median(run["refresh"]))
  record["train_step_compilations"] = run["trainer"].step_compilations()
  if run["method"].learned:
    record["refresh_compilations"] = run["trainer"].refresh_compilations()
  return record


def run_model(name: str, args, methods: Sequence[Method]) -> dict[str, Any]:
  """Compiles, measures memory and times every method of one model."""
  start = time.perf_counter()
  inputs = _inputs(args)
  variables: dict[str, Any] = {}
  runs = {}
  for method in methods:
    runs[method.name] = _prepare(name, method, args, inputs, variables)
    _log_prepared(name, runs[method.name])
  order = list(runs)
  for r in range(args.rounds):
    shift = r % len(order)  # interleaved, each round in another order.
    for method_name in order[shift:] + order[:shift]:
      run = runs[method_name]
      _time_once(run, args, inputs,
                 refresh=run["method"].learned and r < args.refresh_repeats)
    line = ", ".join(f"{m} {1e3 * runs[m]['step'][-1]:.0f}" for m in order)
    _log(f"  {name} round {r + 1}/{args.rounds} (ms/step): {line}")
  records = [_summarize(run, runs["sgd"]) for run in runs.values()]
  by_name = {r["method"]: r for r in records}
  for r in records:
    if "sgs" in by_name:
      r["time_vs_sgs"] = r["step_s_median"] / by_name["sgs"]["step_s_median"]
      r["memory_vs_sgs"] = (r["memory"]["total"]
                            / by_name["sgs"]["memory"]["total"])
    r["goals_met"] = goal_verdicts(r)
  return {"model": name, "width": args.width or _models.DEFAULT_WIDTH[name],
          "methods": records, "wall_s": time.perf_counter() - start}


def goal_verdicts(record: dict[str, Any]) -> dict[str, bool]:
  """Which goals a method's record meets (empty: the method has none)."""
  name = record["method"]
  limit = {"sgs": GOALS["sgs_time"], "cdg": GOALS["cdg_time"]}.get(name)
  if limit is not None:
    out = {"step_time": record["time_ratio"] <= limit}
    if "update_overhead_of_step" in record:
      out["update_alone"] = 1.0 + record["update_overhead_of_step"] <= limit
    return out
  if name == "acb-branched" and "time_vs_sgs" in record:
    return {"time_vs_sgs": record["time_vs_sgs"] >= GOALS["acb_time_vs_sgs"],
            "memory_vs_sgs": (record["memory_vs_sgs"]
                              >= GOALS["acb_memory_vs_sgs"])}
  return {}


def _goal_check(record: dict[str, Any]) -> str:
  verdicts = goal_verdicts(record)
  labels = {"step_time": "step", "update_alone": "update-alone",
            "time_vs_sgs": "time", "memory_vs_sgs": "memory"}
  return ", ".join(f"{labels[k]} {_met(v)}" for k, v in verdicts.items())


def _met(ok: bool) -> str:
  return "met" if ok else "NOT MET"


def format_model_table(result: dict[str, Any], args) -> str:
  mib = 2**20
  lines = [f"{result['model']} (width {result['width']}, batch "
           f"{args.batch_size}, {args.num_classes} classes, 32x32x3; "
           f"{args.rounds} rounds x {args.steps_per_round} step(s), "
           "medians)"]
  header = (f"{'method':<16} {'ms/step':>8} {'x sgd':>6} "
            f"{'paired [IQR]':>19} {'upd +%':>7} {'mem MiB':>8} "
            f"{'x sgd':>6} {'x sgs':>11} {'compile s':>9}  goal / verdict")
  lines += [header, "-" * len(header)]
  for r in result["methods"]:
    lo, hi = r["paired_time_ratio_iqr"]
    upd = (f"{100 * r['update_overhead_of_step']:+.2f}"
           if "update_overhead_of_step" in r else "-")
    vs_sgs = (f"{r['time_vs_sgs']:.2f}t {r['memory_vs_sgs']:.2f}m"
              if "time_vs_sgs" in r and r["method"].endswith("branched")
              else "")
    goal = next(m.goal for m in METHODS if m.name == r["method"])
    verdict = _goal_check(r)
    notes = f"{goal}: {verdict}" if goal else ""
    if r["train_step_compilations"] != 1:
      notes += f" (train step compiled {r['train_step_compilations']}x)"
    lines.append(
        f"{r['method']:<16} {1e3 * r['step_s_median']:8.1f} "
        f"{r['time_ratio']:6.3f} {r['paired_time_ratio_median']:6.3f} "
        f"[{lo:5.3f},{hi:5.3f}] {upd:>7} "
        f"{r['memory']['total'] / mib:8.1f} {r['memory_ratio']:6.3f} "
        f"{vs_sgs:>11} {r['compile_s']:9.1f}  {notes}")
  return "\n".join(lines)


def table_footer(results: Sequence[dict[str, Any]]) -> str:
  memories = [r["memory"] for m in results for r in m["methods"]]
  if all(m["xla_peak"] is None for m in memories):
    peak_note = ("XLA reports no peak memory on this backend "
                 "(peak_memory_in_bytes is 0)")
  elif all(abs(m["xla_peak"] - m["argument"] - m["output"])
           <= 0.01 * m["total"] for m in memories):
    peak_note = ("XLA on CPU reports no real peak: its peak_memory_in_bytes "
                 "equals argument + output bytes, temporaries left out "
                 "(kept in the JSON as memory.xla_peak, not used)")
  else:
    peak_note = ("XLA's peak_memory_in_bytes is in the JSON "
                 "(memory.xla_peak)")
  return "\n".join([
      "x sgd = ratio of median step times (wall); paired = median of the "
      "per-round ratios to sgd, with its interquartile range (noise gauge);",
      "upd +% = extra time of the optimizer update alone over sgd's update, "
      "as % of sgd's whole step (the low-noise estimate);",
      "mem = compiled train step argument + output + temp - alias bytes "
      "(no donation: the state counts as input and as output); "
      f"{peak_note};",
      "x sgs = branched network's time (t) and memory (m) over sgs's.",
      "Published peers (OREPA paper, ImageNet ResNet-18 on 4xV100, vs the "
      "plain network): "
      + "; ".join(f"{k} {v['time']}x time, {v['memory']}x memory"
                  for k, v in PEERS.items()) + ".",
  ])


# -- part 2 ------------------------------------------------------------------


def real_run(args) -> dict[str, Any]:
  """sgd vs sgs-learned on digits (small VGG), alternating epoch by epoch."""
  data = _data.load_raw(REAL_RUN["dataset"])
  x_train = data.x_train
  phase = _train.Phase(_train.preload(x_train, data.y_train),
                       np.arange(len(x_train)),
                       _train.normalization(x_train), {})
  batch = min(REAL_RUN["batch_size"], len(x_train))
  steps_per_epoch = len(x_train) // batch
  model = _models.make_model(REAL_RUN["model"], _data.num_classes("digits"),
                             tiny=args.tiny)
  runs = {}
  variables = None
  for method in (compare.METHODS["sgd"], compare.METHODS["sgs-learned"]):
    trainer = _train.Trainer(model, method.build(compare.Hyper()),
                             refresh=method.learned, prng_impl="rbg")
    if variables is None:
      variables = trainer.init_variables(0, x_train)
    state = trainer.init(variables, lr=_hyper(batch)["lr"],
                         total_steps=args.real_epochs * steps_per_epoch)
    trainer.warm_up(state, phase, batch,
                    refresh_count=REAL_RUN["refresh_batches"] * batch)
    runs[method.name] = {"trainer": trainer, "state": state, "epoch_s": [],
                         "refresh_s": [], "learned": method.learned}
  for epoch in range(args.real_epochs):
    order = list(runs) if epoch % 2 == 0 else list(runs)[::-1]
    for name in order:
      run = runs[name]
      result = run["trainer"].fit(
          run["state"], phase, seed=epoch, epochs=1, batch_size=batch,
          refresh_every=1 if run["learned"] else None,
          refresh_batches=REAL_RUN["refresh_batches"], progress=False)
      run["state"] = result.final_state
      run["epoch_s"] += result.epoch_time_s
      run["refresh_s"] += result.refresh_time_s
  out = {"dataset": REAL_RUN["dataset"], "model": REAL_RUN["model"],
         "width": _models.TINY_WIDTH if args.tiny else
                  _models.DEFAULT_WIDTH[REAL_RUN["model"]],
         "batch_size": batch, "steps_per_epoch": steps_per_epoch,
         "epochs": args.real_epochs, "refresh_every_epochs": 1,
         "refresh_batches": REAL_RUN["refresh_batches"], "methods": {}}
  for name, run in runs.items():
    trainer = run["trainer"]
    total = (sum(run["epoch_s"]) + sum(run["refresh_s"])
             + trainer.compile_time_s + trainer.refresh_compile_time_s)
    out["methods"][name] = {
        "epoch_s": run["epoch_s"], "refresh_s": run["refresh_s"],
        "train_step_first_call_s": trainer.compile_time_s,
        "refresh_first_call_s": trainer.refresh_compile_time_s,
        "total_s": total,
        "train_step_compilations": trainer.step_compilations(),
        "refresh_compilations": trainer.refresh_compilations(),
    }
  sgd, learned = out["methods"]["sgd"], out["methods"]["sgs-learned"]
  out["epoch_time_ratio"] = (_median(learned["epoch_s"])
                             / _median(sgd["epoch_s"]))
  out["total_ratio"] = learned["total_s"] / sgd["total_s"]
  out["total_ratio_without_compiles"] = (
      (sum(learned["epoch_s"]) + sum(learned["refresh_s"]))
      / sum(sgd["epoch_s"]))
  return out


def project(result: dict[str, Any], batch_size: int) -> dict[str, Any]:
  """The paper's CIFAR-100 schedule from one model's measured pieces."""
  by_name = {r["method"]: r for r in result["methods"]}
  sgd, learned = by_name["sgd"], by_name["sgs-learned"]
  steps_per_epoch = math.ceil(PAPER["train_images"] / batch_size)
  steps = PAPER["epochs"] * steps_per_epoch
  refreshes = len(range(0, PAPER["epochs"], PAPER["refresh_every"]))
  t_sgd, t_learned = sgd["step_s_median"], learned["step_s_median"]
  t_refresh = learned["refresh_s_median"]
  c_refresh = learned["refresh_compile_s"]
  refresh_total = refreshes * t_refresh + c_refresh
  sgd_total = steps * t_sgd + sgd["compile_s"]
  learned_total = steps * t_learned + learned["compile_s"] + refresh_total
  out = {
      "model": result["model"], "width": result["width"],
      "batch_size": batch_size, "paper_batch_size": PAPER["batch_size"],
      "epochs": PAPER["epochs"], "steps_per_epoch": steps_per_epoch,
      "steps": steps, "refreshes": refreshes,
      "refresh_images": learned["refresh_images"],
      "sgd_step_s": t_sgd, "learned_step_s": t_learned,
      "refresh_s": t_refresh, "refresh_compile_s": c_refresh,
      "sgd_step_compile_s": sgd["compile_s"],
      "learned_step_compile_s": learned["compile_s"],
      "sgd_total_s": sgd_total, "learned_total_s": learned_total,
      "ratio": learned_total / sgd_total,
      # Same step time for both: the refreshes and their compile alone.
      "ratio_refresh_only": 1.0 + refresh_total / sgd_total,
  }
  if "update_overhead_of_step" in learned:
    extra = learned["update_overhead_of_step"] * t_sgd
    out["ratio_step_from_update"] = (
        (steps * (t_sgd + extra) + learned["compile_s"] + refresh_total)
        / sgd_total)
  out["goal_met"] = out["ratio"] <= GOALS["learned_training"]
  return out


def format_goals(results: Sequence[dict[str, Any]],
                 projection: dict[str, Any] | None) -> str:
  """One line per goal and model: met or not."""
  lines = ["Goals:"]
  for result in results:
    for r in result["methods"]:
      for goal, ok in r["goals_met"].items():
        lines.append(f"  {result['model']:<9} {r['method']:<13} {goal:<13} "
                     f"{_met(ok)}")
  if projection is not None:
    lines.append(f"  {projection['model']:<9} {'sgs-learned':<13} "
                 f"{'training':<13} {_met(projection['goal_met'])} "
                 f"(projected x{projection['ratio']:.4f})")
  return "\n".join(lines)


def format_part2(real: dict[str, Any] | None,
                 projection: dict[str, Any] | None) -> str:
  lines = []
  if real is not None:
    sgd, learned = real["methods"]["sgd"], real["methods"]["sgs-learned"]
    lines += [
        f"Short real run: {real['model']} on {real['dataset']}, "
        f"{real['epochs']} epochs x {real['steps_per_epoch']} steps of batch "
        f"{real['batch_size']} per method (alternating), sgs-learned "
        f"refreshed every epoch from {real['refresh_batches']} batches:",
        f"  sgd:         {1e3 * _median(sgd['epoch_s']):8.1f} ms/epoch, "
        f"first step (compile) {sgd['train_step_first_call_s']:.1f} s, "
        f"total {sgd['total_s']:.2f} s",
        f"  sgs-learned: {1e3 * _median(learned['epoch_s']):8.1f} ms/epoch, "
        f"refresh {1e3 * _median(learned['refresh_s']):.1f} ms (median), "
        f"first step {learned['train_step_first_call_s']:.1f} s, first "
        f"refresh (compile) {learned['refresh_first_call_s']:.1f} s, total "
        f"{learned['total_s']:.2f} s",
        f"  epoch time x{real['epoch_time_ratio']:.3f}; whole run "
        f"x{real['total_ratio']:.3f} with compiles, "
        f"x{real['total_ratio_without_compiles']:.3f} without (a refresh "
        f"every {real['steps_per_epoch']} steps, vs every "
        f"{PAPER['refresh_every'] * 391} in the paper: refresh-heavy by "
        "construction)",
    ]
  if projection is not None:
    p = projection
    scaled = ("" if p["batch_size"] == p["paper_batch_size"] else
              f" (timed at batch {p['batch_size']}, not the paper's "
              f"{p['paper_batch_size']}: the same 200 x 50000 images in "
              f"{p['steps']} steps of {p['batch_size']})")
    lines += [
        f"Projection to the paper's CIFAR-100 schedule for {p['model']} "
        f"(width {p['width']}): {p['epochs']} epochs x "
        f"{p['steps_per_epoch']} steps{scaled}, {p['refreshes']} refreshes "
        f"on {p['refresh_images']} images + 1 refresh compile:",
        f"  step: sgd {1e3 * p['sgd_step_s']:.1f} ms, sgs-learned "
        f"{1e3 * p['learned_step_s']:.1f} ms; refresh "
        f"{p['refresh_s']:.2f} s; refresh compile "
        f"{p['refresh_compile_s']:.1f} s; train-step compile "
        f"{p['sgd_step_compile_s']:.1f} / {p['learned_step_compile_s']:.1f} s",
        f"  sgd {p['sgd_total_s'] / 3600:.2f} h, sgs-learned "
        f"{p['learned_total_s'] / 3600:.2f} h on this CPU: projected ratio "
        f"x{p['ratio']:.4f} (goal <= {GOALS['learned_training']}x: "
        f"{_met(p['ratio'] <= GOALS['learned_training'])})",
        f"  refreshes + compile alone (equal step times): "
        f"x{p['ratio_refresh_only']:.4f}"
        + (f"; with the step overhead from the update-alone timing: "
           f"x{p['ratio_step_from_update']:.4f}"
           if "ratio_step_from_update" in p else ""),
        "  (the official code reports +5% to +13% GPU hours: VGG-11 0.62 -> "
        "0.65, VGG-16 0.83 -> 0.89, ResNet-18 1.02 -> 1.15)",
    ]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs both parts; returns the results dict (also written by --out)."""
  args = parse_args(argv)
  start = time.perf_counter()
  load_start = _report.environment().get("loadavg")
  _log(f"models {args.models}, batch {args.batch_size}, width "
       f"{args.width or 'default'}, {args.rounds} rounds x "
       f"{args.steps_per_round} step(s); {os.cpu_count()} CPU(s), load "
       f"average {load_start}")
  results = []
  projection = None
  for name in args.models:
    methods = [m for m in METHODS
               if not m.learned or name == args.projection_model]
    _log(f"{name}: compiling {len(methods)} train steps ...")
    result = run_model(name, args, methods)
    results.append(result)
    _log(format_model_table(result, args))
    if name == args.projection_model:
      projection = project(result, args.batch_size)
  real = None
  if args.real_epochs > 0:
    _log("short real run (digits) ...")
    real = real_run(args)
  tables = [format_model_table(r, args) for r in results]
  text = "\n\n".join(tables + [table_footer(results),
                               format_part2(real, projection),
                               format_goals(results, projection)])
  total = time.perf_counter() - start
  print()
  print(text)
  print(f"total wall time {total:.1f} s")
  out = {
      "settings": {**vars(args), "paper_schedule": PAPER, "goals": GOALS,
                   "peers_orepa_paper": PEERS, "real_run": REAL_RUN,
                   "input_shape": [32, 32, 3], "prng_impl": "rbg",
                   "hyper": _hyper(args.batch_size)},
      "environment": _report.environment(),
      "loadavg_start": load_start,
      "date": datetime.datetime.now(datetime.UTC).isoformat(),
      "models": results,
      "projection": projection,
      "real_run": real,
      "table": text,
      "total_wall_time_s": total,
  }
  if args.out:
    _report.write_json(args.out, out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
