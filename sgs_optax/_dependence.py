"""Spatial dependence of a conv layer's input, by normalised mutual information.

This is the statistic behind the SGS scaling refresh (steps 2-7 of the
algorithm): for every displacement inside the kernel window, the plug-in
mutual information between each input pixel and its displaced neighbour,
normalised, sharpened and averaged over channels. It is a jittable, loop-free
(over channels) rewrite of the official ``dependence.py``, with the same bin
count and bin ranges, and without its bugs (max-valued samples dropped under
NumPy >= 2, wrong column centre for non-square kernels, transposed padding).

Bin ids are computed arithmetically, ``floor((v - lo) * bins / (hi - lo))``
clipped to the last bin, and counted with integer scatter-adds into a static
buffer of ``B`` x ``B`` cells per displacement and channel, over the batch in
cache-sized chunks: no ``N x B`` intermediate and no padded copy of the batch
is ever built. XLA:CPU runs a scatter-add on one core at about 1 ns per pair,
which bounds the speed: on a CIFAR VGG-11 refresh (2560 images) this is about
5x faster than the official NumPy loop over ``fast_histogram``, after a
compile of 1-4 s per distinct input shape (see ``benchmarks/mi_speed.py``).

Bin edges are evaluated in float32, NumPy's in float64: a sample lying within
float32 rounding of an edge can land in the neighbouring bin, which moves an
entry by O(1 / pairs). The tests agree with a float64 NumPy reference to 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
# A sampled pair (two gathered pixels) costs about this many counted pairs of
# the full-data path (3.7 measured on VGG inputs): a displacement whose sample
# would be more than 1 / _GATHER_COST of its pairs counts them all instead,
# which is both faster and exact.
_GATHER_COST = 4
# Elements of a padded batch chunk: large enough to amortise the loop, small
# enough for the chunk and its bin ids (one buffer per displacement) to stay
# in a 1 MiB L2 (2**16 was 1.5x slower on VGG inputs), and off fresh,
# page-faulting buffers, where an unchunked version spends most of its time.
_CHUNK_ELEMENTS = 1 << 15


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
  """The conv's explicit ((top, bottom), (left, right)) pads, and its fill."""
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


def _bin_scale(lo: jax.Array, hi: jax.Array, bins: Any) -> jax.Array:
  """Per-channel factor mapping [lo, hi] onto [0, bins]."""
  width = hi - lo
  # A constant variable gets scale 0: all its mass in bin 0, entropy 0.
  return jnp.where(width > 0, jnp.asarray(bins, jnp.float32) / width, 0.0)


def _bin_index(
    v: jax.Array, lo: jax.Array, scale: jax.Array, bins: Any
) -> jax.Array:
  """Uniform bin of `v` with the max in the last bin, as int32 in [0, bins)."""
  # Truncation is floor for v >= lo. float->int32 saturates (NaN -> 0) and
  # both bounds are clipped, so ids stay in bounds even for values outside
  # [lo, hi] (masked-out pairs) or an infinite scale (denormal width).
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


def _source_index(
    t: jax.Array, size: int, before: int, mode: str
) -> jax.Array:
  """Unpadded index that padded position `t` copies (-1 for a padding zero).

  Arithmetic rather than a lookup table: gathers do not fuse on XLA:CPU.
  """
  t = t - before
  if mode == "zeros":
    return jnp.where((t >= 0) & (t < size), t, -1)
  if mode == "circular":
    return jnp.mod(t, size)
  if size == 1:  # reflect of a single row: numpy and jnp.pad repeat it.
    return jnp.zeros_like(t)
  period = 2 * (size - 1)
  t = jnp.mod(jnp.abs(t), period)
  return jnp.where(t < size, t, period - t)


def _batch_chunks(
    x: jax.Array, row_elems: int, chunk_elements: int
) -> tuple[int, int, Callable[[Any], tuple[jax.Array, jax.Array]]]:
  """Static chunking of the batch so per-chunk buffers stay cache-sized.

  Returns the chunk size, the chunk count and a function of the (traced)
  chunk number giving the chunk and a mask of the images that belong to it:
  the last chunk is shifted back to stay in bounds, and its images that an
  earlier chunk already covered are masked out (chunk number `num` is thus
  entirely masked out).
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


def _channel_stride(buf: int) -> int:
  """Cells between two channels' tables: whole 64-byte lines, an odd count.

  A power-of-two stride (16 x 16 bins is 1 KiB) maps every channel's busiest
  cell to the same few L1 sets; an odd number of lines spreads them over all.
  """
  lines = -(-buf * buf // 16)
  return 16 * (lines | 1)


def _count(tables: jax.Array, ids: jax.Array, ones: jax.Array) -> jax.Array:
  """Adds one count per id; `ids` is (..., 1), never flattened."""
  dnums = jax.lax.ScatterDimensionNumbers(
      update_window_dims=(),
      inserted_window_dims=(0,),
      scatter_dims_to_operand_dims=(0,),
  )
  return jax.lax.scatter_add(
      tables, ids, ones, dnums,
      mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )


def _pipelined_counts(
    tables: jax.Array,
    num_steps: int,
    make_ids: Callable[[Any], list[jax.Array]],
    spare: jax.Array,
) -> jax.Array:
  """Counts `make_ids(i)` for i in [0, num_steps) into `tables`.

  Software-pipelined: step i scatters the ids that step i - 1 left in the loop
  carry. On XLA:CPU this is about 3x faster than scattering ids computed in the
  same step, which get fused behind a flattening copy that compiles to scalar
  code with an integer division per element. The carry starts at the `spare`
  cells (broadcast along the last, channel, axis) and `make_ids(num_steps)`
  must send everything there, so there is no prologue or epilogue to compile
  twice.
  """
  def step_ids(i):
    # The trailing index-vector axis is added here, in the producing fusion,
    # so that XLA needs no layout-changing copy before the scatter.
    return [ids[..., None] for ids in make_ids(i)]

  shapes = jax.eval_shape(step_ids, 0)
  pending = [
      jnp.broadcast_to(spare[:, None], sd.shape).astype(jnp.int32)
      for sd in shapes
  ]
  ones = [jnp.ones(sd.shape[:-1], jnp.int32) for sd in shapes]

  def body(i, carry):
    tables, pending = carry
    for ids, one in zip(pending, ones):
      tables = _count(tables, ids, one)
    return tables, step_ids(i)

  tables, _ = jax.lax.fori_loop(0, num_steps + 1, body, (tables, pending))
  return tables


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
  crops = [
      _crop(dx * dilation[0], dy * dilation[1], hp, wp) for dx, dy in disps
  ]
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

  acc_shape = (size, h, w, c)
  lo_acc, hi_acc = jax.lax.fori_loop(
      0, num_chunks, extrema,
      (jnp.full(acc_shape, jnp.inf), jnp.full(acc_shape, -jnp.inf)),
  )
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
        if xs[..., 0].size < 2**24:
          # Counted in float32 (exact below 2**24; an integer sum of booleans
          # does not vectorise on CPU), accumulated in int32.
          in_chunk = jnp.sum(jnp.where(keep, 1.0, 0.0), axis=(0, 1, 2))
          in_chunk = in_chunk.astype(jnp.int32)
        else:
          in_chunk = jnp.sum(keep, axis=(0, 1, 2), dtype=jnp.int32)
        out.append((
            kept + in_chunk,
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
    # All displacements' crop extrema at once, from static crop masks (one
    # fusion instead of four slices and reductions per displacement).
    masks = np.zeros((len(live), 2, hp, wp, 1), bool)
    for slot, j in enumerate(live):
      cr = crops[j]
      masks[slot, 0, cr.x_rows, cr.x_cols] = True
      masks[slot, 1, cr.y_rows, cr.y_cols] = True
    lo = jnp.min(jnp.where(masks, min_map, jnp.inf), axis=(2, 3))
    hi = jnp.max(jnp.where(masks, max_map, -jnp.inf), axis=(2, 3))
    bins = [_sturges(counts[j]) for j in live]
    scale = _bin_scale(lo, hi, np.asarray(bins, np.float32)[:, None, None])
    ranges = [
        (lo[slot, 0], scale[slot, 0], lo[slot, 1], scale[slot, 1], bins[slot])
        for slot in range(len(live))
    ]

  stride = _channel_stride(buf)
  table_size = len(live) * c * stride
  channel_base = jnp.arange(c, dtype=jnp.int32) * stride

  def cell_ids(slot, xs, ys, keep):
    lx, sx, ly, sy, bins = ranges[slot]
    ix = _bin_index(xs, lx, sx, bins)
    iy = _bin_index(ys, ly, sy, bins)
    ids = slot * (c * stride) + channel_base + ix * buf + iy
    # Dropped pairs go to spare cells past the tables, one per channel: a
    # single spare cell would chain every dropped add on one address.
    return jnp.where(keep, ids, spare)

  sampled = [
      s for s, j in enumerate(live)
      if subsample is not None and subsample * _GATHER_COST < counts[j]
  ]
  full = [s for s in range(len(live)) if s not in sampled]
  spare = table_size + jnp.arange(c, dtype=jnp.int32)
  tables = jnp.zeros((table_size + c,), jnp.int32)

  if full:
    # Pass 2: count every pair, chunk by chunk, with one scatter per
    # displacement and chunk (ids stay cache-sized, never N x anything).
    def chunk_ids(i):
      chunk, fresh = get_chunk(i)
      xp = jnp.pad(chunk, pad_spec, mode=jnp_mode)
      ids = []
      for slot in full:
        xs, ys = crop_pairs(xp, crops[live[slot]])
        keep = fresh[:, None, None, None]
        if diagonal_removal:
          keep = keep & (xs != 0) & (ys != 0)
        ids.append(cell_ids(slot, xs, ys, keep))
      return ids

    tables = _pipelined_counts(tables, num_chunks, chunk_ids, spare)

  if sampled:
    # i.i.d. uniform pairs (with replacement: a permutation of millions of
    # positions would cost more than the counting it saves). Each pair's two
    # pixels are located in the unpadded input by mapping padded rows and
    # columns back to their source (-1 for a zero of the padding).
    rows = inputs.reshape(n * h * w, c)

    def locate(img, r, q):
      src_r = _source_index(r, h, pads[0][0], pad_mode)
      src_q = _source_index(q, w, pads[1][0], pad_mode)
      flat = (img * h + jnp.maximum(src_r, 0)) * w + jnp.maximum(src_q, 0)
      return jnp.where((src_r >= 0) & (src_q >= 0), flat, -1)

    # One draw for all displacements: each threefry call costs a lot of
    # compile time.
    positions = jax.random.randint(
        key, (len(sampled), subsample), 0,
        jnp.asarray([counts[live[slot]] for slot in sampled])[:, None],
    )
    where_x, where_y = [], []
    for pos, slot in zip(positions, sampled):
      cr = crops[live[slot]]
      img, rem = jnp.divmod(pos, cr.count_per_image)
      r, q = jnp.divmod(rem, cr.x_cols.stop - cr.x_cols.start)
      where_x.append(locate(img, r + cr.x_rows.start, q + cr.x_cols.start))
      where_y.append(locate(img, r + cr.y_rows.start, q + cr.y_cols.start))
    where_x, where_y = jnp.stack(where_x), jnp.stack(where_y)  # (S, m)
    step = int(min(subsample, max(1, chunk_elements // c)))
    num_steps = -(-subsample // step)

    def pixels(flat):
      vals = jnp.take(rows, jnp.maximum(flat, 0), axis=0, mode="clip")
      return jnp.where((flat >= 0)[:, None], vals.astype(jnp.float32), 0.0)

    def sample_ids(i):
      start = i * step
      shifted = jnp.minimum(start, subsample - step)
      fresh = (shifted + jnp.arange(step) >= start)[:, None]
      wx = jax.lax.dynamic_slice_in_dim(where_x, shifted, step, axis=1)
      wy = jax.lax.dynamic_slice_in_dim(where_y, shifted, step, axis=1)
      ids = []
      for row, slot in enumerate(sampled):
        xs, ys = pixels(wx[row]), pixels(wy[row])
        keep = fresh
        if diagonal_removal:
          keep = keep & (xs != 0) & (ys != 0)
        ids.append(cell_ids(slot, xs, ys, keep))
      return ids

    tables = _pipelined_counts(tables, num_steps, sample_ids, spare)

  # Per channel, the matrix in raster order: column 0 holds the centre's 1,
  # then one column per live displacement, then the undefined value (NaN; 0
  # with diagonal removal, as the official code) for displacements that have
  # no pair at all. A static gather puts each at its two mirrored taps.
  undefined = 0.0 if diagonal_removal else jnp.nan
  columns = [jnp.ones((c, 1), jnp.float32)]
  if live:
    joint = tables[:table_size].reshape(len(live), c, stride)
    joint = joint[..., :buf * buf].reshape(len(live), c, buf, buf)
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
      f = jnp.where(jnp.isnan(f), 0.0, f)
    columns.append(f.T)
  columns.append(jnp.full((c, 1), undefined, jnp.float32))
  source = np.zeros((kh, kw), np.int32)
  for j, (dx, dy) in enumerate(disps):
    col = 1 + live.index(j) if j in live else 1 + len(live)
    source[rh + dx, rw + dy] = source[rh - dx, rw - dy] = col
  per_channel = jnp.concatenate(columns, axis=1)[:, source]  # (C, kh, kw)
  # nanmean over channels, written out so it cannot warn.
  valid = ~jnp.isnan(per_channel)
  total = jnp.sum(jnp.where(valid, per_channel, 0.0), axis=0)
  dependence = total / jnp.sum(valid, axis=0)
  # NaN or inf in the inputs poisons the whole matrix rather than a channel.
  dependence = jnp.where(finite, dependence, jnp.nan)
  chex.assert_shape(dependence, (kh, kw))
  return dependence


def _replicate_if_explicitly_sharded(inputs: jax.Array) -> jax.Array:
  """Gathers inputs whose type carries an explicit (non-GSPMD) sharding.

  The per-cell counts are scatter-adds over every pixel of the batch: under
  explicit sharding their output sharding would be ambiguous, so the inputs
  are gathered onto every device first. Automatic (GSPMD) sharding needs no
  gather: XLA all-reduces the small count tables itself.
  """
  spec = getattr(getattr(jax.typeof(inputs), "sharding", None), "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return inputs
  return jax.sharding.reshard(inputs, jax.sharding.PartitionSpec())


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
      the counts are estimated. The plug-in entropies of a sample are biased
      (the more so the more bins per pair): on VGG-like inputs the matrix
      moves by about 2e-2 at 16k pairs, 1e-2 at 64k and 3e-3 at 256k. A
      displacement with fewer than ``4 * subsample`` pairs counts them all
      (faster than gathering the sample, and exact). ``None`` (the default)
      uses every pair.
    key: a JAX PRNG key, required with ``subsample``; the result is
      deterministic given the key.

  Returns:
    A float32 ``(kh, kw)`` array with centre 1. An entry that is undefined for
    every channel (for example every channel constant, or a displacement
    with no pair) is NaN; any NaN or inf in ``inputs`` makes every entry NaN.

  Raises:
    ValueError: for inputs that are not rank 4, a kernel size that is even or
      smaller than 3 in a dim, a bad padding spec or padding mode, bad strides
      or dilation, a non-positive ``k``, ``subsample`` without ``key``, or
      more than 2**31 - 1 padded pixels per channel. Raised while tracing.

  Examples:
    >>> import jax
    >>> import sgs_optax
    >>> x = jax.nn.relu(jax.random.normal(jax.random.key(0), (8, 16, 16, 4)))
    >>> d = sgs_optax.spatial_dependence(x, (3, 3), padding="SAME")
    >>> d.shape, float(d[1, 1])
    ((3, 3), 1.0)
    >>> s = sgs_optax.dependence_to_scaling(d)  # mean 1: an SGS matrix

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
  hp, wp = h + sum(pads[0]), w + sum(pads[1])
  if n * hp * wp > _MAX_SAMPLES:
    raise ValueError(
        f"{n * hp * wp} padded pixels per channel overflow int32 counts: "
        "pass fewer images."
    )
  if subsample is not None:
    if isinstance(subsample, bool) or not isinstance(subsample, int):
      raise ValueError(f"subsample must be an int or None, got {subsample!r}.")
    if subsample < 1:
      raise ValueError(f"subsample must be positive, got {subsample}.")
    if key is None:
      raise ValueError("subsample needs a PRNG key: pass key=.")
    largest = max(
        _crop(dx * dilation[0], dy * dilation[1], hp, wp).count_per_image
        for dx, dy in _displacements(kernel_size)
    )
    if subsample * _GATHER_COST >= n * largest:
      # No displacement would be sampled: share the full-data compile.
      subsample = None
  return _dependence_impl(
      _replicate_if_explicitly_sharded(inputs),
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
