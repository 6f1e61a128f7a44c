"""The static plan of a mutual-information estimate, and its argument checks.

Everything about a ``spatial_dependence`` call that the shapes alone fix is
worked out here, once, into a hashable :class:`Plan` (a jit static): the
displacements of the kernel window (one of each ``+/-`` pair, in the official
code's raster order) and their dilated pixel offsets, the conv's explicit
pads, each displacement's crop of the padded map and pair count, the Sturges
bin count of the static count buffer, which displacements a ``subsample``
draws from, and how the joint histograms are counted. The checks of the
arguments that fix it live here too, so that a bad argument is refused while
tracing, before anything is counted.

Example:
  >>> from sgs_optax import _mi_plan
  >>> plan = _mi_plan.make_plan(
  ...     (8, 16, 16, 4), (3, 3), padding="SAME", strides=1, dilation=1,
  ...     padding_mode="zeros", diagonal_removal=False, subsample=None)
  >>> plan.taps  # one of each +/- pair
  ((-1, -1), (-1, 0), (-1, 1), (0, -1))
  >>> plan.pads, plan.pairs(0), plan.buffer_bins
  (((1, 1), (1, 1)), 2312, 13)
"""

from __future__ import annotations

from collections.abc import Sequence
import itertools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgs_optax import _geometry

# Bin ids and per-cell counts are int32.
_MAX_SAMPLES = 2**31 - 1
# The ways ``_mi_counts`` can count joint histograms (``None``: by platform).
COUNTINGS = ("scatter", "matmul")
# A sampled pair (two gathered pixels) costs about as much as this many
# counted pairs of the full-data path: a displacement whose sample would be
# more than 1 / _GATHER_COST of its pairs counts them all instead, which is
# both faster and exact.
_GATHER_COST = 4


class Plan(NamedTuple):
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
  counting: str | None = None  # one of COUNTINGS, or None: by platform

  @property
  def padded(self) -> tuple[int, ...]:
    return tuple(s + lo + hi for s, (lo, hi) in zip(self.spatial, self.pads))

  def pairs(self, j: int) -> int:
    """Pairs of displacement ``j`` over the whole batch."""
    return self.batch * crop(self.offsets[j], self.padded)[2]

  @property
  def live(self) -> tuple[int, ...]:
    """Displacements with at least one pair (the others are undefined)."""
    return tuple(j for j in range(len(self.taps)) if self.pairs(j) > 0)

  @property
  def buffer_bins(self) -> int:
    """Bins of the static buffer: the most any live displacement needs."""
    return max([sturges(self.pairs(j)) for j in self.live], default=1)

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


def crop(
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


def sturges(n: int) -> int:
  # 1 + ceil(log2(n)) in exact integer arithmetic.
  return 1 + (n - 1).bit_length()


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


def concrete_k(k: Any) -> float:
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


def concrete_flag(flag: Any, name: str) -> bool:
  if isinstance(flag, jax.core.Tracer):
    raise ValueError(
        f"{name} must be a concrete bool, got a traced value: under jax.jit "
        "pass it as a static argument, e.g. jax.jit(refresh_scalings, "
        "static_argnames=('k', 'diagonal_removal'))."
    )
  return bool(flag)


def check_counting(counting: Any) -> str | None:
  """``counting`` itself, if it names a way of counting (or is None)."""
  if counting is not None and (
      not isinstance(counting, str) or counting not in COUNTINGS):
    choices = ", ".join(repr(c) for c in COUNTINGS)
    raise ValueError(
        f"counting must be one of {choices} or None (chosen by platform), "
        f"got {counting!r}."
    )
  return counting


def make_plan(
    shape: tuple[int, ...], kernel_size: Any, padding: Any, strides: Any,
    dilation: Any, padding_mode: str, diagonal_removal: bool,
    subsample: int | None, counting: str | None = None,
) -> Plan:
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
  plan = Plan(
      kernel_size, shape[0], spatial, pads, mode, taps,
      tuple(tuple(t * d for t, d in zip(tap, dilation)) for tap in taps),
      diagonal_removal, subsample, check_counting(counting),
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


def check_subsample(subsample: Any, key: Any) -> None:
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


def split_key(key: jax.Array | None) -> tuple[jax.Array | None, str | None]:
  """Raw key bits and the PRNG implementation's name, for any key."""
  if key is None:
    return None, None
  key = jnp.asarray(key)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw key: the default PRNG
  return jax.random.key_data(key), jax.random.key_impl(key)
