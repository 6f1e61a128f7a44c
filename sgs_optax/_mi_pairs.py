"""Where the pixel pairs of each displacement are, without a padded batch.

The mutual information of a displacement ``u`` is counted over the pairs of a
pixel of the padded input (``x``) and its neighbour at ``+u`` (``y``). This
module finds those pairs for the counting steps of ``_mi_counts``:

- ``batch_chunks`` cuts the batch into static chunks, each padded on its own
  (``pad``), so that no padded copy of the whole batch is built;
- a ``Schedule`` says which displacements each loop step handles: all of them
  unrolled on one chunk for a small window, one at a time (a traced row
  number) for a large one, so that compile time stays flat;
- ``row_pairs`` gives a displacement's centre and neighbour pixels in a padded
  chunk, by an exact crop or, for a traced row, a shifted copy and a mask;
- ``locate`` finds the two pixels of pair number ``i`` of a displacement in
  the unpadded batch, for a random sample of pairs.

Example:
  >>> import jax.numpy as jnp
  >>> from sgs_optax import _mi_pairs, _mi_plan
  >>> plan = _mi_plan.make_plan(
  ...     (2, 4, 4, 1), (3, 3), padding="VALID", strides=1, dilation=1,
  ...     padding_mode="zeros", diagonal_removal=False, subsample=None)
  >>> plan.offsets[0]
  (-1, -1)
  >>> x = jnp.arange(32.0).reshape(2, 4, 4, 1)
  >>> xs, ys, _ = _mi_pairs.row_pairs(_mi_pairs.pad(x, plan), plan, 0)
  >>> xs.shape, float(xs[0, 0, 0, 0]), float(ys[0, 0, 0, 0])
  ((2, 3, 3, 1), 5.0, 0.0)
  >>> # Pair number 0 is the same pair, as rows of x.reshape(-1, 1).
  >>> where_x, where_y, here = _mi_pairs.locate(
  ...     jnp.array([0]), 0, plan, first=0, n_local=2)
  >>> int(where_x[0]), int(where_y[0]), bool(here[0])
  (5, 0, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgs_optax import _geometry
from sgs_optax import _mi_plan

# Windows with more displacements than this are counted in a loop over them
# rather than unrolled, so that compile time stays flat as windows grow.
UNROLLED_ROWS = 8


class Chunks(NamedTuple):
  """The local batch in static chunks, so per-chunk buffers stay small.

  ``get(i)`` gives chunk ``i`` as float32 and a mask of its images that no
  earlier chunk covered: the last chunk is shifted back to stay in bounds and
  its repeated images are masked out, and chunk ``num`` is entirely masked
  out (the pipelined count reads one chunk past the end).
  """

  size: int
  num: int
  get: Callable[[Any], tuple[jax.Array, jax.Array]]


def batch_chunks(
    x: jax.Array, padded: Sequence[int], elements: int
) -> Chunks:
  n = x.shape[0]
  row = math.prod(padded) * x.shape[-1]
  size = int(min(n, max(1, elements // max(row, 1))))

  def get(i):
    start = i * size
    shifted = jnp.minimum(start, n - size)
    chunk = jax.lax.dynamic_slice_in_dim(x, shifted, size, axis=0)
    fresh = shifted + jnp.arange(size) >= start
    return chunk.astype(jnp.float32), fresh

  return Chunks(size, -(-n // size), get)


def pad(chunk: jax.Array, plan: _mi_plan.Plan) -> jax.Array:
  return jnp.pad(
      chunk, ((0, 0), *plan.pads, (0, 0)),
      mode=_geometry.JNP_PAD_MODES[plan.mode]
  )


def take(table: Any, row: Any) -> Any:
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


def live_crops(plan: _mi_plan.Plan) -> np.ndarray:
  """Per live displacement and axis: x start, y start and crop length."""
  table = np.zeros((len(plan.live), 3, len(plan.spatial)), np.int32)
  for row, j in enumerate(plan.live):
    x, y, _ = _mi_plan.crop(plan.offsets[j], plan.padded)
    table[row] = [[s.start for s in x], [s.start for s in y],
                  [s.stop - s.start for s in x]]
  return table


class Schedule(NamedTuple):
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
    return len(self.rows) <= UNROLLED_ROWS

  @property
  def num(self) -> int:
    return self.blocks * (1 if self.unrolled else len(self.rows))

  def at(self, i: Any) -> tuple[Any, list[tuple[Any, Any]]]:
    """Block of step `i` and its (position in `rows`, row) pairs."""
    if self.unrolled:
      return i, list(enumerate(self.rows))
    slot = jnp.minimum(i // self.blocks, len(self.rows) - 1)
    block = jnp.where(i < self.num, i % self.blocks, self.blocks)
    return block, [(slot, take(self.rows, slot))]


def row_pairs(
    xp: jax.Array, plan: _mi_plan.Plan, row: Any
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Centre and neighbour pixels of live displacement `row` in a padded chunk.

  Returns them and a mask of the real pairs (None: all are). A static row is
  cropped exactly; a traced one pairs the whole map with a shifted copy and
  masks the pairs whose neighbour falls off the map.
  """
  everything = slice(None)
  if isinstance(row, int):
    x, y, _ = _mi_plan.crop(plan.offsets[plan.live[row]], plan.padded)
    return (xp[(everything, *x, everything)],
            xp[(everything, *y, everything)], None)
  offset = take(np.asarray([plan.offsets[j] for j in plan.live]), row)
  # Row-major: the neighbour of flat position q is q + delta wherever the
  # pair is real; elsewhere the index is clipped and the pair masked.
  delta = jnp.sum(offset * np.cumprod((1, *plan.padded[:0:-1]))[::-1])
  flat = xp.reshape(-1, xp.shape[-1])
  source = jnp.arange(flat.shape[0]) + delta
  ys = jnp.take(flat, source, axis=0, mode="clip").reshape(xp.shape)
  valid = True
  for axis, size in enumerate(plan.padded):
    t = jax.lax.broadcasted_iota(jnp.int32, (1, *plan.padded, 1), axis + 1)
    valid = valid & (t + offset[axis] >= 0) & (t + offset[axis] < size)
  return xp, ys, valid


def fresh_mask(fresh: jax.Array, like: jax.Array) -> jax.Array:
  return fresh.reshape((-1,) + (1,) * (like.ndim - 1))


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


def locate(
    pos: jax.Array, row: Any, plan: _mi_plan.Plan, first: Any, n_local: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Flat local rows of the x and y pixels of pair number `pos` of live row
  `row`, and whether the pair's image is on this device. A flat row of -1 is
  a zero of the padding."""
  x_start, y_start, length = take(live_crops(plan), row)
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
