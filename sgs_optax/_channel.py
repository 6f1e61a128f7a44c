"""Channel-Directed Gradients: a smoothing metric along output channels.

Lao et al. (2020) take the gradient of a convolutional network's loss with
respect to a metric that couples neighbouring *output channels* of each kernel
(a re-weighted L2 or a Sobolev metric), instead of the usual Euclidean one. The
result only post-processes the stochastic gradient, so it is a stateless optax
transform that runs on the raw gradient, before any optimizer.

The paper's exact formulas could not be read when this module was written.
The three metrics below are the ones derived in this package's specification
from the published description: every fibre ``g[..., :]`` along the
output-channel axis (length ``n = C_out``) becomes ``G^{-1} g``, where the
metric ``G`` is built from the discrete Laplacian along the channel index and
is therefore diagonal in a Fourier (periodic boundary) or cosine (Neumann
boundary) basis. Applying ``G^{-1}`` costs one real FFT and its inverse per
fibre (of length ``n``, or ``2 n`` for the Neumann boundary), i.e.
``O(n log n)``; ``reweighted_l2`` has an ``O(n)`` closed form.

Kernels sharded over devices inside ``jax.jit`` are supported with automatic
and explicit sharding; see :func:`_apply_along_output_axis`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sgs_optax._kernels import KernelLayoutSpec
from sgs_optax._kernels import Layout
from sgs_optax._kernels import map_layouts
from sgs_optax._kernels import parse_layout
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


def laplacian_eigenvalues(n: int, boundary: str) -> np.ndarray:
  """Eigenvalues ``mu_j`` of minus the channel Laplacian of ``n`` channels.

  Args:
    n: the number of output channels.
    boundary: ``"periodic"`` (``mu_j = 4 sin^2(pi j / n)``) or ``"neumann"``
      (``mu_j = 4 sin^2(pi j / (2 n))``, the DCT-II eigenvalues).

  Returns:
    A float64 numpy array of the ``n`` eigenvalues, ``j = 0..n-1``;
    ``mu_0 = 0`` and ``mu_1`` is the smallest non-zero one.
  """
  # Static numpy in float64: n is a Python int, and computing the constants
  # once at full precision keeps float32 multipliers accurate for wide layers.
  period = n if boundary == "periodic" else 2 * n
  return 4.0 * np.sin(np.pi * np.arange(n) / period) ** 2


def _multiplier(
    n: int,
    lam: jax.typing.ArrayLike,
    metric: str,
    boundary: str,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
  """The spectral multiplier ``m_j`` of ``G^{-1}`` on ``rfft`` bins.

  Args:
    n: the number of output channels (at least 2).
    lam: the smoothing strength; may be a traced scalar.
    metric: one of :data:`METRICS`.
    boundary: one of :data:`BOUNDARIES`.
    dtype: the dtype of the result.

  Returns:
    ``m_0 .. m_{P//2}`` for the ``rfft`` of length ``P``, where ``P = n``
    (periodic) or ``P = 2 n``, the even extension used for the Neumann
    boundary (see :func:`_transform_fibres`); ``m_0 = 1`` always.
  """
  period = n if boundary == "periodic" else 2 * n
  mu = laplacian_eigenvalues(period, "periodic")[: period // 2 + 1]
  mu = jnp.asarray(mu, dtype)
  lam = jnp.asarray(lam, dtype)
  one = jnp.ones((1,), dtype)
  if metric == "sobolev":
    return 1.0 / (1.0 + lam * mu)
  if metric == "reweighted_l2":
    return jnp.concatenate([one, jnp.full((mu.shape[0] - 1,), 1.0 / lam)])
  # reweighted_sobolev: the raw 1 / (lam mu_j) would boost the lowest mode by
  # ~n^2 / (4 pi^2 lam); dividing by mu_1 makes that gain exactly 1 / lam.
  return jnp.concatenate([one, mu[1] / (lam * mu[1:])])


def _periodic_solve(x: jax.Array, multiplier: jax.Array) -> jax.Array:
  """Multiplies the ``rfft`` of each fibre of ``x`` by ``multiplier``."""
  n = x.shape[-1]
  return jnp.fft.irfft(jnp.fft.rfft(x, axis=-1) * multiplier, n=n, axis=-1)


def _transform_fibres(
    x: jax.Array, lam: jax.typing.ArrayLike, metric: str, boundary: str
) -> jax.Array:
  """Applies ``G^{-1}`` to every fibre of ``x`` along its last axis."""
  n = x.shape[-1]
  if metric == "reweighted_l2":
    # The constant vector is the only j = 0 mode of either boundary, so the
    # closed form is exact for both, O(n) and FFT-free.
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return mean + (x - mean) / jnp.asarray(lam, x.dtype)
  m = _multiplier(n, lam, metric, boundary, x.dtype)
  if boundary == "periodic":
    return _periodic_solve(x, m)
  # Neumann: the reflecting-ends Laplacian of x is the periodic Laplacian of
  # its even extension [x, flip(x)], which the solve keeps even; this is the
  # DCT-II diagonalisation done with the same rfft. jax's `dct` lowers to a
  # complex FFT whose SPMD partitioning aborts the process when the channel
  # axis is sharded (XLA fft_handler.cc check), so it is avoided.
  extended = jnp.concatenate([x, jnp.flip(x, axis=-1)], axis=-1)
  return _periodic_solve(extended, m)[..., :n]


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
  # FFTs in half precision lose most of the signal: promote to >= float32.
  return jnp.promote_types(dtype, jnp.float32)


def _explicit_spec(x: jax.Array) -> P | None:
  """The sharding spec of ``x`` if any of its axes is explicitly sharded."""
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  if spec is None or all(s is None for s in spec):
    return None  # Unsharded, or automatic sharding (invisible at trace time).
  return P(*spec, *([None] * (x.ndim - len(spec))))


def _on_rows(
    fibre_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    lam: jax.Array,
) -> jax.Array:
  # A 2-D (fibres, channels) FFT operand: XLA's CPU FFT rejects the layouts
  # that SPMD partitioning can give a >2-D operand (fft_thunk.cc:168
  # IsMonotonicWithDim0Major), even when only a non-channel axis is sharded.
  return fibre_fn(x.reshape(-1, x.shape[-1]), lam).reshape(x.shape)


def _apply_along_output_axis(
    g: jax.Array,
    axis: int,
    fibre_fn: Callable[[jax.Array, jax.Array], jax.Array],
    lam: jax.typing.ArrayLike,
) -> jax.Array:
  """Runs ``fibre_fn`` on the fibres of ``g`` along ``axis``.

  This is the single place that moves the output-channel axis, changes
  precision, handles sharding and calls the transform.

  Args:
    g: a kernel gradient.
    axis: its output-channel axis.
    fibre_fn: ``fibre_fn(x, lam)`` maps a 2-D ``(fibres, channels)`` array
      ``x`` to one of the same shape, acting independently on each row.
    lam: the smoothing strength, a scalar (possibly traced).

  Returns:
    ``g`` transformed, with its shape, dtype and (explicit) sharding.
  """
  g = jnp.asarray(g)  # numpy float64 becomes float32 unless x64 is enabled.
  dtype = _compute_dtype(g.dtype)
  x = jnp.moveaxis(g, axis, -1).astype(dtype)
  lam = jnp.asarray(lam, dtype)
  spec = _explicit_spec(x)
  if spec is None:
    # Unsharded, or automatic sharding: XLA partitions the reshape and FFT.
    y = _on_rows(fibre_fn, x, lam)
  else:
    # Explicit sharding: merging sharded axes into rows is a type error, and
    # an FFT needs whole fibres (its rfft bins cannot keep a channel
    # sharding). So gather the channel axis only, and let every device
    # transform its own fibres, as a plain local computation. `lam` is an
    # argument because shard_map cannot close over tracers on explicit meshes.
    # The mesh comes from x's type, so no `jax.set_mesh` context is needed.
    mesh = jax.typeof(x).sharding.mesh
    whole = P(*spec[:-1], None)
    local_fn = jax.shard_map(
        functools.partial(_on_rows, fibre_fn),
        mesh=mesh,
        in_specs=(whole, P()),
        out_specs=whole,
    )
    x = jax.sharding.reshard(x, NamedSharding(mesh, whole))
    y = jax.sharding.reshard(local_fn(x, lam), NamedSharding(mesh, spec))
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
  fibre_fn = functools.partial(
      _transform_fibres, metric=metric, boundary=boundary
  )
  return _apply_along_output_axis(g, axis, fibre_fn, lam)


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
  axis (length ``n = C_out``) is replaced by ``G^{-1} g``, its gradient under
  the metric ``G``. With ``L`` the discrete Laplacian along the channel index,
  ``mu_j`` the eigenvalues of ``-L`` and ``lam = smoothing``, ``G^{-1}`` has
  the spectral multiplier ``m_j``:

  * ``"sobolev"`` (H^1): ``m_j = 1 / (1 + lam mu_j)``, i.e. ``g_hat`` solves
    ``(I - lam L) g_hat = g``. A low-pass filter across channels; it never
    increases a fibre's L2 norm; ``lam -> 0`` is the identity.
  * ``"reweighted_l2"`` (re-weighted H^0): ``m_0 = 1``, ``m_j = 1 / lam``,
    i.e. ``g_hat = mean + (g - mean) / lam``. ``lam = 1`` is the identity.
  * ``"reweighted_sobolev"`` (re-weighted H^1): ``m_0 = 1``,
    ``m_j = mu_1 / (lam mu_j)``. The raw ``1 / (lam mu_j)`` would multiply the
    lowest mode by about ``n^2 / (4 pi^2 lam)`` on wide layers; normalising by
    the smallest non-zero eigenvalue ``mu_1`` makes that gain exactly
    ``1 / lam`` at every width, and higher modes are damped further.

  All three keep the mean over output channels exactly (``m_0 = 1``).

  Boundaries: ``"periodic"`` treats channel ``n - 1`` as a neighbour of
  channel 0 (``mu_j = 4 sin^2(pi j / n)``, real FFT); ``"neumann"`` reflects at
  both ends (``mu_j = 4 sin^2(pi j / (2 n))``, orthonormal DCT-II). The
  channel order of a trained network is arbitrary, so neither is "right";
  periodic is the default because it is what the specification derives first
  and is the cheaper transform. The Neumann solve runs as the periodic solve
  of the even extension ``[g, flip(g)]`` (length ``2 n``), which is the same
  operator as the orthonormal DCT-II diagonalisation (``dct``/``idct`` are not
  used: their SPMD partitioning can abort the process).

  Sharding: kernels sharded over devices (any axis, the output-channel axis
  included) work inside ``jax.jit``. With explicit sharding
  (``jax.sharding.AxisType.Explicit``) the channel axis alone is gathered for
  the transform, done per device with ``jax.shard_map``, and the result keeps
  the input's sharding; with automatic sharding XLA chooses the output
  sharding (on CPU it may replicate the result).

  Defaults for ``smoothing``: ``"sobolev"`` 1.0 (damps the highest channel
  frequency by 1/5, a moderate low-pass); ``"reweighted_l2"`` and
  ``"reweighted_sobolev"`` 2.0 (1.0 would make ``reweighted_l2`` the
  identity; 2.0 halves every non-constant mode at most). See
  :data:`DEFAULT_SMOOTHING`.

  Computation is in float32 or wider: bfloat16 and float16 gradients are
  promoted for the transform and cast back; float64 stays float64.

  Place it on the raw gradient, before weight decay and the optimizer:
  ``optax.chain(cdg(...), optax.add_decayed_weights(wd), optax.sgd(...))``,
  and likewise before ``optax.adam``.

  .. note::
    The paper's exact formulas could not be read when this was written. These
    metrics are the ones derived in this package's specification from the
    paper's description (output-channel directed re-weighted L2 and Sobolev
    metrics, applied as a post-processing of the stochastic gradient with
    linear overhead); they may differ from the authors' implementation.

  Args:
    smoothing: ``lam > 0``, a Python scalar or a scalar array (it may be traced,
      e.g. under :func:`optax.inject_hyperparams`; only concrete values are
      validated). ``None`` uses the metric's default.
    metric: ``"sobolev"``, ``"reweighted_l2"`` or ``"reweighted_sobolev"``.
    boundary: ``"periodic"`` or ``"neumann"``.
    kernel_layout: a layout string (default ``"HWIO"``, Flax; ``"OIHW"`` for
      PyTorch-style weights), a pytree of layouts or ``None`` per leaf, or a
      callable returning one. A string selects every leaf of its rank (so by
      default 2-D conv kernels); 1-D and 3-D conv kernels are selected only
      when a layout tree or callable names them. See
      :mod:`sgs_optax._kernels`.
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
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    layouts = resolve_layouts(
        updates, kernel_layout, include_dense=include_dense
    )
    leaf_fn = functools.partial(
        _transform_leaf, lam=lam, metric=metric, boundary=boundary
    )
    return map_layouts(leaf_fn, layouts, updates), state

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


cdg = channel_directed_gradients
