"""Spatial dependence of a conv layer's input, by normalised mutual information.

This is the statistic behind the SGS scaling refresh (steps 2-7 of the
algorithm): for every displacement inside the kernel window, the plug-in
mutual information between each input pixel and its displaced neighbour,
normalised, sharpened and averaged over channels. It is a jittable rewrite of
the official ``dependence.py``, for 1, 2 or 3 spatial axes, with the same bin
count and bin ranges and without its bugs (max-valued samples dropped under
NumPy >= 2, wrong column centre for non-square kernels, transposed padding).

Everything static about an estimate is fixed first, from the shapes
(``_mi_plan``); the estimate (``_estimate``) then runs in named steps:

1. Ranges of each displacement's pairs: ``_mi_counts.position_extrema``, then
   ``crop_ranges`` or, with diagonal removal, ``kept_ranges``.
2. Joint histograms, per displacement and channel: ``_mi_counts.count_group``,
   over the pairs that ``_mi_pairs`` walks chunk by chunk, without a padded
   copy of the batch, by scatter-adds or one-hot products (by platform).
3. ``_sharpened_nmi``: entropies in bits, NMI and its sharpening.
4. ``_assemble``: each value at its two mirrored taps, averaged over channels.

On feature maps sharded over the batch, every device counts its own images
and only the small per-displacement tables, ranges and pair counts cross
devices (``_partition``); the maps are never gathered. Speed against the
official NumPy loop is measured by ``benchmarks/mi_speed.py``. Bin edges are
evaluated in float32 (see ``_mi_counts``); the tests agree with a float64
NumPy reference to 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any

import jax
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from sgs_optax import _geometry
from sgs_optax import _mi_counts
from sgs_optax import _mi_plan


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


def _assemble(f: jax.Array, plan: _mi_plan.Plan) -> jax.Array:
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
    plan: _mi_plan.Plan, key_impl: str | None, axes: tuple[str, ...],
) -> jax.Array:
  """The dependence matrix, from this device's share of the batch.

  `axes` are the mesh axes the batch is split over (empty on one device):
  statistics are combined over them wherever they are reduced.
  """
  lo_map, hi_map, finite = _mi_counts.position_extrema(inputs, plan, axes)
  ranges = None
  if plan.live and plan.diagonal_removal:
    ranges = _mi_counts.kept_ranges(inputs, plan, axes)
  elif plan.live:
    ranges = _mi_counts.crop_ranges(lo_map, hi_map, plan, axes)
  key = None
  if key_data is not None:
    key = jax.random.wrap_key_data(key_data, impl=key_impl)
  f = [jnp.zeros((0, inputs.shape[-1]), jnp.float32)]
  for g, cells in enumerate(_mi_counts.groups(plan, inputs.shape[-1])):
    group_key = None if key is None else jax.random.fold_in(key, g)
    joint = _mi_counts.count_group(inputs, group_key, plan, ranges, cells, axes)
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
    counting: str | None = None,
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

  The cost is one count per pair, so it grows with the number of
  displacements (4 for 3x3, 84 for 13x13, 15 for a 31-tap 1-D window);
  tables are held for bounded groups of displacements, so memory does not.
  Counts are integer scatter-adds on CPU and products of one-hot bin
  indicators (``onehot(x_bins)^T @ onehot(y_bins)`` per channel, run on the
  matrix units) on GPU and TPU, chosen where the computation is compiled, so
  a call jitted onto a CPU device from a GPU host counts by scatter; both
  give the same integers, hence the same matrix, and ``counting`` forces
  one.
  On inputs sharded over the batch (any mesh, automatic or explicit axes)
  each device counts its own images and only the count tables are reduced
  across devices; the result is the same as on one device.

  Call it eagerly (it is jitted inside) or under ``jax.jit`` with every
  argument but ``inputs`` and ``key`` static; ``k``, ``diagonal_removal``
  and ``counting`` must be concrete.

  Args:
    inputs: the conv's input, channels-last ``(N, *spatial, C)`` with 1, 2 or
      3 spatial axes, unpadded. Any float dtype; the statistics are computed
      in float32.
    kernel_size: odd sizes, one per spatial axis (for 2-D ``(kh, kw)``: rows
      of the result follow the H offsets, columns the W offsets).
    padding: the conv's own padding, resolved as the conv resolves it:
      ``"SAME"``, ``"SAME_LOWER"`` or ``"VALID"`` (as lax pads the conv,
      with ``strides`` and the dilated kernel); Flax's ``"CIRCULAR"``,
      ``"REFLECT"`` (``((k_eff - 1) // 2, k_eff // 2)`` per axis, and the
      matching fill) or ``"CAUSAL"`` (1-D);
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
    counting: how the joint histograms are counted, a static string:
      ``"scatter"`` (integer scatter-adds in cache-sized chunks, fast on
      CPU), ``"matmul"`` (one-hot products in float32 at highest precision,
      each sum below 2**24 so exact, then int32; no scatter in the compiled
      program), or ``None`` (the default): scatter on CPU, matmul on GPU
      and TPU, picked by ``jax.lax.platform_dependent`` for the platform the
      computation is compiled for.

  Returns:
    A float32 array of shape ``kernel_size`` with centre 1, symmetric under
    ``u -> -u``. An entry that is undefined for every channel (for example
    every channel constant, or a displacement with no pair) is NaN; any NaN
    or inf in ``inputs`` makes every entry NaN.

  Raises:
    ValueError: for inputs that are not rank 3, 4 or 5, a kernel size of the
      wrong length, even, or of one tap, a bad padding spec or padding mode,
      bad strides or dilation, a non-positive or traced ``k``, a traced
      ``diagonal_removal``, ``subsample`` without ``key``, an unknown
      ``counting``, or more than 2**31 - 1 padded pixels per channel.
      Raised while tracing.

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
  k = _mi_plan.concrete_k(k)
  diagonal_removal = _mi_plan.concrete_flag(
      diagonal_removal, "diagonal_removal")
  _mi_plan.check_subsample(subsample, key)
  plan = _mi_plan.make_plan(
      tuple(jnp.shape(inputs)), kernel_size, padding, strides, dilation,
      padding_mode, diagonal_removal,
      None if subsample is None else int(subsample), counting,
  )
  key_data, key_impl = _mi_plan.split_key(key if plan.subsample else None)
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

  Examples:
    >>> import jax.numpy as jnp, sgs_optax
    >>> d = jnp.array([[1.0, 2.0, 1.0], [2.0, 6.0, 2.0], [1.0, 2.0, 1.0]])
    >>> sgs_optax.dependence_to_scaling(d)[1]
    Array([1., 3., 1.], dtype=float32)

    A stack of 1-D matrices, one per layer, each normalised on its own:

    >>> sgs_optax.dependence_to_scaling(jnp.array([[1.0, 3.0, 2.0],
    ...                                            [4.0, 4.0, 4.0]]), ndim=1)
    Array([[0.5, 1.5, 1. ],
           [1. , 1. , 1. ]], dtype=float32)

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
