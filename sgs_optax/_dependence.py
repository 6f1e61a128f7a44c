"""Spatial dependence of a conv layer's input, by normalised mutual information.

This is the statistic behind the SGS scaling refresh (steps 2-7 of the
algorithm): for every displacement inside the kernel window, the plug-in
mutual information between each input pixel and its displaced neighbour,
normalised, sharpened and averaged over channels. It is a jittable rewrite of
the official ``dependence.py``, for 1, 2 or 3 spatial axes, with the same bin
count and bin ranges and without its bugs (max-valued samples dropped under
NumPy >= 2, wrong column centre for non-square kernels, transposed padding).

The estimate runs in named steps:

1. ``_position_extrema``: the batch's min and max at every position (one pass
   over the data), from which ``_crop_ranges`` reads each displacement's
   ``[min, max]`` ranges; with diagonal removal ``_kept_ranges`` takes them
   (and the data-dependent bin counts) from the kept pairs instead.
2. ``_count_group``: joint histograms, per displacement and channel, counted
   with integer scatter-adds into a static buffer of ``B`` x ``B`` cells,
   over the batch in cache-sized chunks (``_count_pairs``) or over a random
   sample of pairs (``_count_sample``). No ``N x B`` intermediate and no
   padded copy of the batch is built.
3. ``_sharpened_nmi``: entropies in bits, NMI and its sharpening.
4. ``_assemble``: each value at its two mirrored taps, averaged over channels.

On feature maps sharded over the batch, every device counts its own images
and only the small per-displacement tables, ranges and pair counts cross
devices (``_partition``); the maps are never gathered. Speed against the
official NumPy loop is measured by ``benchmarks/mi_speed.py``.

Bin edges are evaluated in float32, NumPy's in float64: a sample lying within
float32 rounding of an edge can land in the neighbouring bin, which moves an
entry by O(1 / pairs). The tests agree with a float64 NumPy reference to 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import itertools
import math
import numbers
from typing import Any, NamedTuple

import jax
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from sgs_optax import _geometry

_JNP_PAD_MODES = {"zeros": "constant", "circular": "wrap", "reflect": "reflect"}
# Bin ids and per-cell counts are int32.
_MAX_SAMPLES = 2**31 - 1
# A sampled pair (two gathered pixels) costs about as much as this many
# counted pairs of the full-data path: a displacement whose sample would be
# more than 1 / _GATHER_COST of its pairs counts them all instead, which is
# both faster and exact.
_GATHER_COST = 4
# Elements of a padded batch chunk: large enough to amortise the loop, small
# enough for the chunk and the bin ids of four displacements to stay in a
# typical L2 cache. Chunks shrink for larger groups of displacements.
_CHUNK_ELEMENTS = 1 << 15
# Count tables (and sampled pair positions) are held for at most this many
# int32 cells at once: large windows are counted in groups of displacements,
# so that memory stays bounded whatever the window.
_GROUP_CELLS = 1 << 24
# Windows with more displacements than this are counted in a loop over them
# rather than unrolled, so that compile time stays flat as windows grow.
_UNROLLED_ROWS = 8


class _Plan(NamedTuple):
  """Everything static about one estimate (hashable: a jit static)."""

  kernel_size: tuple[int, ...]
  batch: int  # the whole batch, over all devices: it sets the bin counts
  spatial: tuple[int, ...]  # unpadded
  pads: tuple[tuple[int, int], ...]
  mode: str
  taps: tuple[tuple[int, ...], ...]  # displacements, in kernel taps
  offsets: tuple[tuple[int, ...], ...]  # the same in pixels (dilated)
  diagonal_removal: bool
  subsample: int | None

  @property
  def padded(self) -> tuple[int, ...]:
    return tuple(s + lo + hi for s, (lo, hi) in zip(self.spatial, self.pads))

  def pairs(self, j: int) -> int:
    """Pairs of displacement ``j`` over the whole batch."""
    return self.batch * _crop(self.offsets[j], self.padded)[2]

  @property
  def live(self) -> tuple[int, ...]:
    """Displacements with at least one pair (the others are undefined)."""
    return tuple(j for j in range(len(self.taps)) if self.pairs(j) > 0)

  @property
  def buf(self) -> int:
    """Bins of the static buffer: the most any live displacement needs."""
    return max([_sturges(self.pairs(j)) for j in self.live], default=1)

  def sampled(self, j: int) -> bool:
    return (self.subsample is not None
            and self.subsample * _GATHER_COST < self.pairs(j))


def _displacements(kernel_size: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
  """One offset of each +/- pair, in the official code's (raster) order."""
  radii = [range(-(k // 2), k // 2 + 1) for k in kernel_size]
  out = []
  for tap in itertools.product(*radii):
    negated = tuple(-t for t in tap)
    if any(tap) and negated not in out:
      out.append(tap)
  return tuple(out)


def _crop(
    offset: Sequence[int], padded: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...], int]:
  """Where a displacement's centre (x) and neighbour (y) pixels sit.

  Returns the slices of each on the padded map and the pairs per image.
  """
  xs, ys, count = [], [], 1
  for u, size in zip(offset, padded):
    length = max(size - abs(u), 0)
    start = max(-u, 0)
    xs.append(slice(start, start + length))
    ys.append(slice(start + u, start + u + length))
    count *= length
  return tuple(xs), tuple(ys), count


def _sturges(n: int) -> int:
  # 1 + ceil(log2(n)) in exact integer arithmetic.
  return 1 + (n - 1).bit_length()


def _sturges_traced(n: jax.Array) -> jax.Array:
  # ceil(log2(n)) == bit_length(n - 1) == 32 - clz(n - 1) for n >= 1; a float
  # log2 can land a hair above an exact power of two.
  n = jnp.maximum(n.astype(jnp.int32), 1)
  return 1 + (32 - jax.lax.clz(n - 1))


def _bin_scale(lo: jax.Array, hi: jax.Array, bins: Any) -> jax.Array:
  """Factor mapping [lo, hi] onto [0, bins]."""
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


def _all_reduce(
    x: jax.Array, op: Callable[..., jax.Array], axes: tuple[str, ...]
) -> jax.Array:
  """Combines per-device statistics over the mesh axes the batch is split on."""
  return op(x, axes) if axes else x


def _count_true(mask: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """int32 count of True along `axes`."""
  if math.prod(mask.shape[a] for a in axes) < 2**24:
    # Summed in float32 (exact below 2**24), which vectorises on CPU where an
    # integer sum of booleans does not.
    return jnp.sum(jnp.where(mask, 1.0, 0.0), axis=axes).astype(jnp.int32)
  return jnp.sum(mask, axis=axes, dtype=jnp.int32)


class _Chunks(NamedTuple):
  """The local batch in static chunks, so per-chunk buffers stay small.

  ``get(i)`` gives chunk ``i`` as float32 and a mask of its images that no
  earlier chunk covered: the last chunk is shifted back to stay in bounds and
  its repeated images are masked out, and chunk ``num`` is entirely masked
  out (the pipelined count reads one chunk past the end).
  """

  size: int
  num: int
  get: Callable[[Any], tuple[jax.Array, jax.Array]]


def _batch_chunks(
    x: jax.Array, padded: Sequence[int], elements: int
) -> _Chunks:
  n = x.shape[0]
  row = math.prod(padded) * x.shape[-1]
  size = int(min(n, max(1, elements // max(row, 1))))

  def get(i):
    start = i * size
    shifted = jnp.minimum(start, n - size)
    chunk = jax.lax.dynamic_slice_in_dim(x, shifted, size, axis=0)
    fresh = shifted + jnp.arange(size) >= start
    return chunk.astype(jnp.float32), fresh

  return _Chunks(size, -(-n // size), get)


def _pad(chunk: jax.Array, plan: _Plan) -> jax.Array:
  return jnp.pad(
      chunk, ((0, 0), *plan.pads, (0, 0)), mode=_JNP_PAD_MODES[plan.mode]
  )


def _take(table: Any, row: Any) -> Any:
  """Row `row` of a small table: static for an int row, traced otherwise.

  A traced row is picked by a masked reduction rather than a dynamic slice:
  a dynamic slice would be fused into the per-pair arithmetic that reads it
  and keep that from compiling to vector code.
  """
  if isinstance(row, int):
    return table[row]
  table = jnp.asarray(table)
  pick = jnp.arange(table.shape[0]) == row
  pick = pick.reshape((-1,) + (1,) * (table.ndim - 1))
  if jnp.issubdtype(table.dtype, jnp.floating):
    lowest = -jnp.inf
  else:
    lowest = jnp.iinfo(table.dtype).min
  return jnp.max(jnp.where(pick, table, lowest), axis=0)


def _live_crops(plan: _Plan) -> np.ndarray:
  """Per live displacement and axis: x start, y start and crop length."""
  table = np.zeros((len(plan.live), 3, len(plan.spatial)), np.int32)
  for row, j in enumerate(plan.live):
    x, y, _ = _crop(plan.offsets[j], plan.padded)
    table[row] = [[s.start for s in x], [s.start for s in y],
                  [s.stop - s.start for s in x]]
  return table


class _Schedule(NamedTuple):
  """Which rows (displacements) each loop step handles, for which block.

  A few rows are unrolled: every step handles all of them on one block, with
  exact static crops. Many rows (a large window) would unroll into a program
  whose compile time grows with the window, so each step handles one row of
  one block instead, with a traced row number; rows are outermost, so that
  one row's tables stay in cache while the blocks stream past. Step `num`
  (one past the end) gets block `blocks`, which is entirely masked out.
  """

  rows: tuple[int, ...]
  blocks: int

  @property
  def unrolled(self) -> bool:
    return len(self.rows) <= _UNROLLED_ROWS

  @property
  def num(self) -> int:
    return self.blocks * (1 if self.unrolled else len(self.rows))

  def at(self, i: Any) -> tuple[Any, list[tuple[Any, Any]]]:
    """Block of step `i` and its (position in `rows`, row) pairs."""
    if self.unrolled:
      return i, list(enumerate(self.rows))
    slot = jnp.minimum(i // self.blocks, len(self.rows) - 1)
    block = jnp.where(i < self.num, i % self.blocks, self.blocks)
    return block, [(slot, _take(self.rows, slot))]


def _row_pairs(
    xp: jax.Array, plan: _Plan, row: Any
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Centre and neighbour pixels of live displacement `row` in a padded chunk.

  Returns them and a mask of the real pairs (None: all are). A static row is
  cropped exactly; a traced one pairs the whole map with a shifted copy and
  masks the pairs whose neighbour falls off the map.
  """
  everything = slice(None)
  if isinstance(row, int):
    x, y, _ = _crop(plan.offsets[plan.live[row]], plan.padded)
    return (xp[(everything, *x, everything)],
            xp[(everything, *y, everything)], None)
  offset = _take(np.asarray([plan.offsets[j] for j in plan.live]), row)
  # Row-major: the neighbour of flat position q is q + delta wherever the
  # pair is real; elsewhere the index is clipped and the pair masked.
  delta = jnp.dot(offset, np.cumprod((1, *plan.padded[:0:-1]))[::-1])
  flat = xp.reshape(-1, xp.shape[-1])
  source = jnp.arange(flat.shape[0]) + delta
  ys = jnp.take(flat, source, axis=0, mode="clip").reshape(xp.shape)
  valid = True
  for axis, size in enumerate(plan.padded):
    t = jax.lax.broadcasted_iota(jnp.int32, (1, *plan.padded, 1), axis + 1)
    valid = valid & (t + offset[axis] >= 0) & (t + offset[axis] < size)
  return xp, ys, valid


def _fresh_mask(fresh: jax.Array, like: jax.Array) -> jax.Array:
  return fresh.reshape((-1,) + (1,) * (like.ndim - 1))


class _Ranges(NamedTuple):
  """Per live displacement (rows) and channel: bins of x and y."""

  lo: jax.Array  # (L, 2, C): the x and y minima
  scale: jax.Array  # (L, 2, C): bins / (max - min)
  bins: Any  # (L,) static ints, or (L, C) traced counts


def _position_extrema(
    inputs: jax.Array, plan: _Plan, axes: tuple[str, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Padded maps of the batch's min and max at each position, and finiteness.

  The extrema are taken unpadded (padding only copies or zeroes positions, so
  it commutes with them), with elementwise accumulators over chunks: a
  reduction over the leading axis is slow on CPU.
  """
  chunks = _batch_chunks(inputs, plan.spatial, _CHUNK_ELEMENTS)

  def body(i, carry):
    chunk, _ = chunks.get(i)
    return jnp.minimum(carry[0], chunk), jnp.maximum(carry[1], chunk)

  shape = (chunks.size, *inputs.shape[1:])
  lo, hi = jax.lax.fori_loop(
      0, chunks.num, body,
      (jnp.full(shape, jnp.inf), jnp.full(shape, -jnp.inf)),
  )
  lo, hi = jnp.min(lo, axis=0), jnp.max(hi, axis=0)
  spatial = tuple(range(lo.ndim - 1))
  # NaN or inf anywhere shows in some channel's minimum or maximum.
  lowest = _all_reduce(jnp.min(lo, axis=spatial), jax.lax.pmin, axes)
  highest = _all_reduce(jnp.max(hi, axis=spatial), jax.lax.pmax, axes)
  finite = jnp.all(jnp.isfinite(lowest)) & jnp.all(jnp.isfinite(highest))
  pad = (*plan.pads, (0, 0))
  mode = _JNP_PAD_MODES[plan.mode]
  return jnp.pad(lo, pad, mode=mode), jnp.pad(hi, pad, mode=mode), finite


def _running(m: jax.Array, op: Callable[..., jax.Array]) -> list[jax.Array]:
  """`op` (cummin or cummax) run from either end of every spatial axis.

  Map ``b`` of the ``2**d`` runs backwards along spatial axis ``a`` iff bit
  ``a`` of ``b`` is set.
  """
  maps = [m]
  for axis in range(m.ndim - 1):
    maps = [op(x, axis=axis, reverse=back) for back in (False, True)
            for x in maps]
  return maps


def _corners(starts: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
  """Which running map holds each crop's extremum, and at which position.

  Every crop is a prefix or a suffix of each axis, so its extremum is the
  forward run at its last position or the backward run at its first one.
  """
  suffix = starts > 0
  which = (suffix * (1 << np.arange(starts.shape[-1]))).sum(-1)
  where = np.where(suffix, starts, starts + lengths - 1)
  return [which, *where.T]


def _crop_ranges(
    lo_map: jax.Array, hi_map: jax.Array, plan: _Plan, axes: tuple[str, ...]
) -> _Ranges:
  """Bins over each crop's [min, max], with the static Sturges count."""
  table = _live_crops(plan)
  index = [np.stack([x, y], axis=1) for x, y in zip(
      _corners(table[:, 0], table[:, 2]), _corners(table[:, 1], table[:, 2]))]
  lo = jnp.stack(_running(lo_map, jax.lax.cummin))[tuple(index)]
  hi = jnp.stack(_running(hi_map, jax.lax.cummax))[tuple(index)]
  lo = _all_reduce(lo, jax.lax.pmin, axes)  # (L, 2, C)
  hi = _all_reduce(hi, jax.lax.pmax, axes)
  bins = tuple(_sturges(plan.pairs(j)) for j in plan.live)
  scale = _bin_scale(lo, hi, np.asarray(bins, np.float32)[:, None, None])
  return _Ranges(lo, scale, bins)


def _kept_ranges(
    inputs: jax.Array, plan: _Plan, axes: tuple[str, ...]
) -> _Ranges:
  """Diagonal removal: ranges and traced Sturges counts of the kept pairs.

  A pair is kept when both its values are non-zero; how many are kept, hence
  the bin count, depends on the data, and every device's share counts.
  """
  chunks = _batch_chunks(inputs, plan.padded, _CHUNK_ELEMENTS)
  schedule = _Schedule(tuple(range(len(plan.live))), chunks.num)

  def body(i, carry):
    kept, lo, hi = carry
    block, steps = schedule.at(i)
    chunk, fresh = chunks.get(block)
    xp = _pad(chunk, plan)
    for _, row in steps:
      xs, ys, valid = _row_pairs(xp, plan, row)
      keep = (xs != 0) & (ys != 0) & _fresh_mask(fresh, xs)
      keep = keep if valid is None else keep & valid
      over = tuple(range(keep.ndim - 1))
      low = [jnp.min(jnp.where(keep, v, jnp.inf), over) for v in (xs, ys)]
      high = [jnp.max(jnp.where(keep, v, -jnp.inf), over) for v in (xs, ys)]
      kept = kept.at[row].add(_count_true(keep, over))
      lo = lo.at[row].min(jnp.stack(low))
      hi = hi.at[row].max(jnp.stack(high))
    return kept, lo, hi

  shape = (len(plan.live), 2, inputs.shape[-1])
  kept, lo, hi = jax.lax.fori_loop(0, schedule.num, body, (
      jnp.zeros(shape[::2], jnp.int32), jnp.full(shape, jnp.inf),
      jnp.full(shape, -jnp.inf)))
  kept = _all_reduce(kept, jax.lax.psum, axes)
  lo = _all_reduce(lo, jax.lax.pmin, axes)
  hi = _all_reduce(hi, jax.lax.pmax, axes)
  bins = _sturges_traced(kept)  # (L, C); never above the static buffer
  return _Ranges(lo, _bin_scale(lo, hi, bins[:, None, :]), bins)


class _Cells(NamedTuple):
  """Count tables of a group of consecutive live displacements (rows).

  ``buf`` x ``buf`` cells per row and channel, ``stride`` cells apart, then
  one spare cell per channel for the pairs that are not counted.
  """

  start: int  # first live row of the group
  rows: int
  channels: int
  buf: int
  stride: int

  @property
  def size(self) -> int:
    return self.rows * self.channels * self.stride

  def spare(self) -> jax.Array:
    # One spare cell per channel: a single one would chain every dropped add
    # on one address.
    return self.size + jnp.arange(self.channels, dtype=jnp.int32)


def _channel_stride(buf: int) -> int:
  """Cells between two channels' tables: whole 64-byte lines, an odd count.

  A power-of-two stride (16 x 16 bins is 1 KiB) maps every channel's busiest
  cell to the same few L1 sets; an odd number of lines spreads them over all.
  """
  lines = -(-buf * buf // 16)
  return 16 * (lines | 1)


def _groups(plan: _Plan, channels: int) -> list[_Cells]:
  """Live displacements split so each group's tables stay bounded."""
  live, buf = len(plan.live), plan.buf
  stride = _channel_stride(buf)
  # Per row: its tables, and its sampled pair positions if any.
  size = max(1, _GROUP_CELLS // (channels * stride + (plan.subsample or 0)))
  return [_Cells(start, min(size, live - start), channels, buf, stride)
          for start in range(0, live, size)]


def _cell_ids(
    cells: _Cells, ranges: _Ranges, row: Any, xs: jax.Array, ys: jax.Array,
    keep: jax.Array,
) -> jax.Array:
  """Table cell of each pair of group row `row`; others go to spare cells."""
  live_row = cells.start + row
  lo, scale = _take(ranges.lo, live_row), _take(ranges.scale, live_row)
  bins = _take(ranges.bins, live_row)
  ix = _bin_index(xs, lo[0], scale[0], bins)
  iy = _bin_index(ys, lo[1], scale[1], bins)
  base = jnp.arange(cells.channels, dtype=jnp.int32) * cells.stride
  ids = row * (cells.channels * cells.stride) + base + ix * cells.buf + iy
  return jnp.where(keep, ids, cells.spare())


def _scatter_count(tables: jax.Array, ids: jax.Array, ones: jax.Array):
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
  carry. On CPU, ids computed in the same step as their scatter get fused
  behind a flattening copy that compiles to slow scalar code. The carry starts
  at the `spare` cells (broadcast along the last, channel, axis) and
  `make_ids(num_steps)` must send everything there, so there is no prologue
  or epilogue to compile twice.
  """
  def step_ids(i):
    # The trailing index-vector axis is added here, in the producing fusion,
    # so that no layout-changing copy is needed before the scatter.
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
      tables = _scatter_count(tables, ids, one)
    return tables, step_ids(i)

  tables, _ = jax.lax.fori_loop(0, num_steps + 1, body, (tables, pending))
  return tables


def _count_pairs(
    tables: jax.Array, inputs: jax.Array, plan: _Plan, ranges: _Ranges,
    cells: _Cells, rows: list[int],
) -> jax.Array:
  """Counts every pair of the given group rows, chunk by chunk."""
  # The ids of all rows a step handles (all unrolled ones, or one) stay
  # about as small as those of four rows in a chunk.
  per_step = len(rows) if len(rows) <= _UNROLLED_ROWS else 1
  elements = _CHUNK_ELEMENTS * 4 // max(per_step, 4)
  chunks = _batch_chunks(inputs, plan.padded, elements)
  schedule = _Schedule(tuple(rows), chunks.num)

  def chunk_ids(i):
    block, steps = schedule.at(i)
    chunk, fresh = chunks.get(block)
    xp = _pad(chunk, plan)
    ids = []
    for _, row in steps:
      xs, ys, valid = _row_pairs(xp, plan, cells.start + row)
      keep = _fresh_mask(fresh, xs)
      keep = keep if valid is None else keep & valid
      if plan.diagonal_removal:
        keep = keep & (xs != 0) & (ys != 0)
      ids.append(_cell_ids(cells, ranges, row, xs, ys, keep))
    return ids

  return _pipelined_counts(tables, schedule.num, chunk_ids, cells.spare())


def _source_index(
    t: jax.Array, size: int, before: int, mode: str
) -> jax.Array:
  """Unpadded index that padded position `t` copies (-1 for a padding zero).

  Arithmetic rather than a lookup table: gathers do not fuse on CPU.
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


def _locate(
    pos: jax.Array, row: Any, plan: _Plan, first: Any, n_local: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Flat local rows of the x and y pixels of pair number `pos` of live row
  `row`, and whether the pair's image is on this device. A flat row of -1 is
  a zero of the padding."""
  x_start, y_start, length = _take(_live_crops(plan), row)
  per_image = np.prod(length) if isinstance(row, int) else jnp.prod(length)
  image, rest = jnp.divmod(pos, per_image)
  image = image - first
  here = (image >= 0) & (image < n_local)
  within = []
  for axis in reversed(range(len(plan.spatial))):  # row-major in the crop
    rest, q = jnp.divmod(rest, length[axis])
    within.insert(0, q)
  flats = []
  for start in (x_start, y_start):
    flat, inside = jnp.where(here, image, 0), here
    for axis, (size, (before, _)) in enumerate(zip(plan.spatial, plan.pads)):
      src = _source_index(within[axis] + start[axis], size, before, plan.mode)
      flat, inside = flat * size + jnp.maximum(src, 0), inside & (src >= 0)
    flats.append(jnp.where(inside, flat, -1))
  return flats[0], flats[1], here


def _count_sample(
    tables: jax.Array, inputs: jax.Array, key: jax.Array, plan: _Plan,
    ranges: _Ranges, cells: _Cells, rows: list[int], first: Any,
) -> jax.Array:
  """Counts `plan.subsample` i.i.d. uniform pairs of each given group row.

  Pairs are drawn with replacement (a permutation of millions of positions
  would cost more than the counting it saves) over the whole batch, the same
  draw on every device; each device counts the pairs of its own images.
  """
  m, c = plan.subsample, inputs.shape[-1]
  # One draw for all rows: each threefry call costs compile time.
  pairs = [plan.pairs(plan.live[cells.start + r]) for r in rows]
  positions = jax.random.randint(
      key, (len(rows), m), 0, jnp.asarray(pairs)[:, None])
  flat_rows = inputs.reshape(-1, c)
  step = int(min(m, max(1, _CHUNK_ELEMENTS // c)))
  schedule = _Schedule(tuple(rows), -(-m // step))

  def pixels(flat):
    vals = jnp.take(flat_rows, jnp.maximum(flat, 0), axis=0, mode="clip")
    return jnp.where((flat >= 0)[:, None], vals.astype(jnp.float32), 0.0)

  def sample_ids(i):
    block, steps = schedule.at(i)
    shifted = jnp.minimum(block * step, m - step)
    fresh = (shifted + jnp.arange(step) >= block * step)[:, None]
    ids = []
    for slot, row in steps:
      pos = jax.lax.dynamic_slice_in_dim(positions[slot], shifted, step)
      where_x, where_y, here = _locate(
          pos, cells.start + row, plan, first, inputs.shape[0])
      xs, ys = pixels(where_x), pixels(where_y)
      keep = fresh & here[:, None]
      if plan.diagonal_removal:
        keep = keep & (xs != 0) & (ys != 0)
      ids.append(_cell_ids(cells, ranges, row, xs, ys, keep))
    return ids

  return _pipelined_counts(tables, schedule.num, sample_ids, cells.spare())


def _count_group(
    inputs: jax.Array, key: jax.Array | None, plan: _Plan, ranges: _Ranges,
    cells: _Cells, axes: tuple[str, ...],
) -> jax.Array:
  """Joint histograms of one group of displacements: (G, C, buf, buf)."""
  rows = range(cells.rows)
  sampled = [r for r in rows if plan.sampled(plan.live[cells.start + r])]
  full = [r for r in rows if r not in sampled]
  tables = jnp.zeros((cells.size + cells.channels,), jnp.int32)
  if full:
    tables = _count_pairs(tables, inputs, plan, ranges, cells, full)
  if sampled:
    first = (jax.lax.axis_index(axes) if axes else 0) * inputs.shape[0]
    tables = _count_sample(tables, inputs, key, plan, ranges, cells, sampled,
                           first)
  # The tables, not the maps, cross devices.
  tables = _all_reduce(tables[:cells.size], jax.lax.psum, axes)
  joint = tables.reshape(cells.rows, cells.channels, cells.stride)
  joint = joint[..., :cells.buf * cells.buf]
  return joint.reshape(cells.rows, cells.channels, cells.buf, cells.buf)


def _entropy_bits(counts: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Shannon entropy in bits of the non-zero cells, normalised per table."""
  total = jnp.sum(counts, axis=axes, keepdims=True)
  nonzero = counts > 0
  p = jnp.where(nonzero, counts / jnp.where(total > 0, total, 1), 1)
  h = -jnp.sum(jnp.where(nonzero, p * jnp.log2(p), 0), axis=axes)
  # A single occupied cell must give exactly 0 (not a rounding residue of
  # c / c), so that a constant channel's 0/0 stays NaN instead of NMI = 1.
  return jnp.where(jnp.sum(nonzero, axis=axes) > 1, h, 0.0)


def _sharpened_nmi(
    joint: jax.Array, k: jax.Array, diagonal_removal: bool
) -> jax.Array:
  """``k * NMI / ((k - 1) * NMI + 1)`` of each (..., B, B) joint histogram."""
  joint = joint.astype(jnp.float32)
  if diagonal_removal:
    # The marginals are then summed from the zeroed joint, as officially.
    joint = joint * (1 - jnp.eye(joint.shape[-1], dtype=jnp.float32))
  h_xy = _entropy_bits(joint, (-2, -1))
  h_x = _entropy_bits(jnp.sum(joint, axis=-1), (-1,))
  h_y = _entropy_bits(jnp.sum(joint, axis=-2), (-1,))
  # 0/0 (constant or dead channel, empty table) is NaN on purpose.
  nmi = (h_x + h_y - h_xy) / h_xy
  f = k * nmi / ((k - 1) * nmi + 1)
  # With diagonal removal the official code writes 0 for an undefined value.
  return jnp.where(jnp.isnan(f), 0.0, f) if diagonal_removal else f


def _assemble(f: jax.Array, plan: _Plan) -> jax.Array:
  """Places each live displacement's values (L, C) at its two mirrored taps,
  with 1 at the centre, and averages over channels skipping NaN."""
  c = f.shape[-1]
  undefined = 0.0 if plan.diagonal_removal else jnp.nan
  # Columns: the centre's 1, one per live displacement, then the value of a
  # displacement with no pair at all; a static gather places them.
  columns = jnp.concatenate(
      [jnp.ones((c, 1)), f.T, jnp.full((c, 1), undefined)], axis=1
  )
  source = np.zeros(plan.kernel_size, np.int32)
  radius = np.asarray(plan.kernel_size) // 2
  live = plan.live
  for j, tap in enumerate(plan.taps):
    column = 1 + live.index(j) if j in live else 1 + len(live)
    source[tuple(radius + tap)] = source[tuple(radius - tap)] = column
  per_channel = columns[:, source]  # (C, *kernel_size)
  # nanmean over channels, written out so it cannot warn.
  valid = ~jnp.isnan(per_channel)
  total = jnp.sum(jnp.where(valid, per_channel, 0.0), axis=0)
  return total / jnp.sum(valid, axis=0)


def _estimate(
    inputs: jax.Array, k: jax.Array, key_data: jax.Array | None, *,
    plan: _Plan, key_impl: str | None, axes: tuple[str, ...],
) -> jax.Array:
  """The dependence matrix, from this device's share of the batch.

  `axes` are the mesh axes the batch is split over (empty on one device):
  statistics are combined over them wherever they are reduced.
  """
  lo_map, hi_map, finite = _position_extrema(inputs, plan, axes)
  ranges = None
  if plan.live and plan.diagonal_removal:
    ranges = _kept_ranges(inputs, plan, axes)
  elif plan.live:
    ranges = _crop_ranges(lo_map, hi_map, plan, axes)
  key = None
  if key_data is not None:
    key = jax.random.wrap_key_data(key_data, impl=key_impl)
  f = [jnp.zeros((0, inputs.shape[-1]), jnp.float32)]
  for g, cells in enumerate(_groups(plan, inputs.shape[-1])):
    group_key = None if key is None else jax.random.fold_in(key, g)
    joint = _count_group(inputs, group_key, plan, ranges, cells, axes)
    f.append(_sharpened_nmi(joint, k, plan.diagonal_removal))
  dependence = _assemble(jnp.concatenate(f), plan)
  # NaN or inf in the inputs poisons the whole matrix rather than a channel.
  return jnp.where(finite, dependence, jnp.nan)


def _batch_axes(mesh: Any, arg: Any, batch: int) -> tuple[str, ...]:
  """Mesh axes that split the batch evenly, read from the input's sharding."""
  spec = getattr(arg.sharding, "spec", None)
  if not spec or spec[0] is None:
    return ()
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  shards = math.prod(mesh.shape[a] for a in axes)
  # Uneven shards are padded, and the padding must not be counted: such a
  # batch is gathered instead.
  return axes if batch % shards == 0 else ()


def _partition(plan, key_impl, mesh, arg_shapes, result_shape):
  """Counts on each device's share of the batch (custom_partitioning)."""
  del result_shape
  axes = _batch_axes(mesh, arg_shapes[0], plan.batch)
  replicated = NamedSharding(mesh, P())
  arg_shardings = jax.tree.map(lambda _: replicated, arg_shapes)
  arg_shardings = (NamedSharding(mesh, P(axes or None)), *arg_shardings[1:])
  lower = functools.partial(_estimate, plan=plan, key_impl=key_impl, axes=axes)
  return mesh, lower, replicated, arg_shardings


def _replicated_result(plan, key_impl, mesh, arg_shapes, result_shape):
  del plan, key_impl, arg_shapes, result_shape
  return NamedSharding(mesh, P())


_estimate_jit = jax.jit(_estimate, static_argnames=("plan", "key_impl", "axes"))


def _unpartitioned(inputs, k, key_data, plan, key_impl):
  return _estimate_jit(inputs, k, key_data, plan=plan, key_impl=key_impl,
                       axes=())


@functools.cache
def _partitioned(input_rank: int, with_key: bool) -> Callable[..., jax.Array]:
  """The estimator, partitioned over a batch-sharded input by XLA.

  Under automatic sharding the input's sharding is not known while tracing;
  custom partitioning lets the partitioner report it and take `_partition`'s
  per-device lowering. Unsharded, it runs the estimator as is.
  """
  fn = custom_partitioning(_unpartitioned, static_argnums=(3, 4))
  dims = " ".join(f"i{a}" for a in range(input_rank))
  out = " ".join(f"o{a}" for a in range(input_rank - 2))
  rule = f"{dims}, {', k0' if with_key else ''} -> {out}"
  fn.def_partition(
      partition=_partition,
      infer_sharding_from_operands=_replicated_result,
      sharding_rule=rule,
  )
  return fn


def _one_by_one(call: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`call`, which `jax.vmap` maps over the mapped arguments in turn.

  Custom partitioning has no batching rule; stacked inputs (one per layer of
  a scanned model) are estimated one after another, which also keeps one set
  of count tables alive at a time.
  """
  mapped = custom_vmap(call)

  @mapped.def_vmap
  def rule(axis_size, in_batched, *args):
    del axis_size

    def one(example):
      return mapped(*[e if b else a
                      for a, e, b in zip(args, example, in_batched)])

    return jax.lax.map(one, [a if b else None
                             for a, b in zip(args, in_batched)]), True

  return mapped


@functools.partial(jax.jit, static_argnames=("plan", "key_impl"))
def _run(inputs, k, key_data, plan, key_impl):
  # A jit around the partitioned call, so eager calls compile once per plan.
  estimator = _partitioned(inputs.ndim, key_data is not None)
  call = _one_by_one(lambda *args: estimator(*args, plan, key_impl))
  mesh = jax.typeof(inputs).sharding.mesh
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    # Explicit axes would put the sharding in the estimator's types, which a
    # loop over the batch cannot carry; the partitioner still sees it.
    call = jax.sharding.auto_axes(call, out_sharding=NamedSharding(mesh, P()))
  return call(inputs, k, key_data)


def _check_kernel_size(kernel_size: Any, rank: int) -> tuple[int, ...]:
  sizes = _geometry.as_sizes(kernel_size, rank, "kernel_size", minimum=1)
  if not isinstance(kernel_size, (Sequence, np.ndarray)):
    raise ValueError(
        f"kernel_size must give one size per spatial axis ({rank}), got "
        f"{kernel_size!r}."
    )
  if any(s % 2 == 0 for s in sizes):
    raise ValueError(
        f"kernel_size {sizes} has an even size: the dependence matrix needs "
        "a centre tap, so only odd kernel sizes are supported."
    )
  if max(sizes) < 3:
    raise ValueError(
        f"kernel_size {sizes} is not eligible: a window of one tap has no "
        "neighbourhood (at least one axis must be 3 or more)."
    )
  return sizes


def _concrete_k(k: Any) -> float:
  if isinstance(k, jax.core.Tracer):
    raise ValueError(
        "k must be a concrete number, got a traced value: under jax.jit pass "
        "it as a static argument, e.g. jax.jit(refresh_scalings, "
        "static_argnames=('k', 'diagonal_removal'))."
    )
  dtype = getattr(k, "dtype", None)
  number = isinstance(k, numbers.Real) or (
      dtype is not None and np.ndim(k) == 0
      and jnp.issubdtype(dtype, jnp.number))
  if isinstance(k, (bool, np.bool_)) or not number:
    raise ValueError(f"k must be a positive number, got {k!r}.")
  value = float(k)
  if not value > 0:  # NaN included
    raise ValueError(f"k must be positive, got {k!r}.")
  return value


def _concrete_flag(flag: Any, name: str) -> bool:
  if isinstance(flag, jax.core.Tracer):
    raise ValueError(
        f"{name} must be a concrete bool, got a traced value: under jax.jit "
        "pass it as a static argument, e.g. jax.jit(refresh_scalings, "
        "static_argnames=('k', 'diagonal_removal'))."
    )
  return bool(flag)


def _make_plan(
    shape: tuple[int, ...], kernel_size: Any, padding: Any, strides: Any,
    dilation: Any, padding_mode: str, diagonal_removal: bool,
    subsample: int | None,
) -> _Plan:
  """Checks the geometry and fixes every static quantity of the estimate."""
  if len(shape) not in (3, 4, 5):
    raise ValueError(
        "inputs must be channels-last (N, *spatial, C) with 1, 2 or 3 spatial "
        f"axes (rank 3, 4 or 5), got shape {shape}."
    )
  spatial = tuple(shape[1:-1])
  kernel_size = _check_kernel_size(kernel_size, len(spatial))
  dilation = _geometry.as_sizes(dilation, len(spatial), "dilation", minimum=1)
  pads, mode = _geometry.explicit_pads(
      padding, spatial_shape=spatial, kernel_size=kernel_size,
      strides=strides, dilation=dilation, padding_mode=padding_mode,
  )
  taps = _displacements(kernel_size)
  plan = _Plan(
      kernel_size, shape[0], spatial, pads, mode, taps,
      tuple(tuple(t * d for t, d in zip(tap, dilation)) for tap in taps),
      diagonal_removal, subsample,
  )
  if shape[0] * math.prod(plan.padded) > _MAX_SAMPLES:
    raise ValueError(
        f"{shape[0] * math.prod(plan.padded)} padded pixels per channel "
        "overflow int32 counts: pass fewer images."
    )
  if subsample is not None and not any(plan.sampled(j) for j in plan.live):
    # No displacement would be sampled: share the full-data compile.
    plan = plan._replace(subsample=None)
  return plan


def _check_subsample(subsample: Any, key: Any) -> None:
  if subsample is None:
    return
  if isinstance(subsample, (bool, np.bool_)) or not isinstance(
      subsample, (int, np.integer)
  ):
    raise ValueError(f"subsample must be an int or None, got {subsample!r}.")
  if subsample < 1:
    raise ValueError(f"subsample must be positive, got {subsample}.")
  if key is None:
    raise ValueError("subsample needs a PRNG key: pass key=.")


def _split_key(key: jax.Array | None) -> tuple[jax.Array | None, str | None]:
  """Raw key bits and the PRNG implementation's name, for any key."""
  if key is None:
    return None, None
  key = jnp.asarray(key)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw key: the default PRNG
  return jax.random.key_data(key), jax.random.key_impl(key)


def spatial_dependence(
    inputs: jax.Array,
    kernel_size: Sequence[int] = (3, 3),
    *,
    padding: _geometry.PaddingLike = "SAME",
    k: float = 5.0,
    diagonal_removal: bool = False,
    strides: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    padding_mode: str = "zeros",
    subsample: int | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
  r"""Channel-averaged spatial dependence of a conv layer's input.

  For each displacement ``u`` of the kernel window (one of each ``+/-`` pair,
  ``r = (k - 1) / 2`` taps each way per axis), ``X`` is every pixel of the
  padded input and ``Y`` its neighbour at ``i + u``, pooled over the batch
  and space per channel. The joint histogram has ``1 + ceil(log2(n))`` bins
  per axis (Sturges, ``n`` the displacement's pair count
  ``N * prod(P_a - |u_a|)`` on the padded map) over each variable's
  ``[min, max]`` with the max in the last bin; padding zeros are counted.
  With entropies in bits, ``NMI = (H_X + H_Y - H_XY) / H_XY`` is sharpened to
  ``k * NMI / ((k - 1) * NMI + 1)``, written at ``r + u`` and at its mirror
  ``r - u``, and averaged over channels skipping NaN. The centre is 1.

  Works for 1, 2 or 3 spatial axes. A window may be 1 along some axes (a
  ``(1, 3, 3)`` or ``(3, 1)`` kernel), which then have no displacement along
  them, but must be at least 3 along one; sizes must be odd. The statistics
  ignore ``strides`` (as the official code does), which only serve to compute
  ``"SAME"`` pads. With ``dilation`` the displacements are those of the
  dilated taps: entry ``r + u`` pairs pixels ``u * dilation`` apart, the
  pixels that tap actually sees relative to the centre tap.

  The cost is one scatter-add per pair, so it grows with the number of
  displacements (4 for 3x3, 84 for 13x13, 15 for a 31-tap 1-D window);
  tables are held for bounded groups of displacements, so memory does not.
  On inputs sharded over the batch (any mesh, automatic or explicit axes)
  each device counts its own images and only the count tables are reduced
  across devices; the result is the same as on one device.

  Call it eagerly (it is jitted inside) or under ``jax.jit`` with every
  argument but ``inputs`` and ``key`` static; ``k`` and ``diagonal_removal``
  must be concrete.

  Args:
    inputs: the conv's input, channels-last ``(N, *spatial, C)`` with 1, 2 or
      3 spatial axes, unpadded. Any float dtype; the statistics are computed
      in float32.
    kernel_size: odd sizes, one per spatial axis (for 2-D ``(kh, kw)``: rows
      of the result follow the H offsets, columns the W offsets).
    padding: the conv's own padding, resolved by the rules of
      ``sgs_optax._geometry.explicit_pads``: ``"SAME"``, ``"SAME_LOWER"`` or
      ``"VALID"`` (as lax pads the conv, with ``strides`` and the dilated
      kernel); Flax's ``"CIRCULAR"``, ``"REFLECT"`` (``((k_eff - 1) // 2,
      k_eff // 2)`` per axis, and the matching fill) or ``"CAUSAL"`` (1-D);
      an int, or an int or a ``(lo, hi)`` pair per spatial axis.
    k: the sharpening constant (5 in the paper), a concrete positive number.
    diagonal_removal: keep only pairs where both values are non-zero, bin them
      with a data-dependent Sturges count over their own ranges, and zero the
      diagonal of the joint histogram before the entropies. An entry with no
      pair left, or an undefined NMI, is 0.
    strides: the conv's strides (an int or one per axis); only used for
      ``"SAME"`` pads.
    dilation: the conv's kernel dilation (an int or one per axis).
    padding_mode: the fill of the padding: ``"zeros"``, ``"circular"``
      (wrap-around, as Flax ``CIRCULAR``) or ``"reflect"`` (as Flax
      ``REFLECT``). The padded values are part of the statistics.
    subsample: if an int, each displacement's histogram counts that many
      pairs drawn uniformly (with replacement) with ``key`` instead of all
      of them. Ranges and the bin count stay those of the full data, so only
      the counts are estimated, and the plug-in entropies of a sample are
      biased (the more so the more bins per pair): see
      ``benchmarks/mi_speed.py`` for the accuracy against speed. A
      displacement with fewer than ``4 * subsample`` pairs counts them all
      (faster than gathering the sample, and exact). ``None`` (the default)
      uses every pair.
    key: a JAX PRNG key, required with ``subsample``; the result is
      deterministic given the key, and the same on any number of devices.

  Returns:
    A float32 array of shape ``kernel_size`` with centre 1, symmetric under
    ``u -> -u``. An entry that is undefined for every channel (for example
    every channel constant, or a displacement with no pair) is NaN; any NaN
    or inf in ``inputs`` makes every entry NaN.

  Raises:
    ValueError: for inputs that are not rank 3, 4 or 5, a kernel size of the
      wrong length, even, or of one tap, a bad padding spec or padding mode,
      bad strides or dilation, a non-positive or traced ``k``, a traced
      ``diagonal_removal``, ``subsample`` without ``key``, or more than
      2**31 - 1 padded pixels per channel. Raised while tracing.

  Examples:
    >>> import jax
    >>> import sgs_optax
    >>> x = jax.nn.relu(jax.random.normal(jax.random.key(0), (8, 16, 16, 4)))
    >>> d = sgs_optax.spatial_dependence(x, (3, 3), padding="SAME")
    >>> d.shape, float(d[1, 1])
    ((3, 3), 1.0)
    >>> s = sgs_optax.dependence_to_scaling(d)  # mean 1: an SGS matrix
    >>> seq = jax.nn.relu(jax.random.normal(jax.random.key(1), (4, 64, 8)))
    >>> sgs_optax.spatial_dependence(seq, (5,), padding="CAUSAL").shape
    (5,)

  References:
    Detkov et al., `Reparameterization through Spatial Gradient Scaling
    <https://arxiv.org/abs/2303.02733>`_, ICLR 2023
  """
  if not jnp.issubdtype(jnp.result_type(inputs), jnp.floating):
    inputs = jnp.asarray(inputs, jnp.float32)
  k = _concrete_k(k)
  diagonal_removal = _concrete_flag(diagonal_removal, "diagonal_removal")
  _check_subsample(subsample, key)
  plan = _make_plan(
      tuple(jnp.shape(inputs)), kernel_size, padding, strides, dilation,
      padding_mode, diagonal_removal,
      None if subsample is None else int(subsample),
  )
  key_data, key_impl = _split_key(key if plan.subsample else None)
  return _run(inputs, jnp.float32(k), key_data, plan=plan, key_impl=key_impl)


def dependence_to_scaling(
    dependence: jax.Array, ndim: int | None = None
) -> jax.Array:
  """Normalises a dependence matrix to mean 1: ``S = D / mean(D)``.

  Args:
    dependence: a dependence array of a kernel's spatial shape, e.g. from
      :func:`spatial_dependence`, or a stack of them.
    ndim: how many trailing axes form one matrix (the kernel's spatial
      rank); ``None`` (the default) takes every axis as one matrix.

  Returns:
    The gradient scaling, same shape, mean 1 over each matrix. A NaN in a
    matrix gives NaN (callers keep their previous scaling then).

  Raises:
    ValueError: if ``dependence`` is a scalar or has fewer than ``ndim``
      axes, or ``ndim`` is not positive.

  References:
    Detkov et al., `Reparameterization through Spatial Gradient Scaling
    <https://arxiv.org/abs/2303.02733>`_, ICLR 2023
  """
  rank = jnp.ndim(dependence)
  ndim = rank if ndim is None else ndim
  if rank < 1 or not 1 <= ndim <= rank:
    raise ValueError(
        f"dependence of shape {jnp.shape(dependence)} has no {ndim} trailing "
        "kernel axes to normalise over."
    )
  axes = tuple(range(rank - ndim, rank))
  return dependence / jnp.mean(dependence, axis=axes, keepdims=True)
