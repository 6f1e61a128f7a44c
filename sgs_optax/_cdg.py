"""Channel-Directed Gradients: a smoothing metric along output channels.

Lao et al. (2020) take a conv kernel's gradient with respect to a metric ``G``
that couples neighbouring *output channels*. Every fibre ``g`` of the gradient
along the output-channel axis becomes ``G^{-1} g``. The metrics and the three
ways to apply them (``"fft"``, ``"dense"``, ``"tridiagonal"``) live in
:mod:`sgs_optax._cdg_solvers`, one table each; this module chooses a
solver, keeps shardings and maps the transform over the params. The paper's
exact formulas could not be read when this was written; the metrics are the
ones derived in the package's specification from its description.

Which solver: ``solver=None`` chooses where the update is compiled, with
:func:`jax.lax.platform_dependent` (a Python check of the default backend
would be wrong for an update jitted onto another device): on CPU the
tridiagonal solve for ``sobolev`` (unless the width is, e.g., a large prime)
and the FFT otherwise (side-by-side timings in ``benchmarks/cdg_overhead.py``);
on GPU and TPU the dense operator, one matrix product per kernel, until a
device run measures otherwise.

Sharding: every solver needs whole fibres. When the output-channel axis of a
kernel is sharded over a mesh, each device's block is flattened to fibres and
an all-to-all swaps the sharding from the channel axis to the fibre axis (as
distributed FFTs do), the fibres are solved locally, and a second all-to-all
swaps back; see :func:`_swap_and_solve`. The sharding comes from the array's
type under explicit sharding and from XLA's partitioner (through
:func:`jax.experimental.custom_partitioning`) under automatic sharding.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from sgs_optax import _cdg_solvers as solvers
from sgs_optax._cdg_solvers import BOUNDARIES
from sgs_optax._cdg_solvers import METRICS
from sgs_optax._frameworks import plain_arrays
from sgs_optax._kernels import check_plausible
from sgs_optax._kernels import check_selects_a_leaf
from sgs_optax._kernels import KernelLayoutSpec
from sgs_optax._kernels import Layout
from sgs_optax._kernels import map_layouts
from sgs_optax._kernels import parse_layout
from sgs_optax._kernels import resolve_layouts

SOLVERS = tuple(solvers.SOLVERS)

# The default `smoothing` of each metric (see `_cdg_solvers.METRICS`).
DEFAULT_SMOOTHING = {
    name: metric.default_smoothing for name, metric in METRICS.items()
}


# Above this many multiply-adds per channel (widths like a large prime, whose
# blocks degenerate into a dense product), "tridiagonal" is not used by
# default. Widths with a divisor near sqrt(n) cost 10 to 40.
_MOST_TRIDIAGONAL_COST = 50


def _cpu_solver(metric: str, n: int) -> str:
  """``solver=None`` on CPU: the fastest exact solver, as measured."""
  if (solvers.metric_of(metric).tridiagonal
      and solvers.tridiagonal_cost(n) <= _MOST_TRIDIAGONAL_COST):
    return "tridiagonal"
  return "fft"


def _swap_and_solve(
    block: jax.Array,
    operands: tuple[jax.Array, ...],
    channel_axes: str | tuple[str, ...] | None,
    solver: str,
    boundary: str,
) -> jax.Array:
  """Solves one device's block of a kernel whose last axis is channels.

  Args:
    block: this device's block; the channel axis is last.
    operands: the solver's operands (``Solver.operands``), replicated.
    channel_axes: the mesh axes that shard the channel axis, or ``None``
      when every device holds whole fibres.
    solver: a name in :data:`SOLVERS`.
    boundary: one of :data:`BOUNDARIES`.

  Returns:
    The transformed block, same shape.
  """
  # 2-D rows: XLA's CPU FFT rejects some layouts of a >2-D operand.
  rows = block.reshape(-1, block.shape[-1])
  count = rows.shape[0]
  if channel_axes:
    # Split the fibres, gather the channels: whole fibres, sharded fibre
    # axis. Zero fibres pad the count to a multiple of the devices (a stem
    # or depthwise kernel has too few); they transform to zero.
    devices = jax.lax.axis_size(channel_axes)
    rows = jnp.pad(rows, ((0, -count % devices), (0, 0)))
    rows = jax.lax.all_to_all(rows, channel_axes, 0, 1, tiled=True)
  rows = solvers.SOLVERS[solver].rows(rows, operands, boundary)
  if channel_axes:
    rows = jax.lax.all_to_all(rows, channel_axes, 1, 0, tiled=True)[:count]
  return rows.reshape(block.shape)


def _full_spec(spec: P, ndim: int) -> tuple:
  return (*spec, *([None] * (ndim - len(spec))))


def _partition(solver, boundary, mesh, arg_shapes, result_shape):
  """custom_partitioning's rule: keep the sharding, swap if channels split."""
  del result_shape
  x = arg_shapes[0]
  spec = _full_spec(x.sharding.spec, len(x.shape))
  channel_axes = spec[-1]
  if channel_axes:
    names = (channel_axes,) if isinstance(channel_axes, str) else channel_axes
    if x.shape[-1] % np.prod([mesh.shape[a] for a in names]):
      # Uneven shards carry XLA's padding, which a solve would mix into the
      # channels: gather the channel axis instead.
      spec, channel_axes = (*spec[:-1], None), None
  sharding = NamedSharding(mesh, P(*spec))
  lower = functools.partial(_spread_operands, channel_axes=channel_axes,
                            solver=solver, boundary=boundary)
  replicated = (NamedSharding(mesh, P()),) * (len(arg_shapes) - 1)
  return mesh, lower, sharding, (sharding, *replicated)


def _spread_operands(x: jax.Array, *operands: jax.Array, **kwargs):
  """:func:`_swap_and_solve` with the operands as separate arguments."""
  return _swap_and_solve(x, operands, **kwargs)


@functools.cache
def _auto_partitioned_solve(ndim: int, count: int, solver: str,
                            boundary: str):
  """``_swap_and_solve`` for ``ndim``-D ``x`` and ``count`` operands.

  Returns ``solve(x, operands)``, partitioned by XLA, that also works under
  ``jax.vmap`` and differentiation, which ``custom_partitioning`` alone does
  not support.
  """
  plain = functools.partial(_swap_and_solve, channel_axes=None,
                            solver=solver, boundary=boundary)
  # Must not close over array constants (custom_partitioning rejects them):
  # the solver's matrices are operands, each a replicated 2-D array.
  partitioned = custom_partitioning(functools.partial(
      _spread_operands, channel_axes=None, solver=solver, boundary=boundary))
  factors = " ".join(f"a{i}" for i in range(ndim))
  replicated = [(f"c{k}", f"m{k}") for k in range(count)]
  partitioned.def_partition(
      functools.partial(_partition, solver, boundary),
      infer_sharding_from_operands=lambda mesh, args, res: args[0].sharding,
      sharding_rule=(f"{factors}, " + ", ".join(" ".join(f) for f in replicated)
                     + f" -> {factors}"),
      need_replication_factors=tuple(f for pair in replicated for f in pair),
  )
  batchable = jax.custom_batching.custom_vmap(
      lambda x, m: partitioned(x, *m))

  @batchable.def_vmap
  def _(axis_size, in_batched, x, m):
    if any(jax.tree.leaves(in_batched[1])):  # A batched smoothing: rare.
      x = x if in_batched[0] else jnp.broadcast_to(x, (axis_size, *x.shape))
      m_axes = tuple(0 if b else None for b in in_batched[1])
      return jax.vmap(plain, in_axes=(0, m_axes))(x, m), True
    # The batch axis leads: one more fibre axis.
    return _auto_partitioned_solve(ndim + 1, count, solver, boundary)(
        x, m), True

  solve = jax.custom_jvp(lambda x, m: batchable(x, m))

  @solve.defjvp
  def _(primals, tangents):
    # The tangent (only under differentiation through the optimizer) is the
    # unpartitioned solve's own, left to XLA's partitioning.
    return batchable(*primals), jax.jvp(plain, primals, tangents)[1]

  return solve


def _sharded_solve(
    x: jax.Array, operands: tuple[jax.Array, ...], solver: str, boundary: str
) -> jax.Array:
  """Runs :func:`_swap_and_solve` on ``x`` (channels last) where it lives."""
  sharding = jax.typeof(x).sharding
  spec = _full_spec(getattr(sharding, "spec", P()), x.ndim)
  if not any(spec):
    # Replicated, or automatic sharding (invisible while tracing): the
    # partitioner reports it to `_partition`.
    solve = _auto_partitioned_solve(x.ndim, len(operands), solver, boundary)
    return solve(x, operands)
  local = functools.partial(_swap_and_solve, channel_axes=spec[-1],
                            solver=solver, boundary=boundary)
  return jax.shard_map(
      local, mesh=sharding.mesh, in_specs=(P(*spec), P()), out_specs=P(*spec)
  )(x, operands)


@functools.lru_cache(maxsize=64)
def _constant_operands(solver, n, lam, metric, boundary, dtype):
  """A solver's operands for a concrete ``lam``: computed now, constants."""
  with jax.ensure_compile_time_eval():
    operands = solvers.SOLVERS[solver].operands(
        n, jnp.asarray(lam, dtype), metric, boundary)
  # numpy: a device array would carry the mesh it was made under into
  # updates traced under another.
  return tuple(np.asarray(a) for a in operands)


class _Operands:
  """One update's smoothing and solver operands, built once per channel count.

  A concrete smoothing gives constants (cached across updates); a traced one
  is mapped by :func:`_cdg_solvers.usable_smoothing` and its operands are
  built in the graph, once per update for each channel count and dtype.
  """

  def __init__(self, lam, metric: str, boundary: str,
               allow_amplification: bool):
    self.metric, self.boundary = metric, boundary
    self.allow_amplification = allow_amplification
    self.traced = isinstance(lam, jax.core.Tracer)
    # A concrete value was validated; only the cap can change it.
    self.lam = lam if self.traced else min(float(lam), solvers.MAX_SMOOTHING)
    self._built = {}

  def smoothing(self, dtype) -> jax.Array:
    """The usable smoothing as a scalar of ``dtype``."""
    if not self.traced:
      return jnp.asarray(self.lam, dtype)
    return solvers.usable_smoothing(
        jnp.asarray(self.lam, dtype), self.metric, self.allow_amplification)

  def get(self, solver: str, n: int, dtype) -> tuple[jax.Array, ...]:
    """The operands of ``solver`` for ``n`` channels."""
    if not self.traced:
      return _constant_operands(solver, n, self.lam, self.metric,
                                self.boundary, jnp.dtype(dtype))
    key = (solver, n, jnp.dtype(dtype))
    if key not in self._built:
      self._built[key] = solvers.SOLVERS[solver].operands(
          n, self.smoothing(dtype), self.metric, self.boundary)
    return self._built[key]


def _transform(
    g: jax.Array, axis: int, operands: _Operands, solver: str | None
) -> jax.Array:
  """Applies ``G^{-1}`` along ``axis`` of ``g``, keeping dtype and sharding."""
  # FFTs in half precision lose most of the signal: compute in >= float32.
  dtype = jnp.promote_types(g.dtype, jnp.float32)
  x = g.astype(dtype)
  if solvers.metric_of(operands.metric).mean_and_rest:
    # The constant fibre is the only j = 0 mode of either boundary. The mean
    # over a sharded channel axis is a cross-device sum of one value per
    # fibre, cheaper than a swap.
    lam = operands.smoothing(dtype)
    mean = jnp.mean(x, axis=axis, keepdims=True)
    return (mean + (x - mean) / lam).astype(g.dtype)
  n, boundary = g.shape[axis], operands.boundary
  x = jnp.moveaxis(x, axis, -1)
  if solver is None:
    cpu = _cpu_solver(operands.metric, n)
    # Both branches are traced, one is lowered: the other's operand (built
    # outside, so channel counts share it) is dead code there.
    y = jax.lax.platform_dependent(
        x, operands.get(cpu, n, dtype), operands.get("dense", n, dtype),
        cpu=lambda x, a, b: _sharded_solve(x, a, cpu, boundary),
        default=lambda x, a, b: _sharded_solve(x, b, "dense", boundary))
  else:
    y = _sharded_solve(x, operands.get(solver, n, dtype), solver, boundary)
  return jnp.moveaxis(y, -1, axis).astype(g.dtype)


def _check_smoothing(
    smoothing: jax.typing.ArrayLike, metric: str, allow_amplification: bool
) -> None:
  """Validates a concrete ``smoothing``; traced values are not checked."""
  # inject_hyperparams re-calls the factory with traced hyperparameters on
  # every update, where a Python comparison would fail.
  if isinstance(smoothing, jax.core.Tracer):
    return
  value = np.asarray(smoothing)
  real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(
      value.dtype, jnp.integer
  )  # jnp, not np: bfloat16 (from inject_hyperparams) is a float here.
  if value.ndim != 0 or not real:
    raise ValueError(f"smoothing must be a real scalar, got {smoothing!r}.")
  value = float(value)
  if not value > 0 or not np.isfinite(value):
    raise ValueError(
        f"smoothing must be finite and > 0, got {value} (metric={metric!r})."
    )
  least = solvers.metric_of(metric).least_smoothing
  if value < least and not allow_amplification:
    raise ValueError(
        f"metric={metric!r} with smoothing={value} < 1 amplifies every "
        "non-constant channel mode by up to 1/smoothing; pass "
        "allow_amplification=True if that is intended."
    )


def _check_options(metric: str, boundary: str, solver: str | None) -> None:
  solvers.metric_of(metric)
  if boundary not in BOUNDARIES:
    raise ValueError(
        f"Unknown boundary {boundary!r}: expected one of {BOUNDARIES}.")
  if solver is not None and solver not in SOLVERS:
    raise ValueError(
        f"Unknown solver {solver!r}: expected None or one of {SOLVERS}.")
  if solver == "tridiagonal" and not solvers.metric_of(metric).tridiagonal:
    raise ValueError(
        f"solver='tridiagonal' solves metric='sobolev' only, not {metric!r}: "
        "use 'fft', 'dense' or None.")


def _transform_leaf(
    path: str,
    layout: Layout | None,
    g: jax.Array,
    *,
    operands: _Operands,
    solver: str | None,
) -> jax.Array:
  """Transforms one selected kernel gradient; others are returned as is."""
  if layout is None or g is None:
    return g
  axis = parse_layout(layout).output
  if g.shape[axis] == 1 or not np.prod(g.shape):
    # A single channel has no neighbours (G is the identity); an empty
    # kernel has nothing to smooth.
    return g
  if jnp.issubdtype(g.dtype, jnp.complexfloating):
    raise ValueError(
        f"channel_directed_gradients got a complex gradient at {path!r}."
    )
  if not jnp.issubdtype(g.dtype, jnp.floating):
    return g  # e.g. float0 gradients of integer leaves.
  # numpy float64 becomes float32 unless x64 is enabled.
  return _transform(jnp.asarray(g), axis, operands, solver)


def channel_directed_gradients(
    smoothing: float | jax.Array | None = None,
    *,
    metric: str = "sobolev",
    boundary: str = "periodic",
    solver: str | None = None,
    kernel_layout: KernelLayoutSpec = "HWIO",
    mask: Any = None,
    include_dense: bool = False,
    allow_amplification: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Channel-Directed Gradients: smooth kernel gradients along output channels.

  Every fibre ``g`` of a selected kernel gradient along its output-channel
  axis is replaced by ``G^{-1} g`` for a metric ``G`` built from the discrete
  Laplacian along the channel index, whose eigenvalues ``-mu_j`` are ``mu_j =
  4 sin^2(pi j / n)`` for a ring of ``n`` channels and ``4 sin^2(pi j / (2
  n))`` with reflecting ends. ``metric`` selects the multiplier on channel
  frequency ``j``:

  * ``"sobolev"``: ``1 / (1 + lam mu_j)``, i.e. ``(I - lam L)^{-1}``, a
    low-pass that never increases a fibre's norm;
  * ``"reweighted_l2"``: the channel mean kept, the rest divided by ``lam``;
  * ``"reweighted_sobolev"``: the mean kept, ``mu_1 / (lam mu_j)``, so the
    lowest channel mode gains exactly ``1 / lam`` at any width.

  All three keep each fibre's mean over output channels. ``boundary`` treats
  the channel index as a ring (``"periodic"``, a Fourier basis) or reflects
  at its ends (``"neumann"``, a DCT-II basis); a trained network's channel
  order is arbitrary, so neither is more right. Gradients are transformed in
  float32 or wider and cast back.

  ``solver`` only changes the speed; all are exact up to rounding (they agree
  to about 1e-6 of the gradient's scale in float32). ``"fft"``: real FFTs of
  every fibre, ``O(n log n)``. ``"dense"``: the ``n x n`` matrix of
  ``G^{-1}``, built once per channel count, applied as one matrix product per
  kernel at ``Precision.HIGHEST`` (on TPUs the default precision, bfloat16
  passes, would break that agreement; the highest costs more passes).
  ``"tridiagonal"`` (``sobolev`` only): ``(I - lam L)^{-1}`` in blocks of
  channels, a few passes over memory. ``"reweighted_l2"`` is a closed form
  whatever the solver. ``None`` chooses where the update is compiled
  (:func:`jax.lax.platform_dependent`): on CPU ``"tridiagonal"`` for
  ``sobolev`` and ``"fft"`` otherwise, the fastest there (and ``"fft"`` for
  a width without a divisor near its square root, such as a large prime,
  where the blocks degenerate); on GPU and TPU ``"dense"``, until a device
  run measures otherwise.

  A traced ``smoothing`` (under :func:`jax.jit`, e.g. from
  :func:`optax.inject_hyperparams`) cannot be validated, so it is mapped into
  the accepted range in the graph: NaN and values ``<= 0`` act as ``0`` for
  ``"sobolev"`` (no smoothing) and ``1`` for the re-weighted metrics (no
  amplification), as do re-weighted values below 1 unless
  ``allow_amplification``; values above ``1e30`` (``inf`` included) act as
  ``1e30`` (the channel mean). So the update stays finite and, without
  ``allow_amplification``, no fibre's norm grows. Concrete values (Python
  numbers, arrays outside :func:`jax.jit`, an eager
  :func:`optax.inject_hyperparams` step) are checked and raise.

  Place it on the raw gradient, before weight decay and any optimizer
  (Adam included).

  Sharding: inside :func:`jax.jit`, every output keeps its input's sharding,
  on automatic and explicit meshes, and a kernel sharded along its output
  channels is never gathered: each device swaps its block to whole fibres
  with an all-to-all, solves them and swaps back (every solver). A device
  whose fibre count is not a multiple of the devices sharing the channel axis
  (a stem with 3 input channels, a depthwise kernel) pads it with zero fibres
  (fewer than those devices). ``"reweighted_l2"`` needs no swap: its channel
  mean is a cross-device sum. On an automatic mesh, a channel axis that XLA
  shards unevenly is gathered (the shards' padding would enter the solve),
  and derivatives of the transform itself (differentiating through the
  optimizer) are partitioned by XLA alone.

  Args:
    smoothing: ``lam > 0``, a Python scalar or a scalar array (it may be
      traced, e.g. under :func:`optax.inject_hyperparams`: see above).
      ``None`` uses the metric's default: ``"sobolev"`` 1.0, the re-weighted
      metrics 2.0.
    metric: ``"sobolev"``, ``"reweighted_l2"`` or ``"reweighted_sobolev"``.
    boundary: ``"periodic"`` or ``"neumann"``.
    solver: ``None`` (by platform), ``"fft"``, ``"dense"`` or
      ``"tridiagonal"`` (``metric="sobolev"`` only).
    kernel_layout: a layout string (default ``"HWIO"``, Flax; ``"OIHW"`` for
      PyTorch-style weights), a pytree of layouts or ``None`` per leaf, or a
      callable returning one. A string selects every leaf of its rank; 1-D and
      3-D conv kernels are selected only when a layout tree or callable names
      them (a leading ``"L"`` marks stacked layers, each smoothed on its
      own). See the kernel layouts guide and :func:`sgs_optax.parse_layout`.
    mask: optional optax-style boolean mask (pytree, prefix or callable); the
      transform is then ``optax.masked(..., mask)``, so it only removes leaves
      from the selection.
    include_dense: with a string ``kernel_layout``, also treat 2-D leaves as
      dense kernels (``"IO"`` for ``"HWIO"``, ``"OI"`` for ``"OIHW"``).
    allow_amplification: allow ``smoothing < 1`` with the re-weighted metrics,
      which amplifies every non-constant channel mode.

  Returns:
    A stateless :class:`optax.GradientTransformationExtraArgs`
    (state :class:`optax.EmptyState`) that ignores extra arguments. Leaves
    that are not selected, and kernels with a single output channel, pass
    through unchanged (the same objects).

  Raises:
    ValueError: for an unknown metric, boundary, solver or layout; for
      ``solver="tridiagonal"`` with a metric other than ``"sobolev"``; for a
      concrete ``smoothing`` that is not a finite positive scalar; for a
      concrete ``smoothing < 1`` with a re-weighted metric unless
      ``allow_amplification``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> import sgs_optax
    >>> params = {'conv': {'kernel': jnp.zeros((3, 3, 2, 4)),
    ...                    'bias': jnp.zeros((4,))}}
    >>> tx = sgs_optax.cdg(smoothing=1.0)
    >>> grads = {'conv': {'kernel': jnp.ones((3, 3, 2, 4)).at[..., 0].set(5.),
    ...                   'bias': jnp.ones((4,))}}
    >>> updates, _ = tx.update(grads, tx.init(params))
    >>> print(np.round(np.asarray(updates['conv']['kernel'][0, 0, 0]), 3))
    [2.867 1.8   1.533 1.8  ]
    >>> print(float(updates['conv']['kernel'][0, 0, 0].mean()))
    2.0

    In a full optimizer it goes first:

    >>> tx = optax.chain(sgs_optax.cdg(), optax.add_decayed_weights(1e-4),
    ...                  optax.sgd(0.1, momentum=0.9))
    >>> updates, _ = tx.update(grads, tx.init(params), params)

    The solvers give the same numbers:

    >>> out = {solver: sgs_optax.cdg(solver=solver).update(grads, None)[0]
    ...        for solver in ('fft', 'dense', 'tridiagonal')}
    >>> for solver in ('dense', 'tridiagonal'):
    ...   print(np.round(np.asarray(out[solver]['conv']['kernel'][0, 0, 0]), 3))
    [2.867 1.8   1.533 1.8  ]
    [2.867 1.8   1.533 1.8  ]

    With :func:`optax.inject_hyperparams`, pass the non-numeric arguments
    that are callables (e.g. ``mask``) as ``static_args``:

    >>> tx = optax.inject_hyperparams(sgs_optax.cdg)(smoothing=0.5)
    >>> updates, _ = tx.update(grads, tx.init(params), params)

  References:
    The metrics are derived from the paper's description; its exact formulas
    could not be read.

    Lao, Zhu, Wonka, Sundaramoorthi, `Channel-Directed Gradients for
    Optimization of Convolutional Neural Networks
    <https://arxiv.org/abs/2008.10766>`_, 2020
  """
  _check_options(metric, boundary, solver)
  lam = DEFAULT_SMOOTHING[metric] if smoothing is None else smoothing
  _check_smoothing(lam, metric, allow_amplification)
  if isinstance(kernel_layout, str):
    parse_layout(kernel_layout)  # Fail at construction, not at first update.

  def init_fn(params):
    params = plain_arrays(params)
    if jax.tree.leaves(params):  # Not tree_map_params' leafless placeholder.
      layouts = resolve_layouts(params, kernel_layout,
                                include_dense=include_dense)
      check_selects_a_leaf("cdg", params, layouts, kernel_layout)
      check_plausible("cdg", params, layouts, kernel_layout)
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    layouts = resolve_layouts(
        updates, kernel_layout, include_dense=include_dense
    )
    check_plausible("cdg", updates, layouts, kernel_layout)
    operands = _Operands(lam, metric, boundary, allow_amplification)
    leaf_fn = functools.partial(_transform_leaf, operands=operands,
                                solver=solver)
    return map_layouts(leaf_fn, layouts, updates), state

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


cdg = channel_directed_gradients
