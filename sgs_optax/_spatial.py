"""Spatial Gradient Scaling: one (kh, kw) matrix per conv kernel's gradient."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgs_optax import _branches
from sgs_optax import _kernels

Scaling = Any  # None, a preset name, an array, or a params-shaped tree.


class SpatialScalingState(NamedTuple):
  """State of :func:`spatial_gradient_scaling`.

  Attributes:
    scalings: a params-shaped tree holding, at each scaled kernel, its matrix
      of shape ``(kh, kw)`` (or ``(kh, kw, C_out)``) in float32 or in the
      parameter's dtype when that is wider, and ``None`` elsewhere.
  """

  scalings: optax.Params


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_matrix(name: str, matrix: Any) -> None:
  """Validates a user-given matrix (shape rank, finiteness, sign)."""
  if np.ndim(matrix) not in (2, 3):
    raise ValueError(
        f"scaling for {name} must have shape (kh, kw) or (kh, kw, C_out), got "
        f"shape {np.shape(matrix)}."
    )
  if _is_concrete(matrix):
    values = np.asarray(matrix, dtype=np.float64)
    if not np.all(np.isfinite(values)):
      raise ValueError(f"scaling for {name} has non-finite entries.")
    if np.any(values < 0):
      raise ValueError(
          f"scaling for {name} has negative entries; a gradient scale must be "
          ">= 0 (a branch contributes its scale squared)."
      )


def _fits(matrix: Any, kernel_size: tuple[int, int], channels: int) -> bool:
  shape = tuple(np.shape(matrix))
  return shape == kernel_size or shape == (*kernel_size, channels)


def spatial_gradient_scaling(
    scaling: Scaling = None,
    *,
    kernel_layout: _kernels.KernelLayoutSpec = "HWIO",
    mask: _kernels.MaskSpec | None = None,
    normalize: bool = False,
    strict: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies each 2-D conv kernel's gradient by a per-layer spatial matrix.

  For every eligible kernel (2-D conv, ``kh > 1`` and ``kw > 1``, the stem and
  depthwise convs included) the gradient ``g`` becomes ``S * g`` with ``S`` of
  shape ``(kh, kw)`` broadcast over the channel axes (or ``(kh, kw, C_out)``,
  one matrix per output channel). Every other leaf (biases, norm scales, dense
  kernels, 1x1, 1xK and Kx1 convs, 1-D and 3-D convs) passes through
  bit-identical.

  With ``S = branch_scaling(...)`` of a set of parallel branches, SGD on the
  merged conv is *exactly* SGD on the branched conv (plain, heavy-ball or
  Nesterov momentum, coupled L2 weight decay), without paying for the branches.

  Placement: for SGD-family optimizers put it first, before weight decay and
  momentum, as in the paper::

    optax.chain(sgs("acb"), optax.add_decayed_weights(5e-4),
                optax.sgd(0.1, momentum=0.9))

  Adam-family optimizers divide a constant per-coordinate gradient scale out
  again (``m / sqrt(v)``), so ``sgs`` before Adam does almost nothing. Put it
  *after* the optimizer instead, where it scales the update, i.e. acts as a
  per-position learning rate: ``optax.chain(optax.adamw(1e-3), sgs("acb"))``.

  This is a bare transform without a learning rate, deliberately unlike
  optax's ``name(learning_rate, ...)`` optimizer aliases: chain it with one.

  Args:
    scaling: what to multiply by.

      * ``None``: all ones (a no-op) until the matrices are refreshed from
        data with :func:`sgs_optax.refresh_scalings` (odd kernels only).
      * ``"acb"`` (KxK + 1xK + Kx1) or ``"repvgg"`` (KxK + 1x1): the exact
        matrix of those branches, built for each kernel's own size (odd
        kernels only).
      * an array of shape ``(kh, kw)``, used for every eligible kernel of that
        spatial size (other sizes are left alone), or ``(kh, kw, C_out)``.
      * a pytree with the structure of the params holding such an array or
        ``None`` at each leaf.
    kernel_layout: ``"HWIO"`` (Flax, Haiku), ``"OIHW"`` (PyTorch-style,
      Equinox), another layout string, or a params-shaped pytree (or callable
      ``params -> pytree``) of layout strings and ``None`` per leaf, e.g. for
      transposed convs (``"HWOI"``) or mixed models. A string applies to every
      leaf of its rank.
    mask: optional optax-style mask (pytree of booleans or callable); leaves
      where it is False are never scaled. It only ever restricts.
    normalize: divide each matrix by its mean (per output channel for
      per-channel matrices). Off by default so that presets are exactly
      equivalent to the branched network; with no weight decay in the chain,
      normalising is the same as dividing the learning rate by ``mean(S)``.
    strict: raise instead of silently leaving an eligible kernel unscaled
      (an even-sized kernel under a preset or the learned mode, or a kernel
      whose size no given ``(kh, kw)`` array fits).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SpatialScalingState`.

  Raises:
    ValueError: for an unknown preset or layout, a matrix that does not fit its
      kernel, a ``scaling`` pytree that does not match the params, negative or
      non-finite matrices, and (with ``strict=True``) unscaled kernels.

  Examples:
    >>> import jax.numpy as jnp, optax, sgs_optax
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)),
    ...                    "bias": jnp.ones(4)}}
    >>> tx = optax.chain(sgs_optax.sgs("acb"), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates["conv"]["kernel"][:, :, 0, 0]
    Array([[-0.1, -0.2, -0.1],
           [-0.2, -0.3, -0.2],
           [-0.1, -0.2, -0.1]], dtype=float32)

  References:
    Detkov et al., `Reparameterization through Spatial Gradient Scaling
    <https://arxiv.org/abs/2303.02733>`_, ICLR 2023.
  """
  if isinstance(scaling, str) and scaling not in _branches.PRESET_NAMES:
    _branches.preset_branches(scaling, (3, 3))  # raises with the valid names.
  is_single_array = not isinstance(scaling, str) and (
      isinstance(scaling, (np.ndarray, jax.Array))
  )
  if is_single_array:
    _check_matrix("all kernels", scaling)
  if isinstance(kernel_layout, str):
    _kernels.parse_layout(kernel_layout)

  def skip(name: str, reason: str) -> None:
    if strict:
      raise ValueError(f"sgs(strict=True): {name} is not scaled: {reason}.")
    return None

  def initial_matrix(name: str, layout, param, given) -> Any:
    """The starting matrix for one leaf, or None to leave it untouched."""
    if layout is None or not jnp.issubdtype(param.dtype, jnp.floating):
      if given is not None:
        raise ValueError(
            f"scaling has a matrix for {name}, which is not a selected 2-D "
            "conv kernel."
        )
      return None
    axes = _kernels.parse_layout(layout)
    if len(axes.spatial) != 2:
      return None  # 1-D and 3-D convs are not scaled.
    kernel_size = _kernels.spatial_shape(param, layout)
    channels = _kernels.output_channels(param, layout)
    if min(kernel_size) < 2:
      if given is not None and not is_single_array:
        raise ValueError(
            f"scaling has a matrix for {name}, whose {kernel_size} kernel is "
            "not scaled (1x1, 1xK and Kx1 kernels never are)."
        )
      return None
    if is_single_array:
      if tuple(np.shape(given)[:2]) != kernel_size:
        return skip(name, f"no {kernel_size} matrix was given")
      if not _fits(given, kernel_size, channels):
        raise ValueError(
            f"scaling of shape {np.shape(given)} does not fit {name} with "
            f"kernel size {kernel_size} and {channels} output channels."
        )
      matrix = given
    elif scaling is None or isinstance(scaling, str):
      if kernel_size[0] % 2 == 0 or kernel_size[1] % 2 == 0:
        return skip(name, f"its kernel size {kernel_size} is even")
      matrix = (
          np.ones(kernel_size) if scaling is None else
          _branches.branch_scaling(
              kernel_size, _branches.preset_branches(scaling, kernel_size)
          )
      )
    else:
      if given is None:
        return skip(name, "the scaling pytree holds None there")
      _check_matrix(name, given)
      if not _fits(given, kernel_size, channels):
        raise ValueError(
            f"scaling of shape {np.shape(given)} does not fit {name} with "
            f"kernel size {kernel_size} and {channels} output channels."
        )
      matrix = given
    dtype = jnp.promote_types(jnp.float32, param.dtype)
    matrix = jnp.asarray(matrix, dtype)
    if normalize:
      matrix = matrix / jnp.mean(matrix, axis=(0, 1), keepdims=True)
    return matrix

  def init_fn(params: optax.Params) -> SpatialScalingState:
    layouts = _kernels.resolve_layouts(params, kernel_layout, mask)
    if scaling is None or isinstance(scaling, str):
      given_tree = jax.tree.map(lambda _: None, layouts,
                                is_leaf=_kernels.is_layout_leaf)
    elif is_single_array:
      given_tree = jax.tree.map(
          lambda layout: None if layout is None else scaling, layouts,
          is_leaf=_kernels.is_layout_leaf,
      )
    else:
      given_tree = scaling
      try:
        jax.tree.map(lambda *_: None, layouts, given_tree,
                     is_leaf=_kernels.is_layout_leaf)
      except ValueError as e:
        raise ValueError(
            f"scaling pytree does not match the structure of the params: {e}"
        ) from None
    scalings = _kernels.map_layouts(initial_matrix, layouts, params,
                                    given_tree)
    if is_single_array and not any(
        s is not None for s in jax.tree.leaves(
            scalings, is_leaf=lambda x: x is None)
    ):
      raise ValueError(
          f"scaling of shape {np.shape(scaling)} does not fit any selected "
          "conv kernel of the params."
      )
    return SpatialScalingState(scalings=scalings)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    layouts = _kernels.resolve_layouts(updates, kernel_layout)

    def scale(name, matrix, grad, layout):
      if matrix is None:
        return grad
      if layout is None:
        raise ValueError(
            f"sgs has a matrix for {name} but kernel_layout gives no layout "
            "for it at update time."
        )
      factor = _kernels.broadcast_to_kernel(matrix, layout)
      return (grad * factor).astype(grad.dtype)

    scaled = _kernels.map_layouts(scale, state.scalings, updates, layouts)
    return scaled, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


sgs = spatial_gradient_scaling


def get_scalings(opt_state: optax.OptState) -> optax.Params:
  """Returns the matrices of the one SGS state inside an optimizer state.

  Args:
    opt_state: any optimizer state (a chain, ``masked``, ``partition``,
      ``inject_hyperparams`` ... nesting) holding one
      :class:`SpatialScalingState`.

  Returns:
    Its ``scalings`` tree: a matrix per scaled kernel, ``None`` elsewhere.

  Raises:
    ValueError: if there is no SGS state, or more than one.
  """
  states = find_states(opt_state)
  if len(states) != 1:
    raise ValueError(
        f"get_scalings expects exactly one SpatialScalingState in the "
        f"optimizer state, found {len(states)}."
    )
  return states[0].scalings


def _is_state(x: Any) -> bool:
  return isinstance(x, SpatialScalingState)


def find_states(opt_state: optax.OptState) -> list[SpatialScalingState]:
  """Every :class:`SpatialScalingState` inside ``opt_state``, in tree order."""
  return [
      x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)
  ]


def map_states(fn, opt_state: optax.OptState) -> optax.OptState:
  """Replaces every :class:`SpatialScalingState` ``s`` by ``fn(s)``."""
  return jax.tree.map(
      lambda x: fn(x) if _is_state(x) else x, opt_state, is_leaf=_is_state
  )
