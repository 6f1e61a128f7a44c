"""Bin ranges and joint histograms of each displacement's pairs.

The counting half of the estimate, in two steps:

1. Ranges. ``position_extrema`` takes the batch's min and max at every
   position (one pass over the data), from which ``crop_ranges`` reads each
   displacement's ``[min, max]`` ranges; with diagonal removal
   ``kept_ranges`` takes them (and the data-dependent bin counts) from the
   kept pairs instead.
2. Counts. ``count_group`` counts joint histograms, per displacement and
   channel, into a static buffer of ``B`` x ``B`` cells, over the batch in
   chunks (``_count_pairs``) or over a random sample of pairs
   (``_count_sample``); ``groups`` splits a large window's displacements so
   that the tables held at once stay bounded. No ``N x B`` intermediate and
   no padded copy of the batch is built (the pairs are walked by
   ``_mi_pairs``).

The counts come in two forms that give the same integers, fed by the same
chunk walk and the same binning rule (``_pair_bins``): ``"scatter"``, integer
scatter-adds in cache-sized chunks, fast on CPU; and ``"matmul"``, per channel
the product ``onehot(ix)^T @ onehot(iy)`` of the pairs' bin indicators, which
runs on the matrix units of GPUs and TPUs, where scatters into a few hundred
cells serialise. ``Plan.counting`` names one; ``None`` lets
``jax.lax.platform_dependent`` pick where the computation is compiled.

Both steps reduce what they find over ``axes``, the mesh axes the batch is
split on: only ranges, pair counts and tables cross devices.

Bin edges are evaluated in float32, NumPy's in float64: a sample lying within
float32 rounding of an edge can land in the neighbouring bin, which moves an
entry by O(1 / pairs). The tests agree with a float64 NumPy reference to 1e-4.

Example:
  >>> from sgs_optax import _mi_counts, _mi_plan
  >>> import jax.numpy as jnp
  >>> x = jnp.arange(5.0).reshape(1, 5, 1)  # one image, one channel
  >>> plan = _mi_plan.make_plan(
  ...     x.shape, (3,), padding="VALID", strides=1, dilation=1,
  ...     padding_mode="zeros", diagonal_removal=False, subsample=None)
  >>> lo, hi, finite = _mi_counts.position_extrema(x, plan, axes=())
  >>> ranges = _mi_counts.crop_ranges(lo, hi, plan, axes=())
  >>> [cells] = _mi_counts.groups(plan, channels=1)
  >>> joint = _mi_counts.count_group(x, None, plan, ranges, cells, axes=())
  >>> # Pairs (1, 0), (2, 1), (3, 2), (4, 3) in 3 bins over [1, 4] x [0, 3]:
  >>> # each maximum lands in the last bin.
  >>> joint[0, 0]
  Array([[1, 0, 0],
         [0, 1, 0],
         [0, 0, 2]], dtype=int32)
  >>> by_matmul = _mi_counts.count_group(
  ...     x, None, plan._replace(counting="matmul"), ranges, cells, axes=())
  >>> bool((by_matmul == joint).all())
  True
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgs_optax import _geometry
from sgs_optax import _mi_pairs
from sgs_optax import _mi_plan

# Scatter form: elements of a padded batch chunk, large enough to amortise
# the loop, small enough for the chunk and the bin ids of four displacements
# to stay in a typical L2 cache. Chunks shrink for larger groups of
# displacements.
_CHUNK_ELEMENTS = 1 << 15
# Matmul form: elements of the one-hot indicators of one loop step, per side
# (float32: 64 MiB), so that memory stays bounded whatever the batch while
# each step's products are large enough to amortise an accelerator's kernel
# launches (a guess until measured on one: a tuning constant).
_ONEHOT_ELEMENTS = 1 << 24
# Matmul form: pairs summed in float32 at once, exact below 2**24.
_EXACT_PAIRS = 1 << 24
# Count tables (and sampled pair positions) are held for at most this many
# int32 cells at once: large windows are counted in groups of displacements,
# so that memory stays bounded whatever the window.
_GROUP_CELLS = 1 << 24


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


def _combine_row(
    table: jax.Array, row: Any, value: jax.Array,
    op: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
  """`table` with row `row` (static or traced) replaced by `op(row, value)`.

  A row slice and its update, not an indexed update: that would be a scatter,
  which the matmul form keeps out of the compiled program.
  """
  old = jax.lax.dynamic_index_in_dim(table, row, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(table, op(old, value), row, 0)


class _Ranges(NamedTuple):
  """Per live displacement (rows) and channel: bins of x and y."""

  lo: jax.Array  # (L, 2, C): the x and y minima
  scale: jax.Array  # (L, 2, C): bins / (max - min)
  bins: Any  # (L,) static ints, or (L, C) traced counts


def position_extrema(
    inputs: jax.Array, plan: _mi_plan.Plan, axes: tuple[str, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Padded maps of the batch's min and max at each position, and finiteness.

  The extrema are taken unpadded (padding only copies or zeroes positions, so
  it commutes with them), with elementwise accumulators over chunks: a
  reduction over the leading axis is slow on CPU.
  """
  chunks = _mi_pairs.batch_chunks(inputs, plan.spatial, _CHUNK_ELEMENTS)

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
  mode = _geometry.JNP_PAD_MODES[plan.mode]
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


def crop_ranges(
    lo_map: jax.Array, hi_map: jax.Array, plan: _mi_plan.Plan,
    axes: tuple[str, ...],
) -> _Ranges:
  """Bins over each crop's [min, max], with the static Sturges count."""
  table = _mi_pairs.live_crops(plan)
  index = [np.stack([x, y], axis=1) for x, y in zip(
      _corners(table[:, 0], table[:, 2]), _corners(table[:, 1], table[:, 2]))]
  lo = jnp.stack(_running(lo_map, jax.lax.cummin))[tuple(index)]
  hi = jnp.stack(_running(hi_map, jax.lax.cummax))[tuple(index)]
  lo = _all_reduce(lo, jax.lax.pmin, axes)  # (L, 2, C)
  hi = _all_reduce(hi, jax.lax.pmax, axes)
  bins = tuple(_mi_plan.sturges(plan.pairs(j)) for j in plan.live)
  scale = _bin_scale(lo, hi, np.asarray(bins, np.float32)[:, None, None])
  return _Ranges(lo, scale, bins)


def kept_ranges(
    inputs: jax.Array, plan: _mi_plan.Plan, axes: tuple[str, ...]
) -> _Ranges:
  """Diagonal removal: ranges and traced Sturges counts of the kept pairs.

  A pair is kept when both its values are non-zero; how many are kept, hence
  the bin count, depends on the data, and every device's share counts.
  """
  chunks = _mi_pairs.batch_chunks(inputs, plan.padded, _CHUNK_ELEMENTS)
  schedule = _mi_pairs.Schedule(tuple(range(len(plan.live))), chunks.num)

  def body(i, carry):
    kept, lo, hi = carry
    block, steps = schedule.at(i)
    chunk, fresh = chunks.get(block)
    xp = _mi_pairs.pad(chunk, plan)
    for _, row in steps:
      xs, ys, valid = _mi_pairs.row_pairs(xp, plan, row)
      keep = (xs != 0) & (ys != 0) & _mi_pairs.fresh_mask(fresh, xs)
      keep = keep if valid is None else keep & valid
      over = tuple(range(keep.ndim - 1))
      low = [jnp.min(jnp.where(keep, v, jnp.inf), over) for v in (xs, ys)]
      high = [jnp.max(jnp.where(keep, v, -jnp.inf), over) for v in (xs, ys)]
      kept = _combine_row(kept, row, _count_true(keep, over), jnp.add)
      lo = _combine_row(lo, row, jnp.stack(low), jnp.minimum)
      hi = _combine_row(hi, row, jnp.stack(high), jnp.maximum)
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

  ``buffer_bins`` x ``buffer_bins`` cells per row and channel, ``stride``
  cells apart, then one discard cell per channel for the pairs that are not
  counted.
  """

  start: int  # first live row of the group
  rows: int
  channels: int
  buffer_bins: int
  stride: int

  @property
  def size(self) -> int:
    return self.rows * self.channels * self.stride

  def discard_cells(self) -> jax.Array:
    # One discard cell per channel: a single one would chain every dropped add
    # on one address.
    return self.size + jnp.arange(self.channels, dtype=jnp.int32)


def _channel_stride(buffer_bins: int) -> int:
  """Cells between two channels' tables: whole 64-byte lines, an odd count.

  A power-of-two stride (16 x 16 bins is 1 KiB) maps every channel's busiest
  cell to the same few L1 sets; an odd number of lines spreads them over all.
  """
  lines = -(-buffer_bins * buffer_bins // 16)
  return 16 * (lines | 1)


def groups(plan: _mi_plan.Plan, channels: int) -> list[_Cells]:
  """Live displacements split so each group's tables stay bounded."""
  live, buffer_bins = len(plan.live), plan.buffer_bins
  stride = _channel_stride(buffer_bins)
  # Per row: its tables, and its sampled pair positions if any.
  size = max(1, _GROUP_CELLS // (channels * stride + (plan.subsample or 0)))
  return [_Cells(start, min(size, live - start), channels, buffer_bins,
                 stride)
          for start in range(0, live, size)]


class _PairBins(NamedTuple):
  """The bins of the pairs that one loop step counts for one group row."""

  row: Any  # group row: a static int, or traced in a loop over rows
  ix: jax.Array  # (..., C) int32: bin of each centre pixel
  iy: jax.Array  # (..., C) int32: bin of its neighbour
  keep: jax.Array  # bool, broadcastable to `ix`: whether the pair counts


# A step's bins: one _PairBins per group row the step handles.
_StepBins = Callable[[Any], list[_PairBins]]


def _pair_bins(
    cells: _Cells, ranges: _Ranges, row: Any, xs: jax.Array, ys: jax.Array,
    keep: jax.Array, diagonal_removal: bool,
) -> _PairBins:
  """Bins of the pairs of group row `row`: the one binning rule of both forms.

  With diagonal removal, a pair with a zero pixel is not kept.
  """
  if diagonal_removal:
    keep = keep & (xs != 0) & (ys != 0)
  live_row = cells.start + row
  lo = _mi_pairs.take(ranges.lo, live_row)
  scale = _mi_pairs.take(ranges.scale, live_row)
  bins = _mi_pairs.take(ranges.bins, live_row)
  ix = _bin_index(xs, lo[0], scale[0], bins)
  iy = _bin_index(ys, lo[1], scale[1], bins)
  return _PairBins(row, ix, iy, keep)


def _cell_ids(cells: _Cells, pairs: _PairBins) -> jax.Array:
  """Flat table cell of each kept pair; the others go to discard cells."""
  base = jnp.arange(cells.channels, dtype=jnp.int32) * cells.stride
  ids = (pairs.row * (cells.channels * cells.stride) + base
         + pairs.ix * cells.buffer_bins + pairs.iy)
  return jnp.where(pairs.keep, ids, cells.discard_cells())


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
    discard: jax.Array,
) -> jax.Array:
  """Counts `make_ids(i)` for i in [0, num_steps) into `tables`.

  Software-pipelined: step i scatters the ids that step i - 1 left in the loop
  carry. On CPU, ids computed in the same step as their scatter get fused
  behind a flattening copy that compiles to slow scalar code. The carry starts
  at the `discard` cells (broadcast along the last, channel, axis) and
  `make_ids(num_steps)` must send everything there, so there is no prologue
  or epilogue to compile twice.
  """
  def step_ids(i):
    # The trailing index-vector axis is added here, in the producing fusion,
    # so that no layout-changing copy is needed before the scatter.
    return [ids[..., None] for ids in make_ids(i)]

  shapes = jax.eval_shape(step_ids, 0)
  pending = [
      jnp.broadcast_to(discard[:, None], sd.shape).astype(jnp.int32)
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


def _scatter_tables(cells: _Cells) -> jax.Array:
  # Every table of the group in one flat buffer, then the discard cells.
  return jnp.zeros((cells.size + cells.channels,), jnp.int32)


def _scatter_walk(
    tables: jax.Array, cells: _Cells, num_steps: int, step_bins: _StepBins
) -> jax.Array:
  make_ids = lambda i: [_cell_ids(cells, pairs) for pairs in step_bins(i)]
  return _pipelined_counts(tables, num_steps, make_ids, cells.discard_cells())


def _scatter_joint(tables: jax.Array, cells: _Cells) -> jax.Array:
  joint = tables[:cells.size].reshape(cells.rows, cells.channels, cells.stride)
  n = cells.buffer_bins
  joint = joint[..., :n * n]
  return joint.reshape(cells.rows, cells.channels, n, n)


def _scatter_elements(cells: _Cells, per_step: int) -> int:
  # The ids of all rows a step handles stay about as small as those of four
  # rows in a chunk, in cache.
  del cells
  return _CHUNK_ELEMENTS * 4 // max(per_step, 4)


def _onehot_counts(cells: _Cells, pairs: _PairBins) -> jax.Array:
  """Joint histograms of one step's pairs as one-hot products: (C, B, B).

  Per channel, ``onehot(ix)^T @ onehot(iy)`` counts every pair in its cell.
  A pair that is not kept has an all-zero indicator row, so it adds nothing
  anywhere. The products are summed in float32, which is exact for integers
  up to 2**24, so the pairs are cut into pieces of at most that many; the
  pieces' counts are summed in int32.
  """
  c, buffer_bins = cells.channels, cells.buffer_bins
  keep = jnp.broadcast_to(pairs.keep, pairs.ix.shape)
  # Channels lead: they are the batch axis of the product.
  ix, iy, keep = (a.reshape(-1, c).T for a in (pairs.ix, pairs.iy, keep))
  n = ix.shape[1]
  pieces = -(-n // _EXACT_PAIRS)
  extra = pieces * -(-n // pieces) - n
  if extra:  # padding pairs are not kept
    ix, iy, keep = (jnp.pad(a, ((0, 0), (0, extra))) for a in (ix, iy, keep))
  ix, iy, keep = (a.reshape(c, pieces, -1) for a in (ix, iy, keep))
  bins = jnp.arange(buffer_bins, dtype=jnp.int32)
  on_x = jnp.where(keep[..., None] & (ix[..., None] == bins), 1.0, 0.0)
  on_y = jnp.where(iy[..., None] == bins, 1.0, 0.0)
  # Highest precision: a TPU's default bf16 passes would round the sums.
  counts = jax.lax.dot_general(
      on_x, on_y, (((2,), (2,)), ((0, 1), (0, 1))),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32)  # (C, pieces, B, B)
  return jnp.sum(counts.astype(jnp.int32), axis=1)


def _matmul_tables(cells: _Cells) -> jax.Array:
  n = cells.buffer_bins
  return jnp.zeros((cells.rows, cells.channels, n, n), jnp.int32)


def _matmul_walk(
    tables: jax.Array, cells: _Cells, num_steps: int, step_bins: _StepBins
) -> jax.Array:
  def body(i, tables):
    for pairs in step_bins(i):
      tables = _combine_row(tables, pairs.row, _onehot_counts(cells, pairs),
                            jnp.add)
    return tables

  return jax.lax.fori_loop(0, num_steps, body, tables)


def _matmul_elements(cells: _Cells, per_step: int) -> int:
  # The one-hot indicators of a step hold B times its pixels.
  return max(1, _ONEHOT_ELEMENTS // (cells.buffer_bins * max(per_step, 1)))


class _Form(NamedTuple):
  """One way of counting joint histograms: int32 tables of a group's rows."""

  tables: Callable[[_Cells], jax.Array]  # empty tables
  walk: Callable[[jax.Array, _Cells, int, _StepBins], jax.Array]
  joint: Callable[[jax.Array, _Cells], jax.Array]  # as (G, C, B, B)
  elements: Callable[[_Cells, int], int]  # input elements per step


_FORMS = {
    "scatter": _Form(_scatter_tables, _scatter_walk, _scatter_joint,
                     _scatter_elements),
    "matmul": _Form(_matmul_tables, _matmul_walk, lambda t, _: t,
                    _matmul_elements),
}
assert tuple(_FORMS) == _mi_plan.COUNTINGS


def _rows_per_step(rows: list[int]) -> int:
  return len(rows) if len(rows) <= _mi_pairs.UNROLLED_ROWS else 1


def _count_pairs(
    tables: jax.Array, form: _Form, inputs: jax.Array, plan: _mi_plan.Plan,
    ranges: _Ranges, cells: _Cells, rows: list[int],
) -> jax.Array:
  """Counts every pair of the given group rows, chunk by chunk."""
  elements = form.elements(cells, _rows_per_step(rows))
  chunks = _mi_pairs.batch_chunks(inputs, plan.padded, elements)
  schedule = _mi_pairs.Schedule(tuple(rows), chunks.num)

  def step_bins(i):
    block, steps = schedule.at(i)
    chunk, fresh = chunks.get(block)
    xp = _mi_pairs.pad(chunk, plan)
    bins = []
    for _, row in steps:
      xs, ys, valid = _mi_pairs.row_pairs(xp, plan, cells.start + row)
      keep = _mi_pairs.fresh_mask(fresh, xs)
      keep = keep if valid is None else keep & valid
      bins.append(_pair_bins(cells, ranges, row, xs, ys, keep,
                             plan.diagonal_removal))
    return bins

  return form.walk(tables, cells, schedule.num, step_bins)


def _count_sample(
    tables: jax.Array, form: _Form, inputs: jax.Array, key: jax.Array,
    plan: _mi_plan.Plan, ranges: _Ranges, cells: _Cells, rows: list[int],
    first: Any,
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
  elements = form.elements(cells, _rows_per_step(rows))
  step = int(min(m, max(1, elements // c)))
  schedule = _mi_pairs.Schedule(tuple(rows), -(-m // step))

  def pixels(flat):
    vals = jnp.take(flat_rows, jnp.maximum(flat, 0), axis=0, mode="clip")
    return jnp.where((flat >= 0)[:, None], vals.astype(jnp.float32), 0.0)

  def step_bins(i):
    block, steps = schedule.at(i)
    shifted = jnp.minimum(block * step, m - step)
    fresh = (shifted + jnp.arange(step) >= block * step)[:, None]
    bins = []
    for slot, row in steps:
      pos = jax.lax.dynamic_slice_in_dim(positions[slot], shifted, step)
      where_x, where_y, here = _mi_pairs.locate(
          pos, cells.start + row, plan, first, inputs.shape[0])
      xs, ys = pixels(where_x), pixels(where_y)
      bins.append(_pair_bins(cells, ranges, row, xs, ys,
                             fresh & here[:, None], plan.diagonal_removal))
    return bins

  return form.walk(tables, cells, schedule.num, step_bins)


def _local_joint(
    counting: str, inputs: jax.Array, key: jax.Array | None,
    plan: _mi_plan.Plan, ranges: _Ranges, cells: _Cells, first: Any,
) -> jax.Array:
  """This device's joint histograms of a group, counted by `counting`."""
  form = _FORMS[counting]
  rows = range(cells.rows)
  sampled = [r for r in rows if plan.sampled(plan.live[cells.start + r])]
  full = [r for r in rows if r not in sampled]
  tables = form.tables(cells)
  if full:
    tables = _count_pairs(tables, form, inputs, plan, ranges, cells, full)
  if sampled:
    tables = _count_sample(tables, form, inputs, key, plan, ranges, cells,
                           sampled, first)
  return form.joint(tables, cells)


def count_group(
    inputs: jax.Array, key: jax.Array | None, plan: _mi_plan.Plan,
    ranges: _Ranges, cells: _Cells, axes: tuple[str, ...],
) -> jax.Array:
  """Joint histograms of one group of displacements: (G, C, B, B), B bins.

  Counted as ``plan.counting`` says; ``None`` picks by the platform the
  computation is compiled for: scatter-adds on CPU, one-hot products on GPU
  and TPU, where scatters into few cells serialise.
  """
  first = 0
  if axes and any(plan.sampled(plan.live[cells.start + r])
                  for r in range(cells.rows)):
    first = jax.lax.axis_index(axes) * inputs.shape[0]
  local = lambda counting: _local_joint(
      counting, inputs, key, plan, ranges, cells, first)
  if plan.counting is None:
    joint = jax.lax.platform_dependent(
        cpu=lambda: local("scatter"), default=lambda: local("matmul"))
  else:
    joint = local(plan.counting)
  # The tables, not the maps, cross devices.
  return _all_reduce(joint, jax.lax.psum, axes)
