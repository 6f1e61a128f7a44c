r"""Speed of the jitted MI estimator against the official per-channel loop.

Builds the inputs of the eight 3x3 convs of a CIFAR VGG-11 (channels 3, 64,
128, 256, 256, 512, 512, 512 at 32, 16, 8, 8, 4, 4, 2, 2 pixels) for the
paper's CIFAR-10 refresh batch of 2560 images, as seeded synthetic
activations (a smooth image-like field for the stem, ReLUs of blurred noise
with per-channel gains and biases, and a few dead channels, for the rest), one
layer at a time to keep memory in check.

For each layer it times, interleaved over repeats (medians reported):

* ``official``: the official ``feature_map_nmik`` loop, one
  ``fast_histogram.histogram2d`` per channel and displacement, in NumPy, on
  the padded NCHW map it receives from its forward hook (the padding and
  transpose are not timed), with the max-valued samples kept in the last bin
  (the range's top is nudged up by 1e-9 of its width);
* ``jit``: :func:`sgs_optax.spatial_dependence` on the unpadded NHWC input
  (padding included), full data;
* ``jit[m]``: the same with ``subsample=m`` pairs per displacement (ranges
  and the official bin count still from the full data).

It prints per-layer and total times, the speed-ups, the largest absolute
difference of each dependence matrix from the official one, the curve of
speed-up against difference over the subsample sizes, and the compile time of
the estimator over all eight conv inputs (one full refresh). Wall and process
CPU times are both recorded: the machine may be shared, and CPU time is the
steadier of the two there.

Large windows: the cost of one estimator call for a 13x13 window (84
offsets) on the input of a large-kernel stage (256 images, two CIFAR batches,
16x16 ReLU maps, 128 channels) and for a 31-tap 1-D window (15 offsets) on
the input of a Conformer-style depthwise conv (32 sequences of 1000 frames,
256 channels), each beside a 3-tap window on the same input, with the
compile time, the compiled temporaries against the input's size, and the
subsampled variants' difference from the full count.

Counting paths (``--counting``): the estimator's two ways of counting its
histograms, ``counting="scatter"`` and ``counting="matmul"``, timed side by
side (interleaved, medians) on the same inputs of the eight VGG-11 convs at
the paper's refresh size, 2 batches of 128 images, with their compile times,
the ratio of their totals and whether their matrices are identical (they must
be). :func:`run_counting` is the same, for other scripts.

Run from the repository root::

  python -m benchmarks.mi_speed --out results/mi_speed.json
  python -m benchmarks.mi_speed --tiny     # a seconds-long smoke run
  python -m benchmarks.mi_speed --large-windows-only  # 13x13 and 31-tap
  python -m benchmarks.mi_speed --counting  # scatter against matmul
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sgs_optax import spatial_dependence

# The counting paths that `spatial_dependence(..., counting=...)` documents.
COUNTINGS = ("scatter", "matmul")

# (input channels, spatial size) of each 3x3 conv of a CIFAR VGG-11.
VGG11_CONV_INPUTS = (
    (3, 32), (64, 16), (128, 8), (256, 8), (256, 4), (512, 4), (512, 2),
    (512, 2),
)
TINY_CONV_INPUTS = ((3, 8), (16, 4))
DEFAULT_SUBSAMPLES = (4096, 16384, 65536, 262144)
# (name, input shape, window): a large-kernel stage at CIFAR scale and a
# Conformer-style depthwise conv over 10 s of 100 Hz frames.
LARGE_WINDOWS = (
    ("13x13", (256, 16, 16, 128), (13, 13)),
    ("31-tap", (32, 1000, 256), (31,)),
)
TINY_LARGE_WINDOWS = (
    ("13x13", (4, 8, 8, 4), (13, 13)),
    ("31-tap", (4, 64, 4), (31,)),
)
LARGE_SUBSAMPLES = (4096, 16384)
# The paper's refresh on CIFAR-100: 2 training batches of 128 images.
PAPER_REFRESH_IMAGES = 256
FULL_DATA_GOAL = 3.0
STRETCH_GOAL = 10.0
STRETCH_MAX_DIFF = 2e-3


def _box_blur(z: np.ndarray, width: int) -> np.ndarray:
  """Mean over width x width windows of the two spatial axes (valid part)."""
  for axis in (1, 2):
    c = np.cumsum(z, axis=axis, dtype=np.float32)
    zero = np.zeros_like(np.take(c, [0], axis=axis))
    c = np.concatenate([zero, c], axis=axis)
    size = z.shape[axis] - width + 1
    z = (np.take(c, np.arange(width, width + size), axis=axis)
         - np.take(c, np.arange(size), axis=axis)) / width
  return z


def activations(
    n: int, channels: int, size: int, seed: int, stem: bool
) -> np.ndarray:
  """Seeded NHWC float32 conv inputs with realistic spatial structure."""
  rng = np.random.default_rng(seed)
  if stem:
    # Normalised images: a smooth field plus fine texture, per-image
    # brightness; signed, no exact zeros.
    z = rng.standard_normal((n, size + 4, size + 4, channels), np.float32)
    smooth = _box_blur(z, 5)
    fine = z[:, 2:-2, 2:-2] * 0.3
    bright = rng.standard_normal((n, 1, 1, 1), np.float32) * 0.5
    x = 2.0 * smooth + fine + bright
    return (x / x.std()).astype(np.float32)
  # Post-ReLU features: correlated neighbours, per-channel sparsity and
  # scale, and ~2% dead channels (all zeros: NaN entries that are skipped).
  z = rng.standard_normal((n, size + 2, size + 2, channels), np.float32)
  x = _box_blur(z, 3) * 3.0
  gain = np.exp(rng.normal(0.0, 0.5, channels)).astype(np.float32)
  bias = rng.normal(-0.4, 0.6, channels).astype(np.float32)
  bias[rng.random(channels) < 0.02] = -np.inf
  return np.maximum(x * gain + bias, 0).astype(np.float32)


def _official_displacements(kernel_size):
  all_ds = [(dx, dy)
            for dx in range(-(kernel_size[0] // 2), kernel_size[0] // 2 + 1)
            for dy in range(-(kernel_size[1] // 2), kernel_size[1] // 2 + 1)]
  ds = []
  for dx, dy in all_ds:
    if (-dx, -dy) not in ds and (dx, dy) != (0, 0):
      ds.append((dx, dy))
  return ds


def _shannon_entropy(c):
  c = c[np.nonzero(c)]
  c = c / np.sum(c)
  return -np.sum(c * np.log2(c))


def _official_nmik(x, y, k):
  # Imported here: fast_histogram is an optional (benchmarks) dependency.
  from fast_histogram import histogram2d  # pylint: disable=g-import-not-at-top

  bins = int(1 + np.ceil(np.log2(len(x))))

  def value_range(v):
    lo, hi = float(np.min(v)), float(np.max(v))
    # fast_histogram excludes the top edge: nudge it so the max is counted.
    return [lo, hi + ((hi - lo) if hi > lo else max(abs(hi), 1.0)) * 1e-9]

  c_xy = histogram2d(x, y, range=[value_range(x), value_range(y)], bins=bins)
  h_x = _shannon_entropy(np.sum(c_xy, axis=0))
  h_y = _shannon_entropy(np.sum(c_xy, axis=1))
  h_xy = _shannon_entropy(c_xy.flatten())
  nmi = (h_x + h_y - h_xy) / h_xy
  return k * nmi / ((k - 1) * nmi + 1)


def official_dependence(
    padded_nchw: np.ndarray, kernel_size=(3, 3), k: float = 5.0
) -> np.ndarray:
  """The official ``feature_map_nmik`` (torch removed, column centre fixed)."""
  _, channels, height, width = padded_nchw.shape
  rh, rw = (kernel_size[0] - 1) // 2, (kernel_size[1] - 1) // 2
  out = np.empty((channels, *kernel_size))
  out[:, rh, rw] = 1
  ds = _official_displacements(kernel_size)
  with np.errstate(divide="ignore", invalid="ignore"):
    for c in range(channels):
      input_c = padded_nchw[:, c, :, :]
      for d_x, d_y in ds:
        c_x, c_y = -d_x * (d_x < 0), -d_y * (d_y < 0)
        n_x, n_y = c_x + d_x, c_y + d_y
        center = input_c[:, c_x:height - n_x, c_y:width - n_y].flatten()
        neighbor = input_c[:, n_x:height - c_x, n_y:width - c_y].flatten()
        out[c, rh + d_x, rw + d_y] = _official_nmik(center, neighbor, k)
        out[c, rh - d_x, rw - d_y] = out[c, rh + d_x, rw + d_y]
    valid = ~np.isnan(out)
    return np.where(valid, out, 0).sum(0) / valid.sum(0)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
  """Largest |a - b|, NaN where both are NaN counted as equal."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not np.array_equal(np.isnan(a), np.isnan(b)):
    return float("inf")
  return float(np.nanmax(np.abs(a - b))) if a.size else 0.0


def _timed(fn: Callable[[], object]) -> tuple[object, float, float]:
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  out = jax.block_until_ready(out)
  return out, time.perf_counter() - wall, time.process_time() - cpu


def run_layer(
    index: int,
    channels: int,
    size: int,
    n: int,
    subsamples: Sequence[int],
    repeats: int,
    seed: int,
) -> dict:
  """Times and compares every variant on one layer's input."""
  x = activations(n, channels, size, seed + index, stem=index == 0)
  padded = np.ascontiguousarray(
      np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).transpose(0, 3, 1, 2)
  )
  xj = jax.device_put(x)
  key = jax.random.key(seed)
  variants: dict[str, Callable[[], object]] = {
      "official": lambda: official_dependence(padded),
      "jit": lambda: spatial_dependence(xj),
  }
  for m in subsamples:
    variants[f"jit[{m}]"] = (
        lambda m=m: spatial_dependence(xj, subsample=m, key=key)
    )
  first = {}
  for name, fn in variants.items():
    if name != "official":
      _, first[name], _ = _timed(fn)
  wall = {name: [] for name in variants}
  cpu = {name: [] for name in variants}
  results = {}
  names = list(variants)
  for r in range(repeats):
    # Rotate the order so drifting machine load hits every variant alike.
    for name in names[r % len(names):] + names[:r % len(names)]:
      results[name], w, c = _timed(variants[name])
      wall[name].append(w)
      cpu[name].append(c)
  reference = np.asarray(results["official"])
  layer = {
      "layer": index,
      "shape": [n, size, size, channels],
      "pairs_per_displacement": n * (size + 1) * (size + 2),
      "wall_s": {k: statistics.median(v) for k, v in wall.items()},
      "cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
      "first_call_s": first,
      "max_abs_diff": {
          k: max_abs_diff(results[k], reference) for k in variants
          if k != "official"
      },
      "official_matrix": reference.tolist(),
  }
  layer["compile_s"] = {
      k: max(first[k] - layer["wall_s"][k], 0.0) for k in first
  }
  return layer


def sequence_activations(
    n: int, length: int, channels: int, seed: int
) -> np.ndarray:
  """Seeded (N, L, C) post-ReLU features, smooth along time."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n, length + 4, channels), np.float32)
  c = np.cumsum(z, axis=1, dtype=np.float32)
  c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
  x = (c[:, 5:] - c[:, :-5]) / np.sqrt(5.0)
  gain = np.exp(rng.normal(0.0, 0.5, channels)).astype(np.float32)
  bias = rng.normal(-0.4, 0.6, channels).astype(np.float32)
  return np.maximum(x * gain + bias, 0).astype(np.float32)


def run_large_window(
    name: str, shape: Sequence[int], window: Sequence[int],
    subsamples: Sequence[int], repeats: int, seed: int,
) -> dict:
  """Times one estimator call for a large window beside a 3-tap one."""
  if len(shape) == 4:
    x = activations(shape[0], shape[3], shape[1], seed, stem=False)
  else:
    x = sequence_activations(*shape, seed)
  xj = jax.device_put(x)
  key = jax.random.key(seed)
  small = (3,) * len(window)
  variants: dict[str, Callable[[], object]] = {
      "small": lambda: spatial_dependence(xj, small),
      "large": lambda: spatial_dependence(xj, window),
  }
  for m in subsamples:
    variants[f"large[{m}]"] = (
        lambda m=m: spatial_dependence(xj, window, subsample=m, key=key))
  first, wall, cpu, results = _interleaved(variants, repeats)
  compiled = jax.jit(lambda v: spatial_dependence(v, window)).lower(
      jax.ShapeDtypeStruct(x.shape, jnp.float32)).compile()
  return {
      "name": name, "shape": list(shape), "window": list(window),
      "offsets": (math.prod(window) - 1) // 2,
      "wall_s": wall,
      "cpu_s": cpu,
      "compile_s": {k: max(first[k] - wall[k], 0.0) for k in first},
      "cost_vs_3_taps": wall["large"] / wall["small"],
      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
      "input_bytes": x.nbytes,
      "max_abs_diff": {
          k: max_abs_diff(results[k], results["large"]) for k in variants
          if k.startswith("large[")
      },
  }


def _print_large(r: dict) -> None:
  w = r["wall_s"]
  text = (f"{r['name']} window on {tuple(r['shape'])}: {r['offsets']} offsets,"
          f" {w['large']:.2f}s (x{r['cost_vs_3_taps']:.1f} a 3-tap window,"
          f" {w['small']:.2f}s), compile {r['compile_s']['large']:.1f}s,"
          f" temporaries {r['temp_bytes'] / 2**20:.1f} MiB"
          f" (input {r['input_bytes'] / 2**20:.1f} MiB)")
  for k, d in r["max_abs_diff"].items():
    text += f"  {k[6:-1]}: {w[k]:.2f}s diff {d:.1e}"
  print(text, flush=True)


def _interleaved(
    variants: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict, dict, dict, dict]:
  """First-call and median wall and CPU times, and the last results."""
  first, wall, cpu, results = {}, {k: [] for k in variants}, {
      k: [] for k in variants}, {}
  for k, fn in variants.items():
    results[k], first[k], _ = _timed(fn)
  names = list(variants)
  for r in range(repeats):
    # Rotate the order so drifting machine load hits every variant alike.
    for k in names[r % len(names):] + names[:r % len(names)]:
      results[k], w, c = _timed(variants[k])
      wall[k].append(w)
      cpu[k].append(c)
  wall = {k: statistics.median(v) for k, v in wall.items()}
  return first, wall, {k: statistics.median(v) for k, v in cpu.items()}, \
      results


def run_counting(
    layers_spec: Sequence[tuple[int, int]] = VGG11_CONV_INPUTS,
    n: int = PAPER_REFRESH_IMAGES, repeats: int = 3, seed: int = 0,
) -> dict:
  """Times each counting path of the estimator on each layer's input.

  Args:
    layers_spec: (channels, spatial size) of each conv input.
    n: images per input (the paper's refresh: 256).
    repeats: timed calls per path and layer, interleaved.
    seed: seeds the synthetic activations.

  Returns:
    Per-layer and total wall and CPU seconds and compile seconds per path,
    ``matmul_over_scatter`` (the ratio of the total wall times) and
    ``identical`` (whether every matrix is the same under both paths).
  """
  layers = []
  for i, (channels, size) in enumerate(layers_spec):
    x = jax.device_put(activations(n, channels, size, seed + i, stem=i == 0))
    variants = {c: functools.partial(spatial_dependence, x, counting=c)
                for c in COUNTINGS}
    first, wall, cpu, results = _interleaved(variants, repeats)
    layers.append({
        "layer": i, "shape": [n, size, size, channels],
        "wall_s": wall, "cpu_s": cpu,
        "compile_s": {c: max(first[c] - wall[c], 0.0) for c in COUNTINGS},
        "identical": bool(np.array_equal(
            np.asarray(results["matmul"]), np.asarray(results["scatter"]),
            equal_nan=True)),
    })
  total = {c: sum(r["wall_s"][c] for r in layers) for c in COUNTINGS}
  return {
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "n_images": n, "repeats": repeats, "layers": layers,
      "total_wall_s": total,
      "total_cpu_s": {c: sum(r["cpu_s"][c] for r in layers)
                      for c in COUNTINGS},
      "compile_s": {c: sum(r["compile_s"][c] for r in layers)
                    for c in COUNTINGS},
      "matmul_over_scatter": total["matmul"] / total["scatter"],
      "identical": all(r["identical"] for r in layers),
  }


def run_refresh(
    model_name: str = "resnet18", n: int = PAPER_REFRESH_IMAGES,
    repeats: int = 3, seed: int = 0, counting: str | None = None,
    device: jax.Device | None = None, tiny: bool = False,
) -> dict:
  """Compile and run time of one learned-SGS refresh of a CIFAR model.

  As a user would: the conv inputs of ``n`` CIFAR-shaped images captured in
  eval mode, then ``jax.jit(refresh_scalings)`` (on the inputs' device), or
  with ``device`` an eager ``refresh_scalings(..., device=device)``.

  Args:
    model_name: one of ``benchmarks._models.MODELS``.
    n: images (the paper's refresh: 256).
    repeats: timed runs after the first.
    seed: seeds the images and the init.
    counting: the estimator's counting path (``None``: by platform).
    device: if given, the device the refresh runs on.
    tiny: the model at its smoke-test width.

  Returns:
    ``compile_s`` (lower and compile, or the first call's excess over a run
    with ``device``), ``run_s`` (median), ``temp_bytes`` (the compiled
    temporaries, jitted in place only) and the captured inputs' bytes.
  """
  # Imported here: Flax is only needed for this part.
  from benchmarks import _models  # pylint: disable=g-import-not-at-top
  import sgs_optax  # pylint: disable=g-import-not-at-top

  model = _models.make_model(model_name, 100, tiny=tiny)
  x = jnp.asarray(activations(n, 3, 32, seed, stem=True))
  variables = model.init(jax.random.key(seed), x[:1])
  state = sgs_optax.sgs().init(variables["params"])
  captured = sgs_optax.capture_conv_inputs(model, variables, x, train=False)
  inputs_bytes = sum(a.nbytes for a in jax.tree.leaves(captured))
  temp = None
  if device is None:
    start = time.perf_counter()
    refresh = jax.jit(sgs_optax.refresh_scalings,
                      static_argnames=("counting",)).lower(
                          state, captured, counting=counting).compile()
    compile_s = time.perf_counter() - start
    temp = refresh.memory_analysis().temp_size_in_bytes
    run = lambda: refresh(state, captured)
  else:
    run = lambda: sgs_optax.refresh_scalings(state, captured,
                                             counting=counting, device=device)
  _, first, _ = _timed(run)
  runs = [_timed(run)[1] for _ in range(repeats)]
  run_s = statistics.median(runs)
  if device is not None:
    compile_s = max(first - run_s, 0.0)
  return {"model": model_name, "n_images": n, "counting": counting,
          "device": None if device is None else str(device),
          "compile_s": compile_s, "run_s": run_s, "runs_s": runs,
          "temp_bytes": temp, "captured_bytes": inputs_bytes}


def _print_counting(result: dict) -> None:
  for r in result["layers"]:
    w = r["wall_s"]
    print(f"layer {r['layer']} {tuple(r['shape'])}: scatter"
          f" {w['scatter']:.3f}s  matmul {w['matmul']:.3f}s"
          f" (matmul/scatter x{w['matmul'] / w['scatter']:.2f},"
          f" {'identical' if r['identical'] else 'DIFFERENT'})", flush=True)
  t, c = result["total_wall_s"], result["compile_s"]
  print(f"counting paths on {result['backend']}"
        f" ({result['device_kind']}), N={result['n_images']}: scatter"
        f" {t['scatter']:.2f}s, matmul {t['matmul']:.2f}s, matmul/scatter"
        f" x{result['matmul_over_scatter']:.2f}; compile scatter"
        f" {c['scatter']:.1f}s, matmul {c['matmul']:.1f}s; matrices"
        f" {'identical' if result['identical'] else 'DIFFERENT'}")


def summarize(layers: list[dict], subsamples: Sequence[int]) -> dict:
  names = ["jit"] + [f"jit[{m}]" for m in subsamples]
  total_wall = {k: sum(r["wall_s"][k] for r in layers)
                for k in ["official"] + names}
  total_cpu = {k: sum(r["cpu_s"][k] for r in layers)
               for k in ["official"] + names}
  curve = []
  for name in names:
    curve.append({
        "variant": name,
        "subsample": None if name == "jit" else int(name[4:-1]),
        "total_wall_s": total_wall[name],
        "total_cpu_s": total_cpu[name],
        "speedup_wall": total_wall["official"] / total_wall[name],
        "speedup_cpu": total_cpu["official"] / total_cpu[name],
        "max_abs_diff": max(r["max_abs_diff"][name] for r in layers),
    })
  full = curve[0]
  stretch = [c for c in curve[1:] if c["max_abs_diff"] <= STRETCH_MAX_DIFF]
  best = max(stretch, key=lambda c: c["speedup_wall"], default=None)
  seen, compile_total = set(), 0.0
  for r in layers:
    # Layers of the same shape share one compiled executable.
    if tuple(r["shape"]) not in seen:
      seen.add(tuple(r["shape"]))
      compile_total += r["compile_s"]["jit"]
  return {
      "total_wall_s": total_wall,
      "total_cpu_s": total_cpu,
      "curve": curve,
      "full_data_speedup_wall": full["speedup_wall"],
      "full_data_speedup_cpu": full["speedup_cpu"],
      "full_data_max_abs_diff": full["max_abs_diff"],
      "full_data_goal_met": full["speedup_wall"] >= FULL_DATA_GOAL,
      "stretch_best": best,
      "stretch_goal_met": bool(best and best["speedup_wall"] >= STRETCH_GOAL),
      "compile_s_full_refresh": compile_total,
      "compile_distinct_shapes": len(seen),
  }


def _print_layer(r: dict, subsamples: Sequence[int]) -> None:
  w, d = r["wall_s"], r["max_abs_diff"]
  text = (f"layer {r['layer']} {tuple(r['shape'])}:"
          f" official {w['official']:.3f}s  jit {w['jit']:.3f}s"
          f" (x{w['official'] / w['jit']:.1f}, diff {d['jit']:.1e},"
          f" compile {r['compile_s']['jit']:.2f}s)")
  for m in subsamples:
    name = f"jit[{m}]"
    text += f"  [{m}] x{w['official'] / w[name]:.1f} diff {d[name]:.1e}"
  print(text, flush=True)


def _print_summary(summary: dict, num_layers: int) -> None:
  tw, tc = summary["total_wall_s"], summary["total_cpu_s"]
  print(f"total: official {tw['official']:.2f}s wall / {tc['official']:.2f}s"
        f" cpu; jit {tw['jit']:.2f}s / {tc['jit']:.2f}s -> speed-up"
        f" x{summary['full_data_speedup_wall']:.1f} wall,"
        f" x{summary['full_data_speedup_cpu']:.1f} cpu; max |diff|"
        f" {summary['full_data_max_abs_diff']:.2e} (goal x{FULL_DATA_GOAL:g}:"
        f" {'met' if summary['full_data_goal_met'] else 'NOT met'})")
  print("subsample curve (pairs per displacement: speed-up wall / cpu,"
        " max |diff| vs official):")
  for c in summary["curve"]:
    label = "full" if c["subsample"] is None else c["subsample"]
    print(f"  {label:>8}: x{c['speedup_wall']:6.1f} / x{c['speedup_cpu']:6.1f}"
          f"   {c['max_abs_diff']:.2e}"
          + ("" if c["max_abs_diff"] <= STRETCH_MAX_DIFF else "  (> 2e-3)"))
  best = summary["stretch_best"]
  print(f"stretch goal x{STRETCH_GOAL:g} within {STRETCH_MAX_DIFF:g}: "
        + ("met" if summary["stretch_goal_met"] else "NOT met")
        + (f" (best within tolerance: {best['variant']},"
           f" x{best['speedup_wall']:.1f})" if best else ""))
  print(f"compile, full refresh ({num_layers} conv inputs,"
        f" {summary['compile_distinct_shapes']} distinct shapes):"
        f" {summary['compile_s_full_refresh']:.1f}s")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true",
                      help="two small layers, 16 images, one repeat")
  parser.add_argument("--out", default="results/mi_speed.json",
                      help="JSON output path")
  parser.add_argument("--n-images", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--subsample", type=int, nargs="*", default=None)
  parser.add_argument("--seed", type=int, default=0)
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--skip-large-windows", action="store_true",
                     help="do not time the 13x13 and 31-tap windows")
  which.add_argument("--large-windows-only", action="store_true",
                     help="time only the 13x13 and 31-tap windows")
  which.add_argument("--refresh", choices=("vgg11", "resnet18"),
                     help="time only one jitted refresh_scalings of this"
                     " CIFAR model (compile, run, temporaries) per counting"
                     " path")
  which.add_argument("--counting", action="store_true",
                     help="time only the two counting paths, side by side,"
                     f" at {PAPER_REFRESH_IMAGES} images (the paper's"
                     " refresh), and print their ratio")
  return parser.parse_args(argv)


def _environment(load_before, start) -> dict:
  return {
      "jax": jax.__version__, "numpy": np.__version__,
      "python": platform.python_version(), "cpus": os.cpu_count(),
      "load_before": load_before, "load_after": os.getloadavg(),
      "elapsed_s": time.perf_counter() - start,
  }


def _write(results: dict, path: str | None) -> None:
  if path:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


def _main_counting(args: argparse.Namespace) -> dict:
  """``--counting``: both counting paths side by side, nothing else."""
  layers_spec = TINY_CONV_INPUTS if args.tiny else VGG11_CONV_INPUTS
  n = args.n_images or (16 if args.tiny else PAPER_REFRESH_IMAGES)
  repeats = args.repeats or (1 if args.tiny else 3)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
        f"N={n}, repeats={repeats}", flush=True)
  load_before, start = os.getloadavg(), time.perf_counter()
  counting = run_counting(layers_spec, n, repeats, args.seed)
  _print_counting(counting)
  results = {
      "settings": {"tiny": args.tiny, "n_images": n, "repeats": repeats,
                   "seed": args.seed, "counting": True,
                   "layers": [list(s) for s in layers_spec]},
      "environment": _environment(load_before, start),
      "counting": counting,
  }
  _write(results, args.out)
  return results


def _main_refresh(args: argparse.Namespace) -> dict:
  """``--refresh MODEL``: one refresh per counting path, nothing else."""
  n = args.n_images or (16 if args.tiny else PAPER_REFRESH_IMAGES)
  repeats = args.repeats or (1 if args.tiny else 3)
  load_before, start = os.getloadavg(), time.perf_counter()
  runs = []
  for counting in (None, *COUNTINGS):
    runs.append(run_refresh(args.refresh, n, repeats, args.seed, counting,
                            tiny=args.tiny))
    r = runs[-1]
    print(f"refresh {args.refresh} N={n} counting={counting}: compile"
          f" {r['compile_s']:.1f}s, run {r['run_s']:.2f}s (runs"
          f" {', '.join(f'{t:.2f}' for t in r['runs_s'])}), temporaries"
          f" {r['temp_bytes'] / 2**20:.0f} MiB (captured inputs"
          f" {r['captured_bytes'] / 2**20:.0f} MiB)", flush=True)
  results = {"settings": {"refresh": args.refresh, "n_images": n,
                          "repeats": repeats, "seed": args.seed,
                          "tiny": args.tiny},
             "environment": _environment(load_before, start),
             "refresh": runs}
  _write(results, args.out)
  return results


def main(argv: Sequence[str] | None = None) -> dict:
  args = _parse(argv)
  if args.counting:
    return _main_counting(args)
  if args.refresh:
    return _main_refresh(args)
  layers_spec = TINY_CONV_INPUTS if args.tiny else VGG11_CONV_INPUTS
  if args.large_windows_only:
    layers_spec = ()
  n = args.n_images or (16 if args.tiny else 2560)
  repeats = args.repeats or (1 if args.tiny else 3)
  subsamples = tuple(args.subsample if args.subsample is not None else
                     ((128,) if args.tiny else DEFAULT_SUBSAMPLES))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
        f"N={n}, repeats={repeats}, subsample sizes {list(subsamples)}",
        flush=True)
  load_before = os.getloadavg()
  start = time.perf_counter()
  layers, summary = [], None
  for i, (channels, size) in enumerate(layers_spec):
    layers.append(run_layer(i, channels, size, n, subsamples, repeats,
                            args.seed))
    _print_layer(layers[-1], subsamples)
  if layers:
    summary = summarize(layers, subsamples)
    _print_summary(summary, len(layers))
  large = []
  if not args.skip_large_windows:
    for name, shape, window in (TINY_LARGE_WINDOWS if args.tiny
                                else LARGE_WINDOWS):
      large.append(run_large_window(
          name, shape, window, () if args.tiny else LARGE_SUBSAMPLES,
          repeats, args.seed))
      _print_large(large[-1])
  results = {
      "settings": {
          "tiny": args.tiny, "n_images": n, "repeats": repeats,
          "subsamples": list(subsamples), "seed": args.seed,
          "layers": [list(s) for s in layers_spec],
      },
      "environment": _environment(load_before, start),
      "layers": layers,
      "summary": summary,
      "large_windows": large,
  }
  _write(results, args.out)
  return results


if __name__ == "__main__":
  main()
