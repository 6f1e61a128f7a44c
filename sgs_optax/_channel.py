"""Channel-Directed Gradients: a smoothing metric along output channels.

Lao et al. (2020) take a conv kernel's gradient with respect to a metric ``G``
that couples neighbouring *output channels*. Every fibre ``g`` of the gradient
along the output-channel axis (length ``n``) becomes ``G^{-1} g``. ``G`` is
built from the discrete Laplacian ``L`` along the channel index, whose
eigenvalues ``-mu_j`` are ``mu_j = 4 sin^2(pi j / n)`` for a periodic channel
index and ``4 sin^2(pi j / (2 n))`` for reflecting (Neumann) ends, so ``G^{-1}``
is a multiplier ``m_j`` in a Fourier (periodic) or cosine (Neumann) basis:

* ``sobolev``: ``m_j = 1 / (1 + lam mu_j)``, i.e. ``(I - lam L) g_hat = g``;
* ``reweighted_l2``: ``m_0 = 1``, ``m_j = 1 / lam``: the channel mean is kept
  and the rest divided by ``lam``, an ``O(n)`` closed form;
* ``reweighted_sobolev``: ``m_0 = 1``, ``m_j = mu_1 / (lam mu_j)``. The raw
  ``1 / (lam mu_j)`` would multiply the lowest mode by about
  ``n^2 / (4 pi^2 lam)``; dividing by ``mu_1`` makes that gain ``1 / lam`` at
  every width.

The periodic solve is one real FFT and its inverse per fibre. The Neumann solve
diagonalises with the DCT-II, computed by Makhoul's method (one real FFT of
length ``n`` of the reordered fibre; J. Makhoul, A fast cosine transform in one
and two dimensions, IEEE Trans. ASSP 28(1), 1980), so it needs no more memory
than the periodic one. The paper's exact formulas could not be read when this
was written; these are the ones derived in the package's specification from
its description.

Sharding: an FFT needs whole fibres. When the output-channel axis of a kernel
is sharded over a mesh, each device's block is flattened to fibres and an
all-to-all swaps the sharding from the channel axis to the fibre axis (as
distributed FFTs do), the fibres are transformed locally, and a second
all-to-all swaps back; see :func:`_swap_and_solve`. The sharding comes from
the array's type under explicit sharding and from XLA's partitioner (through
:func:`jax.experimental.custom_partitioning`) under automatic sharding.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sgs_optax._kernels import check_plausible
from sgs_optax._kernels import check_selects_a_leaf
from sgs_optax._kernels import KernelLayoutSpec
from sgs_optax._kernels import Layout
from sgs_optax._kernels import map_layouts
from sgs_optax._kernels import parse_layout
from sgs_optax._kernels import plain_arrays
from sgs_optax._kernels import resolve_layouts

METRICS = ("sobolev", "reweighted_l2", "reweighted_sobolev")
BOUNDARIES = ("periodic", "neumann")

# Defaults for `smoothing` (lambda). Sobolev 1.0: a moderate low-pass that
# keeps the channel mean and damps the highest channel frequency by
# 1 / (1 + 4) = 1/5; it never amplifies. The re-weighted metrics scale the
# non-constant modes by at most 1 / lambda, and lambda = 1 would make
# `reweighted_l2` the identity, so 2.0 is the smallest round value that acts
# (halving them) without amplifying anything.
DEFAULT_SMOOTHING = {
    "sobolev": 1.0,
    "reweighted_l2": 2.0,
    "reweighted_sobolev": 2.0,
}

# Metrics whose non-mean gains are 1/lambda (or less): lambda < 1 amplifies.
_AMPLIFYING_BELOW_ONE = ("reweighted_l2", "reweighted_sobolev")


def _coefficients(
    n: int, lam: jax.Array, metric: str, boundary: str
) -> jax.Array:
  """What :func:`_solve_rows` multiplies the ``rfft`` bins of a fibre by.

  Args:
    n: the number of output channels (at least 2).
    lam: the smoothing strength, a scalar (possibly traced).
    metric: ``"sobolev"`` or ``"reweighted_sobolev"``.
    boundary: one of :data:`BOUNDARIES`.

  Returns:
    A complex ``(2, n // 2 + 1)`` array ``[a, b]``. Periodic: ``a`` is the
    multiplier ``m_0 .. m_{n // 2}`` and ``b`` is zero. Neumann: the ``rfft``
    ``V`` of the permuted fibre becomes ``a V + b conj(V)``.
  """
  period = n if boundary == "periodic" else 2 * n
  # float64 numpy: n is static, and exact constants keep float32 multipliers
  # accurate on wide layers.
  mu = jnp.asarray(4.0 * np.sin(np.pi * np.arange(n) / period) ** 2, lam.dtype)
  if metric == "sobolev":
    m = 1.0 / (1.0 + lam * mu)
  else:
    m = jnp.concatenate([jnp.ones((1,), lam.dtype), mu[1] / (lam * mu[1:])])
  half = n // 2
  complex_dtype = jnp.promote_types(lam.dtype, jnp.complex64)
  if boundary == "periodic":
    zeros = jnp.zeros(half + 1, lam.dtype)
    return jnp.stack([m[: half + 1], zeros]).astype(complex_dtype)
  # Makhoul's DCT-II through an FFT of the fibre reordered as
  # [x_0, x_2, ..., x_3, x_1]: cosine coefficient k is Re(w_k V_k) and
  # coefficient n - k is -Im(w_k V_k), with w_k = exp(-i pi k / (2 n)).
  # Scaling them by m_k and m_{n-k} and inverting gives a V + b conj(V).
  upper = jnp.concatenate([jnp.zeros((1,), lam.dtype), m[::-1][:half]])
  lower = m[: half + 1]
  twiddle = jnp.asarray(
      np.exp(1j * np.pi * np.arange(half + 1) / n), complex_dtype
  )
  return jnp.stack(
      [((lower + upper) / 2).astype(complex_dtype),
       (lower - upper) / 2 * twiddle]
  )


def _solve_rows(
    rows: jax.Array, coefficients: jax.Array, boundary: str
) -> jax.Array:
  """Applies ``G^{-1}`` to each row of a 2-D ``(fibres, channels)`` array."""
  n = rows.shape[-1]
  if boundary == "periodic":
    spectrum = jnp.fft.rfft(rows, axis=-1) * coefficients[0].real
    return jnp.fft.irfft(spectrum, n=n, axis=-1)
  # Neumann: Makhoul's DCT-II with real FFTs of length n; jax's `dct` pair
  # uses complex FFTs, and the even extension [x, flip(x)] length 2 n, each
  # holding about twice the data.
  half = (n + 1) // 2
  spectrum = jnp.fft.rfft(
      jnp.concatenate([rows[:, ::2], rows[:, 1::2][:, ::-1]], axis=-1), axis=-1
  )
  spectrum = (
      coefficients[0].real * spectrum + coefficients[1] * jnp.conj(spectrum)
  )
  u = jnp.fft.irfft(spectrum, n=n, axis=-1)
  odd = jnp.pad(u[:, half:][:, ::-1], ((0, 0), (0, 2 * half - n)))
  return jnp.stack([u[:, :half], odd], axis=-1).reshape(-1, 2 * half)[:, :n]


def _swap_and_solve(
    block: jax.Array,
    coefficients: jax.Array,
    channel_axes: str | tuple[str, ...] | None,
    boundary: str,
) -> jax.Array:
  """Transforms one device's block of a kernel whose last axis is channels.

  Args:
    block: this device's block; the channel axis is last.
    coefficients: from :func:`_coefficients`, replicated.
    channel_axes: the mesh axes that shard the channel axis, or ``None``
      when every device holds whole fibres.
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
  rows = _solve_rows(rows, coefficients, boundary)
  if channel_axes:
    rows = jax.lax.all_to_all(rows, channel_axes, 1, 0, tiled=True)[:count]
  return rows.reshape(block.shape)


def _full_spec(spec: P, ndim: int) -> tuple:
  return (*spec, *([None] * (ndim - len(spec))))


def _partition(boundary, mesh, arg_shapes, result_shape):
  """custom_partitioning's rule: keep the sharding, swap if channels split."""
  del result_shape
  x = arg_shapes[0]
  spec = _full_spec(x.sharding.spec, len(x.shape))
  channel_axes = spec[-1]
  if channel_axes:
    names = (channel_axes,) if isinstance(channel_axes, str) else channel_axes
    if x.shape[-1] % np.prod([mesh.shape[a] for a in names]):
      # Uneven shards carry XLA's padding, which an FFT would mix into the
      # channels: gather the channel axis instead.
      spec, channel_axes = (*spec[:-1], None), None
  sharding = NamedSharding(mesh, P(*spec))
  lower = functools.partial(
      _swap_and_solve, channel_axes=channel_axes, boundary=boundary
  )
  return mesh, lower, sharding, (sharding, NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=None)
def _auto_partitioned_solve(ndim: int, boundary: str):
  """``_swap_and_solve`` for ``ndim``-D operands, partitioned by XLA.

  Returns ``solve(x, coefficients)`` that also works under ``jax.vmap`` and
  differentiation, which ``custom_partitioning`` alone does not support.
  """
  plain = functools.partial(
      _swap_and_solve, channel_axes=None, boundary=boundary
  )
  # Must not close over array constants (custom_partitioning rejects them):
  # the coefficients are an operand.
  partitioned = custom_partitioning(lambda x, m: plain(x, m))
  factors = " ".join(f"a{i}" for i in range(ndim))
  partitioned.def_partition(
      functools.partial(_partition, boundary),
      infer_sharding_from_operands=lambda mesh, args, res: args[0].sharding,
      sharding_rule=f"{factors}, c m -> {factors}",
      need_replication_factors=("c", "m"),
  )
  batchable = jax.custom_batching.custom_vmap(lambda x, m: partitioned(x, m))

  @batchable.def_vmap
  def _(axis_size, in_batched, x, m):
    if in_batched[1]:  # A batched smoothing: rare, left to XLA.
      x = x if in_batched[0] else jnp.broadcast_to(x, (axis_size, *x.shape))
      return jax.vmap(plain)(x, m), True
    # The batch axis leads: one more fibre axis.
    return _auto_partitioned_solve(ndim + 1, boundary)(x, m), True

  solve = jax.custom_jvp(lambda x, m: batchable(x, m))

  @solve.defjvp
  def _(primals, tangents):
    # Linear in each operand; the tangent (only under differentiation through
    # the optimizer) is left to XLA's partitioning.
    return batchable(*primals), jax.jvp(plain, primals, tangents)[1]

  return solve


def _sharded_solve(
    x: jax.Array, coefficients: jax.Array, boundary: str
) -> jax.Array:
  """Runs :func:`_swap_and_solve` on ``x`` (channels last) where it lives."""
  sharding = jax.typeof(x).sharding
  spec = _full_spec(getattr(sharding, "spec", P()), x.ndim)
  if not any(spec):
    # Replicated, or automatic sharding (invisible while tracing): the
    # partitioner reports it to `_partition`.
    return _auto_partitioned_solve(x.ndim, boundary)(x, coefficients)
  local = functools.partial(
      _swap_and_solve, channel_axes=spec[-1], boundary=boundary
  )
  return jax.shard_map(
      local, mesh=sharding.mesh, in_specs=(P(*spec), P()), out_specs=P(*spec)
  )(x, coefficients)


def _transform(
    g: jax.Array, axis: int, lam: jax.typing.ArrayLike, metric: str,
    boundary: str,
) -> jax.Array:
  """Applies ``G^{-1}`` along ``axis`` of ``g``, keeping dtype and sharding."""
  # FFTs in half precision lose most of the signal: compute in >= float32.
  dtype = jnp.promote_types(g.dtype, jnp.float32)
  x = g.astype(dtype)
  lam = jnp.asarray(lam, dtype)
  if metric == "reweighted_l2":
    # The constant fibre is the only j = 0 mode of either boundary. The mean
    # over a sharded channel axis is a cross-device sum of one value per
    # fibre, cheaper than a swap.
    mean = jnp.mean(x, axis=axis, keepdims=True)
    return (mean + (x - mean) / lam).astype(g.dtype)
  coefficients = _coefficients(g.shape[axis], lam, metric, boundary)
  y = _sharded_solve(jnp.moveaxis(x, axis, -1), coefficients, boundary)
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
  if (
      metric in _AMPLIFYING_BELOW_ONE
      and value < 1
      and not bool(allow_amplification)
  ):
    raise ValueError(
        f"metric={metric!r} with smoothing={value} < 1 amplifies every "
        "non-constant channel mode by up to 1/smoothing; pass "
        "allow_amplification=True if that is intended."
    )


def _check_options(metric: str, boundary: str) -> None:
  if metric not in METRICS:
    raise ValueError(f"Unknown metric {metric!r}: expected one of {METRICS}.")
  if boundary not in BOUNDARIES:
    raise ValueError(
        f"Unknown boundary {boundary!r}: expected one of {BOUNDARIES}."
    )


def _transform_leaf(
    path: str,
    layout: Layout | None,
    g: jax.Array,
    *,
    lam: jax.typing.ArrayLike,
    metric: str,
    boundary: str,
) -> jax.Array:
  """Transforms one selected kernel gradient; others are returned as is."""
  if layout is None or g is None:
    return g
  axis = parse_layout(layout).output
  if g.shape[axis] == 1:
    return g  # A single channel has no neighbours: G is the identity.
  if jnp.issubdtype(g.dtype, jnp.complexfloating):
    raise ValueError(
        f"channel_directed_gradients got a complex gradient at {path!r}."
    )
  if not jnp.issubdtype(g.dtype, jnp.floating):
    return g  # e.g. float0 gradients of integer leaves.
  # numpy float64 becomes float32 unless x64 is enabled.
  return _transform(jnp.asarray(g), axis, lam, metric, boundary)


def channel_directed_gradients(
    smoothing: jax.typing.ArrayLike | None = None,
    *,
    metric: str = "sobolev",
    boundary: str = "periodic",
    kernel_layout: KernelLayoutSpec = "HWIO",
    mask: Any = None,
    include_dense: bool = False,
    allow_amplification: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Channel-Directed Gradients: smooth kernel gradients along output channels.

  Every fibre ``g`` of a selected kernel gradient along its output-channel
  axis is replaced by ``G^{-1} g`` for a metric ``G`` built from the discrete
  Laplacian along the channel index (eigenvalues ``mu_j``, see
  :mod:`sgs_optax._channel`). ``metric`` selects the multiplier on channel
  frequency ``j``:

  * ``"sobolev"``: ``1 / (1 + lam mu_j)``, a low-pass that never increases a
    fibre's norm;
  * ``"reweighted_l2"``: the channel mean kept, the rest divided by ``lam``;
  * ``"reweighted_sobolev"``: the mean kept, ``mu_1 / (lam mu_j)``, so the
    lowest channel mode gains exactly ``1 / lam`` at any width.

  All three keep each fibre's mean over output channels. ``boundary`` treats
  the channel index as a ring (``"periodic"``) or reflects at its ends
  (``"neumann"``); a trained network's channel order is arbitrary, so neither
  is more right. Gradients are transformed in float32 or wider and cast back.

  Place it on the raw gradient, before weight decay and any optimizer
  (Adam included).

  Sharding: inside :func:`jax.jit`, every output keeps its input's sharding,
  on automatic and explicit meshes, and a kernel sharded along its output
  channels is never gathered: each device swaps its block to whole fibres
  with an all-to-all, transforms them and swaps back. A device whose fibre
  count is not a multiple of the devices sharing the channel axis (a stem
  with 3 input channels, a depthwise kernel) pads it with zero fibres (fewer
  than those devices). ``"reweighted_l2"`` needs no swap: its channel mean is
  a cross-device sum. On an automatic mesh, a channel axis that XLA shards
  unevenly is gathered (the shards' padding would enter the FFT), and
  derivatives of the transform itself (differentiating through the
  optimizer) are partitioned by XLA alone.

  Args:
    smoothing: ``lam > 0``, a Python scalar or a scalar array (it may be
      traced, e.g. under :func:`optax.inject_hyperparams`; only concrete
      values are validated). ``None`` uses :data:`DEFAULT_SMOOTHING`
      (``"sobolev"`` 1.0, the re-weighted metrics 2.0).
    metric: ``"sobolev"``, ``"reweighted_l2"`` or ``"reweighted_sobolev"``.
    boundary: ``"periodic"`` or ``"neumann"``.
    kernel_layout: a layout string (default ``"HWIO"``, Flax; ``"OIHW"`` for
      PyTorch-style weights), a pytree of layouts or ``None`` per leaf, or a
      callable returning one. A string selects every leaf of its rank; 1-D and
      3-D conv kernels are selected only when a layout tree or callable names
      them (a leading ``"L"`` marks stacked layers, each smoothed on its
      own). See :mod:`sgs_optax._kernels`.
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
    ValueError: for an unknown metric, boundary or layout; for a concrete
      ``smoothing`` that is not a finite positive scalar; for a concrete
      ``smoothing < 1`` with a re-weighted metric unless
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
  _check_options(metric, boundary)
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
    leaf_fn = functools.partial(
        _transform_leaf, lam=lam, metric=metric, boundary=boundary
    )
    return map_layouts(leaf_fn, layouts, updates), state

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


cdg = channel_directed_gradients
