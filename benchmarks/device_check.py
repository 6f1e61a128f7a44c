r"""One command that measures, on an accelerator, what the defaults rest on.

Run from the checkout, with nothing to install (it imports only jax, flax,
optax, numpy and this package)::

  PYTHONPATH=. python -m benchmarks.device_check --out results/device.json
  python -m benchmarks.device_check --tiny         # a CPU smoke run
  python -m benchmarks.device_check --only checks,cdg,estimator

It prints one table per part and writes one JSON (``--out``) with the keys

* ``backend``, ``device_kind``, ``jax_version``, ``date``;
* ``checks``: on the device, each true or false with its measured error:
  SGS (``sgs("acb")`` on a merged conv) equals the ACB-branched conv trained
  with SGD to float32 tolerance; ``cdg(solver="dense")`` equals
  ``cdg(solver="fft")``; ``counting="matmul"`` gives the same dependence
  matrices as ``counting="scatter"``;
* ``cdg``: the CDG update alone (every ResNet-18 kernel's gradient) per
  solver, and the solver ``solver=None`` picked here;
* ``estimator``: the estimator on the paper's workload (2 batches of 128
  images through VGG-11: every conv's input) per counting path;
* ``refresh``: compile and run time of a whole refresh (capture + estimate)
  on the device and on the host CPU, and its share of a 200-epoch run at the
  paper's schedule (every 5 epochs from 2 batches of 128);
* ``step_ratios``: the whole train step (forward, backward, update) of each
  method over plain SGD's, for CIFAR-shaped VGG-11 and ResNet-18 at batch
  128, in float32 and in bfloat16 (params and compute);
* ``peak_memory_bytes``: the device's peak, where the backend reports it.

Times are medians of interleaved repeats, after a compile; ratios are taken
side by side in one process. The rule that ``counting=None`` and
``solver=None`` follow is read off the ``cdg`` and ``estimator`` parts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import datetime
import functools
import json
import os
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _models
from benchmarks import _train
import sgs_optax

PARTS = ("checks", "cdg", "estimator", "refresh", "steps")
MODELS = ("vgg11", "resnet18")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The paper's CIFAR-100 schedule: 200 epochs of 50000 images at batch 128,
# a refresh every 5 epochs from 2 batches.
PAPER = {"epochs": 200, "train_images": 50000, "batch_size": 128,
         "refresh_every": 5, "refresh_batches": 2}
FULL = {"batch_size": 128, "width": None, "repeats": 5, "image": 32}
TINY = {"batch_size": 8, "width": _models.TINY_WIDTH, "repeats": 2,
        "image": 32}


def _sgd(*first: optax.GradientTransformation) -> optax.GradientTransformation:
  """The SGS paper's chain: transforms, coupled decay, heavy-ball momentum."""
  return optax.chain(*first, optax.add_decayed_weights(5e-4),
                     optax.sgd(0.1, momentum=0.9))


# name -> (conv of the model, the chain)
METHODS: dict[str, tuple[str, Callable[[], optax.GradientTransformation]]] = {
    "sgd": ("plain", _sgd),
    "sgs": ("plain", lambda: _sgd(sgs_optax.sgs("acb"))),
    "cdg-fft": ("plain", lambda: _sgd(sgs_optax.cdg(solver="fft"))),
    "cdg-dense": ("plain", lambda: _sgd(sgs_optax.cdg(solver="dense"))),
    "sgs+cdg": ("plain", lambda: _sgd(sgs_optax.sgs("acb"), sgs_optax.cdg())),
    "acb-branched": ("acb", _sgd),
}


def _log(message: str) -> None:
  print(message, flush=True)


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of ``fn()`` (blocked), after one untimed call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(statistics.median(times))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def _peak_memory() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else int(peak)


def _rel_error(a: Any, b: Any) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# -- checks ------------------------------------------------------------------


def check_sgs_equals_branched(steps: int = 5) -> dict[str, Any]:
  """SGD on an ACB-branched conv vs SGD on the merged conv with sgs("acb")."""
  branches = [(3, 3), (1, 3), (3, 1)]
  branched = sgs_optax.BranchedConv(8, (3, 3), branches, use_bias=False)
  merged = nn.Conv(8, (3, 3), padding="SAME", use_bias=False)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (4, 8, 8, 3))
  target = jax.random.normal(keys[1], (4, 8, 8, 8))
  params_b = branched.init(keys[2], x)["params"]
  params_m = {"kernel": sgs_optax.merge_branches(
      params_b, (3, 3), branches)["kernel"]}

  def train(model, params, tx):
    loss = lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2)
    state = tx.init(params)
    for _ in range(steps):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    return params

  sgd = lambda: optax.sgd(0.05, momentum=0.9)
  # Full float32 convolutions: TF32 or bf16 passes would differ between one
  # merged conv and three branch convs by more than the check's tolerance.
  with jax.default_matmul_precision("float32"):
    params_b = jax.jit(lambda p: train(branched, p, sgd()))(params_b)
    params_m = jax.jit(lambda p: train(
        merged, p, optax.chain(sgs_optax.sgs("acb"), sgd())))(params_m)
  want = sgs_optax.merge_branches(params_b, (3, 3), branches)["kernel"]
  error = _rel_error(params_m["kernel"], want)
  return {"ok": error < 1e-4, "relative_error": error, "steps": steps}


def check_dense_cdg_equals_fft() -> dict[str, Any]:
  """Both CDG solvers on every metric and boundary, relative 1e-5."""
  shapes = [(3, 3, 64, 64), (3, 3, 3, 64), (1, 1, 64, 128), (3, 3, 8, 10)]
  keys = jax.random.split(jax.random.key(1), len(shapes))
  grads = {f"k{i}": {"kernel": jax.random.normal(k, s)}
           for i, (k, s) in enumerate(zip(keys, shapes))}
  worst = 0.0
  for metric in ("sobolev", "reweighted_l2", "reweighted_sobolev"):
    for boundary in ("periodic", "neumann"):
      out = {}
      for solver in ("fft", "dense"):
        tx = sgs_optax.cdg(metric=metric, boundary=boundary, solver=solver)
        out[solver] = jax.jit(tx.update)(grads, tx.init(grads))[0]
      for a, b in zip(jax.tree.leaves(out["dense"]),
                      jax.tree.leaves(out["fft"])):
        worst = max(worst, _rel_error(a, b))
  return {"ok": worst < 1e-5, "relative_error": worst}


def check_matmul_counts() -> dict[str, Any]:
  """The two counting paths give the same dependence matrices."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(2), (8, 16, 16, 16)))
  worst = 0.0
  for size, removal in (((3, 3), False), ((3, 3), True), ((5, 5), False)):
    d = {c: sgs_optax.spatial_dependence(x, size, padding="SAME",
                                          diagonal_removal=removal,
                                          counting=c)
         for c in ("scatter", "matmul")}
    a, b = np.asarray(d["matmul"]), np.asarray(d["scatter"])
    if not np.array_equal(np.isnan(a), np.isnan(b)):
      return {"ok": False, "max_abs_difference": float("nan")}
    worst = max(worst, float(np.nanmax(np.abs(a - b))))
  return {"ok": worst <= 1e-6, "max_abs_difference": worst}


def run_checks() -> dict[str, Any]:
  return {"sgs_equals_branched": check_sgs_equals_branched(),
          "dense_cdg_equals_fft": check_dense_cdg_equals_fft(),
          "matmul_counts_equal_scatter": check_matmul_counts()}


# -- models ------------------------------------------------------------------


class _Cast(nn.Module):
  """Runs ``inner`` on inputs cast to ``dtype``; float32 logits out.

  With params cast to the same dtype, every conv, norm and dense layer then
  computes in it (bfloat16 training, as on TPUs).
  """

  inner: nn.Module
  dtype: Any = jnp.float32

  def __call__(self, x, train: bool = False):
    return self.inner(x.astype(self.dtype), train=train).astype(jnp.float32)


def _model(name: str, conv: str, dtype: Any, settings: dict[str, Any]):
  factory = (_models.plain_conv if conv == "plain"
             else _models.branched_conv(conv))
  inner = _models.make_model(name, 100, conv=factory,
                             width=settings["width"])
  return _Cast(inner, dtype)


def _images(count: int, settings: dict[str, Any], seed: int = 0):
  shape = (count, settings["image"], settings["image"], 3)
  return jax.random.normal(jax.random.key(seed), shape)


def _phase(images: jax.Array) -> _train.Phase:
  """A phase over images already on the device, passed through as they are."""
  labels = jnp.zeros(len(images), jnp.int32)
  return _train.Phase(_train.DeviceSplit(images, labels),
                      np.arange(len(images)),
                      _train.Normalization(jnp.zeros(3), jnp.ones(3)), {})


def _variables(model, images, dtype) -> dict[str, Any]:
  variables = model.init(jax.random.key(0), images[:1], train=False)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(
      x.dtype, jnp.floating) else x
  return {"params": jax.tree.map(cast, variables["params"]),
          "batch_stats": variables["batch_stats"]}


# -- cdg, estimator, refresh -------------------------------------------------


def run_cdg(settings: dict[str, Any]) -> dict[str, Any]:
  """The CDG update alone on every ResNet-18 kernel, per solver."""
  model = _model("resnet18", "plain", jnp.float32, settings)
  params = _variables(model, _images(1, settings), jnp.float32)["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  grads = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype)
                             for k, x in zip(keys, leaves)])
  out = {"model": "resnet18", "width": settings["width"] or 64,
         "update_s": {}}
  for solver in ("fft", "dense", "tridiagonal", None):
    tx = sgs_optax.cdg(solver=solver)
    update = jax.jit(tx.update)
    state = tx.init(params)
    out["update_s"][str(solver)] = _median_time(
        functools.partial(update, grads, state), settings["repeats"])
  return out


def _capture(model, variables, images):
  return sgs_optax.capture_conv_inputs(model, variables, images, train=False)


def run_estimator(settings: dict[str, Any]) -> dict[str, Any]:
  """Every VGG-11 conv input of 2 batches, through each counting path."""
  model = _model("vgg11", "plain", jnp.float32, settings)
  images = _images(PAPER["refresh_batches"] * settings["batch_size"],
                   settings, seed=4)
  variables = _variables(model, images, jnp.float32)
  captured = jax.jit(_capture, static_argnums=0)(model, variables, images)
  state = sgs_optax.sgs().init(variables["params"])
  out = {"workload": f"{len(images)} images through VGG-11",
         "compile_s": {}, "run_s": {}}
  for counting in ("scatter", "matmul"):
    refresh = jax.jit(functools.partial(sgs_optax.refresh_scalings,
                                        counting=counting))
    compiled, out["compile_s"][counting] = _timed(
        lambda refresh=refresh: refresh.lower(state, captured).compile())
    out["run_s"][counting] = _median_time(
        functools.partial(compiled, state, captured), settings["repeats"])
  return out


def _refresh_fn(model):
  def refresh(variables, opt_state, images):
    captured = _capture(model, variables, images)
    return sgs_optax.refresh_scalings(opt_state, captured)
  return refresh


def _on_device(model, variables, opt_state, images, repeats: int):
  """Capture and estimate in one jitted call on the default device."""
  refresh = jax.jit(_refresh_fn(model))
  compiled, compile_s = _timed(
      lambda: refresh.lower(variables, opt_state, images).compile())
  run_s = _median_time(lambda: compiled(variables, opt_state, images),
                       repeats)
  return {"compile_s": compile_s, "run_s": run_s}


def _on_host(model, variables, opt_state, images, repeats: int):
  """Capture on the device, estimate on the host CPU (``device=``)."""
  capture = jax.jit(_capture, static_argnums=0)
  host = jax.devices("cpu")[0]
  refresh = lambda: sgs_optax.refresh_scalings(
      opt_state, capture(model, variables, images), device=host)
  _, first_s = _timed(refresh)  # Compiles the capture and the estimate.
  run_s = _median_time(refresh, repeats)
  return {"compile_s": max(first_s - run_s, 0.0), "run_s": run_s}


def run_refresh(settings: dict[str, Any],
                step_s: float | None) -> dict[str, Any]:
  """A whole refresh on the device and on the host, and its training share."""
  model = _model("vgg11", "plain", jnp.float32, settings)
  images = _images(PAPER["refresh_batches"] * settings["batch_size"],
                   settings, seed=5)
  variables = _variables(model, images, jnp.float32)
  opt_state = _sgd(sgs_optax.sgs()).init(variables["params"])
  args = (model, variables, opt_state, images, settings["repeats"])
  out = {"model": "vgg11", "images": len(images),
         "device": _on_device(*args), "host": _on_host(*args)}
  if step_s is None:
    step_s = _sgd_step_time(settings)
  steps = PAPER["epochs"] * -(-PAPER["train_images"] // PAPER["batch_size"])
  refreshes = len(range(0, PAPER["epochs"], PAPER["refresh_every"]))
  out.update(sgd_step_s=step_s, steps=steps, refreshes=refreshes)
  for where in ("device", "host"):
    cost = refreshes * out[where]["run_s"] + out[where]["compile_s"]
    out[where]["share_of_training"] = cost / (steps * step_s + cost)
  return out


# -- whole train steps -------------------------------------------------------


def _step_runner(name: str, method: str, dtype: Any,
                 settings: dict[str, Any], images: jax.Array):
  """The compiled train step of one method, as a zero-argument call."""
  conv, build = METHODS[method]
  model = _model(name, conv, dtype, settings)
  trainer = _train.Trainer(model, build(), prng_impl="rbg")
  state = trainer.init(_variables(model, images, dtype), lr=0.1,
                       total_steps=1000)
  phase = _phase(images)
  args = (phase.train, jnp.arange(len(images)), phase.norm,
          trainer.run_key(0), jnp.asarray(0, jnp.int32))
  compiled = trainer.train_step.lower(state, *args).compile()
  return lambda: compiled(state, *args)


def _sgd_step_time(settings: dict[str, Any]) -> float:
  images = _images(settings["batch_size"], settings)
  step = _step_runner("vgg11", "sgd", jnp.float32, settings, images)
  return _median_time(step, settings["repeats"])


def run_steps(settings: dict[str, Any], models: Sequence[str],
              dtypes: Sequence[str]) -> dict[str, Any]:
  """Median step time of every method over sgd's, in interleaved rounds."""
  images = _images(settings["batch_size"], settings, seed=6)
  out = {"batch_size": settings["batch_size"],
         "width": settings["width"] or 64, "ms_per_step": {}, "ratios": {}}
  for name in models:
    for dtype_name in dtypes:
      steps = {m: _step_runner(name, m, DTYPES[dtype_name], settings, images)
               for m in METHODS}
      times = {m: [] for m in steps}
      for r in range(settings["repeats"] + 1):
        order = list(steps)[r % len(steps):] + list(steps)[:r % len(steps)]
        for m in order:
          _, elapsed = _timed(steps[m])
          if r:  # The first round warms up.
            times[m].append(elapsed)
      medians = {m: statistics.median(t) for m, t in times.items()}
      key = f"{name}/{dtype_name}"
      out["ms_per_step"][key] = {m: 1e3 * t for m, t in medians.items()}
      out["ratios"][key] = {m: t / medians["sgd"] for m, t in medians.items()
                            if m != "sgd"}
      _log(f"  {key}: " + ", ".join(
          f"{m} {v:.3f}x" for m, v in out["ratios"][key].items()))
  return out


# -- report ------------------------------------------------------------------


def format_report(result: dict[str, Any]) -> str:
  lines = [f"device check: {result['backend']} ({result['device_kind']}), "
           f"jax {result['jax_version']}, {result['date']}"]
  checks = result.get("checks")
  if checks:
    lines.append("checks: " + ", ".join(
        f"{name} {'ok' if c['ok'] else 'FAILED'}"
        for name, c in checks.items()))
  cdg = result.get("cdg")
  if cdg:
    lines.append("cdg update alone (resnet18): " + ", ".join(
        f"{s} {1e3 * t:.2f} ms" for s, t in cdg["update_s"].items()))
  est = result.get("estimator")
  if est:
    lines.append(f"estimator ({est['workload']}): " + ", ".join(
        f"{c} {est['run_s'][c]:.3f} s (compile {est['compile_s'][c]:.1f} s)"
        for c in est["run_s"]))
  ref = result.get("refresh")
  if ref:
    lines.append("refresh (vgg11, capture + estimate): " + "; ".join(
        f"{w} {ref[w]['run_s']:.3f} s, compile {ref[w]['compile_s']:.1f} s, "
        f"{100 * ref[w]['share_of_training']:.3f}% of a 200-epoch run"
        for w in ("device", "host")))
  steps = result.get("step_ratios")
  if steps:
    lines.append(f"train step over sgd (batch {steps['batch_size']}):")
    methods = [m for m in METHODS if m != "sgd"]
    lines.append(f"  {'model/dtype':<18} {'sgd ms':>8} "
                 + " ".join(f"{m:>12}" for m in methods))
    for key, ratios in steps["ratios"].items():
      lines.append(f"  {key:<18} {steps['ms_per_step'][key]['sgd']:8.2f} "
                   + " ".join(f"{ratios[m]:12.3f}" for m in methods))
  if result.get("peak_memory_bytes") is not None:
    lines.append(f"peak device memory {result['peak_memory_bytes'] / 2**30:.2f}"
                 " GiB")
  lines.append(f"total {result['total_s']:.0f} s (" + ", ".join(
      f"{p} {t:.0f} s" for p, t in result["part_s"].items()) + ")")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.device_check", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true",
                 help="a CPU smoke run: width 4, batch 8, 2 repeats")
  p.add_argument("--only", default=",".join(PARTS),
                 help=f"comma list of parts to run ({', '.join(PARTS)})")
  p.add_argument("--models", default=None,
                 help="models of the steps part (default: both; vgg11 "
                 "with --tiny)")
  p.add_argument("--dtypes", default=",".join(DTYPES),
                 help="dtypes of the steps part")
  p.add_argument("--out", default="results/device_check.json",
                 help="the JSON file ('' to skip)")
  args = p.parse_args(argv)
  if args.models is None:
    args.models = "vgg11" if args.tiny else ",".join(MODELS)
  for name, allowed in (("only", PARTS), ("models", MODELS),
                        ("dtypes", tuple(DTYPES))):
    values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
    unknown = sorted(set(values) - set(allowed))
    if unknown or not values:
      p.error(f"--{name}: unknown {unknown}; choose from {list(allowed)}")
    setattr(args, name, values)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  settings = TINY if args.tiny else FULL
  start = time.perf_counter()
  device = jax.devices()[0]
  result: dict[str, Any] = {
      "backend": jax.default_backend(), "device_kind": device.device_kind,
      "jax_version": jax.__version__, "sgs_optax_version":
      sgs_optax.__version__, "tiny": args.tiny, "settings": dict(settings),
      "date": datetime.datetime.now(datetime.UTC).isoformat(),
  }
  for part in PARTS:
    result.setdefault({"steps": "step_ratios"}.get(part, part), None)
  _log(f"{result['backend']} ({result['device_kind']}), parts {args.only}")
  part_s = result["part_s"] = {}

  def run(part, fn):
    if part in args.only:
      start_part = time.perf_counter()
      result[{"steps": "step_ratios"}.get(part, part)] = fn()
      part_s[part] = time.perf_counter() - start_part
      # Written after every part: a run cut short keeps what it measured.
      _write(result, args.out)

  run("checks", run_checks)
  run("cdg", lambda: run_cdg(settings))
  run("estimator", lambda: run_estimator(settings))
  run("steps", lambda: run_steps(settings, args.models, args.dtypes))
  steps = result["step_ratios"]
  step_s = None
  if steps and "vgg11/float32" in steps["ms_per_step"]:
    step_s = steps["ms_per_step"]["vgg11/float32"]["sgd"] / 1e3
  run("refresh", lambda: run_refresh(settings, step_s))
  result["peak_memory_bytes"] = _peak_memory()
  result["total_s"] = time.perf_counter() - start
  print(format_report(result), flush=True)
  _write(result, args.out)
  return result


def _write(result: dict[str, Any], path: str) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
