"""Spatial dependence of a conv layer's input, by normalised mutual information.

This is the statistic behind the SGS scaling refresh (steps 2-7 of the
algorithm): for every displacement inside the kernel window, the plug-in
mutual information between each input pixel and its displaced neighbour,
normalised, sharpened and averaged over channels. It is a jittable, loop-free
(over channels) rewrite of the official ``dependence.py``, with the same bin
count and bin ranges, and without its bugs (max-valued samples dropped under
NumPy >= 2, wrong column centre for non-square kernels, transposed padding).

All counting is done with one integer ``segment_sum`` per displacement over
arithmetically computed bin ids, into a static buffer of ``B`` x ``B`` bins per
channel, so no ``N x B`` intermediate is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any, NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import numpy as np

PaddingLike: TypeAlias = str | int | Sequence[int | tuple[int, int]]

_PAD_MODES = ("zeros", "circular", "reflect")
# Flax's padding strings that imply both the pads and the fill.
_FLAX_PAD_STRINGS = {"CIRCULAR": "circular", "REFLECT": "reflect"}
_LAX_PAD_STRINGS = ("SAME", "SAME_LOWER", "VALID")
_JNP_PAD_MODES = {"zeros": "constant", "circular": "wrap", "reflect": "reflect"}
# Bin ids and per-cell counts are int32.
_MAX_SAMPLES = 2**31 - 1
# Elements of a padded batch chunk: large enough to amortise the loop, small
# enough for its bin ids to stay in cache (and off fresh, page-faulting
# buffers, which is what an unchunked version mostly spends its time on).
_CHUNK_ELEMENTS = 1 << 18


def _as_pair(value: Any, name: str) -> tuple[int, int]:
  """Reads an int or a pair of ints, as Flax and lax accept them."""
  if isinstance(value, int) and not isinstance(value, bool):
    return (value, value)
  if (
      isinstance(value, Sequence)
      and not isinstance(value, str)
      and len(value) == 2
      and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
  ):
    return (int(value[0]), int(value[1]))
  raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}.")


def _check_kernel_size(kernel_size: Any) -> tuple[int, int]:
  if (
      not isinstance(kernel_size, Sequence)
      or len(kernel_size) != 2
      or not all(
          isinstance(k, int) and not isinstance(k, bool) for k in kernel_size
      )
  ):
    raise ValueError(
        "kernel_size must be a pair of ints (kh, kw), got "
        f"{kernel_size!r}."
    )
  kh, kw = int(kernel_size[0]), int(kernel_size[1])
  if kh < 2 or kw < 2:
    raise ValueError(
        f"kernel_size {(kh, kw)} is not eligible for spatial gradient "
        "scaling: both spatial dims must be at least 2 (1x1, 1xK and Kx1 "
        "kernels have no 2-D neighbourhood)."
    )
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(
        f"kernel_size {(kh, kw)} has an even dim: the dependence matrix needs "
        "a centre tap, so only odd kernel sizes are supported."
    )
  return kh, kw


def _resolve_padding(
    padding: PaddingLike,
    padding_mode: str,
    spatial_shape: tuple[int, int],
    dilated_kernel: tuple[int, int],
    strides: tuple[int, int],
) -> tuple[tuple[tuple[int, int], tuple[int, int]], str]:
  """Returns the conv's explicit ((top, bottom), (left, right)) pads and fill."""
  if padding_mode not in _PAD_MODES:
    raise ValueError(
        f"padding_mode must be one of {_PAD_MODES}, got {padding_mode!r}."
    )
  if isinstance(padding, str):
    name = padding.upper()
    if name in _FLAX_PAD_STRINGS:
      implied = _FLAX_PAD_STRINGS[name]
      if padding_mode not in ("zeros", implied):
        raise ValueError(
            f"padding={padding!r} implies padding_mode={implied!r}, got "
            f"padding_mode={padding_mode!r}."
        )
      # Flax pads CIRCULAR/REFLECT convs like this, whatever the stride.
      pads = tuple(((k - 1) // 2, k // 2) for k in dilated_kernel)
      return pads, implied
    if name in _LAX_PAD_STRINGS:
      pads = jax.lax.padtype_to_pads(
          spatial_shape, dilated_kernel, strides, name
      )
      return tuple((int(lo), int(hi)) for lo, hi in pads), padding_mode
    raise ValueError(
        f"Unsupported padding {padding!r}: expected 'SAME', 'SAME_LOWER', "
        "'VALID', 'CIRCULAR', 'REFLECT', an int, or explicit "
        "((top, bottom), (left, right)) pairs."
    )
  if isinstance(padding, int) and not isinstance(padding, bool):
    pads = ((padding, padding), (padding, padding))
  elif isinstance(padding, Sequence) and len(padding) == 2:
    pads = tuple(_as_pair(p, "each padding entry") for p in padding)
  else:
    raise ValueError(
        f"Unsupported padding {padding!r}: expected a padding string, an int, "
        "or explicit ((top, bottom), (left, right)) pairs."
    )
  if any(p < 0 for pair in pads for p in pair):
    raise ValueError(f"Negative padding is not supported, got {padding!r}.")
  return pads, padding_mode


def _displacements(
    kernel_size: tuple[int, int],
) -> tuple[tuple[int, int], ...]:
  """One (dx, dy) of each +/- pair, in the official code's order."""
  rh, rw = (kernel_size[0] - 1) // 2, (kernel_size[1] - 1) // 2
  out = []
  for dx in range(-rh, rh + 1):
    for dy in range(-rw, rw + 1):
      if (dx, dy) != (0, 0) and (-dx, -dy) not in out:
        out.append((dx, dy))
  return tuple(out)


def _sturges(n: int) -> int:
  # 1 + ceil(log2(n)) in exact integer arithmetic.
  return 1 + (n - 1).bit_length()


def _sturges_traced(n: jax.Array) -> jax.Array:
  # ceil(log2(n)) == bit_length(n - 1) == 32 - clz(n - 1) for n >= 1; a float
  # log2 can land a hair above an exact power of two.
  n = jnp.maximum(n.astype(jnp.int32), 1)
  return 1 + (32 - jax.lax.clz(n - 1))


def _bin_scale(lo, hi, bins):
  """Per-channel factor mapping [lo, hi] onto [0, bins]."""
  width = hi - lo
  # A constant variable gets scale 0: all its mass in bin 0, entropy 0.
  return jnp.where(width > 0, jnp.asarray(bins, jnp.float32) / width, 0.0)


def _bin_index(v, lo, scale, bins):
  """Uniform bin of `v` with the max in the last bin, as int32 in [0, bins)."""
  # float->int32 saturates (NaN -> 0), and both bounds are clipped, so the ids
  # stay in bounds even for values outside [lo, hi] (masked-out pairs).
  idx = ((v - lo) * scale).astype(jnp.int32)
  return jnp.clip(idx, 0, jnp.asarray(bins, jnp.int32) - 1)


def _entropy_bits(counts: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Shannon entropy in bits of the non-zero cells, normalised per table."""
  total = jnp.sum(counts, axis=axes, keepdims=True)
  nonzero = counts > 0
  p = jnp.where(nonzero, counts / jnp.where(total > 0, total, 1), 1)
  h = -jnp.sum(jnp.where(nonzero, p * jnp.log2(p), 0), axis=axes)
  # A single occupied cell must give exactly 0 (not a rounding residue of
  # c / c), so that a constant channel's 0/0 stays NaN instead of NMI = 1.
  return jnp.where(jnp.sum(nonzero, axis=axes) > 1, h, 0.0)


class _Crop(NamedTuple):
  """Where a displacement's centre (x) and neighbour (y) pixels sit."""

  x_rows: slice
  y_rows: slice
  x_cols: slice
  y_cols: slice
  count_per_image: int


def _crop(dx: int, dy: int, hp: int, wp: int) -> _Crop:
  def axis(offset, size):
    length = max(size - abs(offset), 0)
    start = max(-offset, 0)
    return (
        slice(start, start + length),
        slice(start + offset, start + offset + length),
        length,
    )

  x_rows, y_rows, h = axis(dx, hp)
  x_cols, y_cols, w = axis(dy, wp)
  return _Crop(x_rows, y_rows, x_cols, y_cols, h * w)


def _source_index(size: int, pads: tuple[int, int], mode: str) -> np.ndarray:
  """For each padded position, the unpadded index it copies (-1: a zero)."""
  if mode == "zeros":
    return np.pad(np.arange(size), pads, constant_values=-1)
  return np.pad(np.arange(size), pads, mode=_JNP_PAD_MODES[mode])


def _batch_chunks(x: jax.Array, row_elems: int, chunk_elements: int):
  """Static chunking of the batch so per-chunk buffers stay cache-sized.

  Returns the chunk size, the chunk count and a function of the (traced)
  chunk number giving the chunk and a mask of the images that belong to it:
  the last chunk is shifted back to stay in bounds, and its images that an
  earlier chunk already covered are masked out.
  """
  n = x.shape[0]
  size = int(min(n, max(1, chunk_elements // max(row_elems, 1))))
  num = -(-n // size)

  def get(i):
    start = i * size
    shifted = jnp.minimum(start, n - size)
    chunk = jax.lax.dynamic_slice_in_dim(x, shifted, size, axis=0)
    fresh = shifted + jnp.arange(size) >= start
    return chunk.astype(jnp.float32), fresh

  return size, num, get


@functools.partial(
    jax.jit,
    static_argnames=(
        "kernel_size",
        "pads",
        "pad_mode",
        "dilation",
        "diagonal_removal",
        "subsample",
        "chunk_elements",
    ),
)
def _dependence_impl(
    inputs: jax.Array,
    k: jax.Array,
    key: jax.Array | None,
    *,
    kernel_size: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    pad_mode: str,
    dilation: tuple[int, int],
    diagonal_removal: bool,
    subsample: int | None,
    chunk_elements: int,
) -> jax.Array:
  """Steps 2-7 of the refresh; every argument but the data is static."""
  n, h, w, c = inputs.shape
  hp, wp = h + sum(pads[0]), w + sum(pads[1])
  kh, kw = kernel_size
  rh, rw = (kh - 1) // 2, (kw - 1) // 2
  disps = _displacements(kernel_size)
  crops = [_crop(dx * dilation[0], dy * dilation[1], hp, wp) for dx, dy in disps]
  counts = [n * cr.count_per_image for cr in crops]
  live = [i for i, cnt in enumerate(counts) if cnt > 0]
  # One static bin buffer for all displacements, so their tables stack; with
  # diagonal removal the traced bin count never exceeds it (kept <= count).
  buf = max([_sturges(counts[i]) for i in live], default=1)
  pad_spec = ((0, 0), *pads, (0, 0))
  jnp_mode = _JNP_PAD_MODES[pad_mode]
  size, num_chunks, get_chunk = _batch_chunks(
      inputs, hp * wp * c, chunk_elements
  )

  # Pass 1: ranges. The batch extrema per position are taken unpadded (the
  # pad only copies or zeroes positions, so it commutes with them); elementwise
  # accumulators avoid XLA:CPU's slow reduction over a leading axis.
  def extrema(i, carry):
    lo, hi = carry
    chunk, _ = get_chunk(i)
    return jnp.minimum(lo, chunk), jnp.maximum(hi, chunk)

  first, _ = get_chunk(0)
  lo_acc, hi_acc = jax.lax.fori_loop(1, num_chunks, extrema, (first, first))
  min_map = jnp.pad(jnp.min(lo_acc, axis=0), pad_spec[1:], mode=jnp_mode)
  max_map = jnp.pad(jnp.max(hi_acc, axis=0), pad_spec[1:], mode=jnp_mode)
  finite = jnp.all(jnp.isfinite(min_map)) & jnp.all(jnp.isfinite(max_map))

  def crop_pairs(xp, cr):
    xs = xp[:, cr.x_rows, cr.x_cols, :]
    ys = xp[:, cr.y_rows, cr.y_cols, :]
    chex.assert_equal_shape((xs, ys))
    return xs, ys

  if diagonal_removal:
    # Ranges and the (traced) Sturges count come from the kept pairs only:
    # another pass, with per-displacement masked reductions.
    def kept_stats(i, carry):
      chunk, fresh = get_chunk(i)
      xp = jnp.pad(chunk, pad_spec, mode=jnp_mode)
      out = []
      for j, (kept, lx, hx, ly, hy) in zip(live, carry):
        xs, ys = crop_pairs(xp, crops[j])
        keep = (xs != 0) & (ys != 0) & fresh[:, None, None, None]
        out.append((
            kept + jnp.sum(keep, axis=(0, 1, 2), dtype=jnp.int32),
            jnp.minimum(lx, jnp.min(jnp.where(keep, xs, jnp.inf), (0, 1, 2))),
            jnp.maximum(hx, jnp.max(jnp.where(keep, xs, -jnp.inf), (0, 1, 2))),
            jnp.minimum(ly, jnp.min(jnp.where(keep, ys, jnp.inf), (0, 1, 2))),
            jnp.maximum(hy, jnp.max(jnp.where(keep, ys, -jnp.inf), (0, 1, 2))),
        ))
      return out

    inf = jnp.full((c,), jnp.inf, jnp.float32)
    init = [(jnp.zeros((c,), jnp.int32), inf, -inf, inf, -inf) for _ in live]
    stats = jax.lax.fori_loop(0, num_chunks, kept_stats, init)
    ranges = []
    for kept, lx, hx, ly, hy in stats:
      bins = _sturges_traced(kept)
      ranges.append((lx, _bin_scale(lx, hx, bins), ly, _bin_scale(ly, hy, bins),
                     bins))
  else:
    ranges = []
    for j in live:
      cr = crops[j]
      lx = jnp.min(min_map[cr.x_rows, cr.x_cols], axis=(0, 1))
      hx = jnp.max(max_map[cr.x_rows, cr.x_cols], axis=(0, 1))
      ly = jnp.min(min_map[cr.y_rows, cr.y_cols], axis=(0, 1))
      hy = jnp.max(max_map[cr.y_rows, cr.y_cols], axis=(0, 1))
      bins = _sturges(counts[j])
      ranges.append((lx, _bin_scale(lx, hx, bins), ly, _bin_scale(ly, hy, bins),
                     bins))

  table_size = len(live) * c * buf * buf
  channel_base = jnp.arange(c, dtype=jnp.int32) * (buf * buf)

  def cell_ids(slot, xs, ys, keep):
    lx, sx, ly, sy, bins = ranges[slot]
    ix = _bin_index(xs, lx, sx, bins)
    iy = _bin_index(ys, ly, sy, bins)
    ids = slot * (c * buf * buf) + channel_base + ix * buf + iy
    # Dropped pairs go to one spare cell past the tables.
    return jnp.where(keep, ids, table_size).reshape(-1)

  sampled = [
      s for s, j in enumerate(live)
      if subsample is not None and subsample < counts[j]
  ]
  full = [s for s in range(len(live)) if s not in sampled]
  tables = jnp.zeros((table_size + 1,), jnp.int32)

  if full:
    # Pass 2: count every pair, chunk by chunk, into one flat table with a
    # single scatter per chunk (ids stay cache-sized, never N x anything).
    def count_chunk(i, tables):
      chunk, fresh = get_chunk(i)
      xp = jnp.pad(chunk, pad_spec, mode=jnp_mode)
      ids = []
      for slot in full:
        xs, ys = crop_pairs(xp, crops[live[slot]])
        keep = fresh[:, None, None, None]
        if diagonal_removal:
          keep = keep & (xs != 0) & (ys != 0)
        ids.append(cell_ids(slot, xs, ys, keep))
      ids = jnp.concatenate(ids)
      return tables.at[ids].add(1, mode="promise_in_bounds")

    tables = jax.lax.fori_loop(0, num_chunks, count_chunk, tables)

  if sampled:
    # i.i.d. uniform pairs (with replacement: a permutation of millions of
    # positions would cost more than the counting it saves), gathered
    # straight from the unpadded input through static index maps.
    row_src = jnp.asarray(_source_index(h, pads[0], pad_mode))
    col_src = jnp.asarray(_source_index(w, pads[1], pad_mode))

    def gather(img, rows, cols):
      r, q = row_src[rows], col_src[cols]
      vals = inputs[img, jnp.maximum(r, 0), jnp.maximum(q, 0)]
      vals = vals.astype(jnp.float32)
      return jnp.where(((r >= 0) & (q >= 0))[:, None], vals, 0.0)

    positions = []
    for slot in sampled:
      cr = crops[live[slot]]
      pos = jax.random.randint(
          jax.random.fold_in(key, live[slot]), (subsample,), 0,
          counts[live[slot]],
      )
      positions.append(pos)
    positions = jnp.stack(positions)  # (S, m)
    step = int(min(subsample, max(1, chunk_elements // c)))
    num_steps = -(-subsample // step)

    def count_sample(i, tables):
      start = i * step
      shifted = jnp.minimum(start, subsample - step)
      fresh = (shifted + jnp.arange(step) >= start)[:, None]
      pos = jax.lax.dynamic_slice_in_dim(positions, shifted, step, axis=1)
      ids = []
      for row, slot in enumerate(sampled):
        cr = crops[live[slot]]
        width = cr.x_cols.stop - cr.x_cols.start
        img, rem = jnp.divmod(pos[row], cr.count_per_image)
        r, q = jnp.divmod(rem, width)
        xs = gather(img, r + cr.x_rows.start, q + cr.x_cols.start)
        ys = gather(img, r + cr.y_rows.start, q + cr.y_cols.start)
        keep = fresh
        if diagonal_removal:
          keep = keep & (xs != 0) & (ys != 0)
        ids.append(cell_ids(slot, xs, ys, keep))
      ids = jnp.concatenate(ids)
      return tables.at[ids].add(1, mode="promise_in_bounds")

    tables = jax.lax.fori_loop(0, num_steps, count_sample, tables)

  values = jnp.full(
      (c, len(disps)), 0.0 if diagonal_removal else jnp.nan, jnp.float32
  )
  if live:
    joint = tables[:table_size].reshape(len(live), c, buf, buf)
    joint = joint.astype(jnp.float32)
    if diagonal_removal:
      joint = joint * (1 - jnp.eye(buf, dtype=jnp.float32))
    h_xy = _entropy_bits(joint, (-2, -1))
    h_x = _entropy_bits(jnp.sum(joint, axis=-1), (-1,))
    h_y = _entropy_bits(jnp.sum(joint, axis=-2), (-1,))
    # 0/0 (constant or dead channel, empty table) is NaN on purpose.
    nmi = (h_x + h_y - h_xy) / h_xy
    f = k * nmi / ((k - 1) * nmi + 1)
    if diagonal_removal:
      # As the official code: no pair left, or NaN, gives 0.
      f = jnp.where(jnp.isnan(f), 0.0, f)
    # Displacements with no pair at all stay NaN (0 with diagonal removal).
    values = values.at[:, jnp.asarray(live)].set(f.T)

  rows = [rh + dx for dx, _ in disps] + [rh - dx for dx, _ in disps]
  cols = [rw + dy for _, dy in disps] + [rw - dy for _, dy in disps]
  per_channel = jnp.ones((c, kh, kw), jnp.float32)
  per_channel = per_channel.at[:, rows, cols].set(
      jnp.concatenate([values, values], axis=-1)
  )
  # nanmean over channels, written out so it cannot warn.
  valid = ~jnp.isnan(per_channel)
  total = jnp.sum(jnp.where(valid, per_channel, 0.0), axis=0)
  dependence = total / jnp.sum(valid, axis=0)
  # NaN or inf in the inputs poisons the whole matrix rather than a channel.
  dependence = jnp.where(finite, dependence, jnp.nan)
  chex.assert_shape(dependence, (kh, kw))
  return dependence


def spatial_dependence(
    inputs: jax.Array,
    kernel_size: Sequence[int] = (3, 3),
    *,
    padding: PaddingLike = "SAME",
    k: float = 5.0,
    diagonal_removal: bool = False,
    strides: int | Sequence[int] = (1, 1),
    dilation: int | Sequence[int] = (1, 1),
    padding_mode: str = "zeros",
    subsample: int | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
  r"""Channel-averaged spatial dependence of a conv layer's input.

  For each displacement ``(dx, dy)`` of the kernel window (one of each
  ``+/-`` pair), ``X`` is every pixel of the padded input and ``Y`` its
  neighbour at ``(i + dx, j + dy)``, pooled over the batch and space per
  channel. The joint histogram has ``1 + ceil(log2(n))`` bins per axis
  (Sturges, ``n`` the displacement's pair count
  ``N * (Hp - |dx|) * (Wp - |dy|)``) over each variable's ``[min, max]`` with
  the max in the last bin. With entropies in bits,
  ``NMI = (H_X + H_Y - H_XY) / H_XY`` is sharpened to
  ``k * NMI / ((k - 1) * NMI + 1)``, written at ``[r + dx, r + dy]`` and its
  mirror, and averaged over channels skipping NaN. The centre is 1.

  The statistics ignore ``strides`` (as the official code does), which only
  serve to compute ``"SAME"`` pads. With ``dilation`` the displacements are
  those of the dilated taps: entry ``[r + a, r + b]`` pairs pixels
  ``(a * dilation[0], b * dilation[1])`` apart, the pixels that tap actually
  sees relative to the centre tap.

  Call it eagerly (it is jitted inside) or under ``jax.jit`` with
  ``kernel_size``, ``padding``, ``diagonal_removal``, ``strides``,
  ``dilation``, ``padding_mode`` and ``subsample`` static.

  Args:
    inputs: the conv's input, NHWC, unpadded. Any float dtype; the statistics
      are computed in float32.
    kernel_size: odd ``(kh, kw)``, both at least 3. Rows of the result follow
      the H offsets, columns the W offsets.
    padding: the conv's own padding: ``"SAME"``, ``"SAME_LOWER"`` or
      ``"VALID"`` (converted with :func:`jax.lax.padtype_to_pads`, using
      ``strides`` and the dilated kernel size, exactly as lax pads the conv);
      an int or explicit ``((top, bottom), (left, right))`` pairs; or Flax's
      ``"CIRCULAR"`` / ``"REFLECT"``, which pad like the Flax conv does
      (``((k_eff - 1) // 2, k_eff // 2)`` per dim, whatever the stride) and
      imply the matching ``padding_mode``.
    k: the sharpening constant (5 in the paper).
    diagonal_removal: keep only pairs where both values are non-zero, bin them
      with a data-dependent Sturges count over their own ranges, and zero the
      diagonal of the joint histogram before the entropies. An entry with no
      pair left, or an undefined NMI, is 0.
    strides: the conv's strides; only used for ``"SAME"`` pads.
    dilation: the conv's kernel dilation.
    padding_mode: the fill of the padding: ``"zeros"``, ``"circular"``
      (wrap-around, as Flax ``CIRCULAR``) or ``"reflect"`` (as Flax
      ``REFLECT``). The padded values are part of the statistics.
    subsample: if an int, each displacement's histogram counts that many
      pairs drawn uniformly (with replacement) with ``key`` instead of all
      of them. Ranges and the bin count stay those of the full data, so only
      the counts are estimated. ``None`` (the default) uses every pair.
    key: a JAX PRNG key, required with ``subsample``; the result is
      deterministic given the key.

  Returns:
    A float32 ``(kh, kw)`` array with centre 1. An entry that is undefined for
    every channel (for example every channel constant, or a displacement
    with no pair) is NaN; any NaN or inf in ``inputs`` makes every entry NaN.

  Raises:
    ValueError: for inputs that are not rank 4, a kernel size that is even or
      smaller than 3 in a dim, a bad padding spec or padding mode, bad strides
      or dilation, a non-positive ``k``, or ``subsample`` without ``key``.

  References:
    Detkov et al., `Reparameterization through Spatial Gradient Scaling
    <https://arxiv.org/abs/2303.02733>`_, ICLR 2023
  """
  if jnp.ndim(inputs) != 4:
    raise ValueError(
        f"inputs must be NHWC (rank 4), got shape {jnp.shape(inputs)}."
    )
  if not jnp.issubdtype(jnp.result_type(inputs), jnp.floating):
    inputs = jnp.asarray(inputs, jnp.float32)
  kernel_size = _check_kernel_size(kernel_size)
  strides = _as_pair(strides, "strides")
  dilation = _as_pair(dilation, "dilation")
  if min(strides) < 1 or min(dilation) < 1:
    raise ValueError(
        f"strides and dilation must be positive, got {strides}, {dilation}."
    )
  dilated = tuple((kk - 1) * d + 1 for kk, d in zip(kernel_size, dilation))
  pads, pad_mode = _resolve_padding(
      padding, padding_mode, tuple(jnp.shape(inputs)[1:3]), dilated, strides
  )
  if isinstance(k, (int, float)) and not k > 0:
    raise ValueError(f"k must be positive, got {k!r}.")
  n, h, w, _ = jnp.shape(inputs)
  if n * (h + sum(pads[0])) * (w + sum(pads[1])) > _MAX_SAMPLES:
    raise ValueError(
        "Too many pixels for int32 counts: pass fewer images or use "
        "subsample."
    )
  if subsample is not None:
    if isinstance(subsample, bool) or not isinstance(subsample, int):
      raise ValueError(f"subsample must be an int or None, got {subsample!r}.")
    if subsample < 1:
      raise ValueError(f"subsample must be positive, got {subsample}.")
    if key is None:
      raise ValueError("subsample needs a PRNG key: pass key=.")
  return _dependence_impl(
      inputs,
      jnp.asarray(k, jnp.float32),
      key if subsample is not None else None,
      kernel_size=kernel_size,
      pads=pads,
      pad_mode=pad_mode,
      dilation=dilation,
      diagonal_removal=bool(diagonal_removal),
      subsample=subsample,
      chunk_elements=_CHUNK_ELEMENTS,
  )


def dependence_to_scaling(dependence: jax.Array) -> jax.Array:
  """Normalises a dependence matrix to mean 1: ``S = D / mean(D)``.

  Args:
    dependence: a ``(..., kh, kw)`` dependence matrix, e.g. from
      :func:`spatial_dependence`.

  Returns:
    The gradient scaling, same shape, mean 1 over the last two axes. A NaN in
    ``dependence`` gives NaN (callers keep their previous scaling then).

  Raises:
    ValueError: if ``dependence`` has fewer than two dims.

  References:
    Detkov et al., `Reparameterization through Spatial Gradient Scaling
    <https://arxiv.org/abs/2303.02733>`_, ICLR 2023
  """
  if jnp.ndim(dependence) < 2:
    raise ValueError(
        "dependence must have at least two dims (kh, kw), got shape "
        f"{jnp.shape(dependence)}."
    )
  return dependence / jnp.mean(dependence, axis=(-2, -1), keepdims=True)
