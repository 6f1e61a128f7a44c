"""Spatial Gradient Scaling: one spatial matrix per conv kernel's gradient.

The transform and its state; what ``scaling`` means for each kernel is read
once, at init, into the state's table (see ``_scaling``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgs_optax import _frameworks
from sgs_optax import _kernels
from sgs_optax import _scaling
from sgs_optax._scaling import ScalingTable


class SpatialScalingState(NamedTuple):
  """State of :func:`spatial_gradient_scaling`.

  Attributes:
    scalings: a :class:`ScalingTable`: at each scaled kernel's path, its
      matrix of the kernel's spatial shape, e.g. ``(kh, kw)`` (or ``(kh, kw,
      C_out)``; with a leading ``(L,)`` for stacked layers), in float32 or in
      the parameter's dtype when that is wider.

  Examples:
    >>> import jax.numpy as jnp, optax, sgs_optax
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}
    >>> state = optax.chain(sgs_optax.sgs(), optax.sgd(0.1)).init(params)
    >>> sgs_state = optax.tree_utils.tree_get(state, "SpatialScalingState")
    >>> sgs_state.scalings.learned, sgs_state.scalings["conv/kernel"].shape
    (True, (3, 3))
  """

  scalings: ScalingTable


# Docs and reprs show the public name; doctest then finds the class's
# examples through `__test__` only.
SpatialScalingState.__module__ = "sgs_optax"
__test__ = {"SpatialScalingState": SpatialScalingState}


def _rank_skipped(params: Any, layouts: Any,
                  kernel_layout: _kernels.KernelLayoutSpec) -> tuple[str, ...]:
  """Float leaves of rank 3 or more that a layout string left out for their
  rank alone: conv kernels of another rank (1-D, 3-D, stacked by a scan)
  look like this, and the refresh, which sees the convs, tells."""
  if not isinstance(kernel_layout, str):
    return ()
  names = []

  def note(name, layout, x):
    if (layout is None and not _kernels.is_masked(x)
        and np.ndim(x) not in (0, 1, 2, len(kernel_layout))
        and jnp.issubdtype(jnp.result_type(x), jnp.floating)):
      names.append(name)

  _kernels.map_layouts(note, layouts, params)
  return tuple(names)


def _init_fn(spec: _scaling.Spec, learned: bool,
             kernel_layout: _kernels.KernelLayoutSpec, params: optax.Params
             ) -> SpatialScalingState:
  """Reads the spec for the params' kernels into the state's table."""
  params = _frameworks.plain_arrays(params)
  if not jax.tree.leaves(params, is_leaf=_kernels.is_masked):
    # `optax.tree_utils.tree_map_params` calls init with a leafless
    # placeholder to find the params-shaped parts of the state (optax's
    # own `masked` detects it too). The table is keyed by the real params,
    # so it cannot match an empty one: a leaf marks it as not params.
    return SpatialScalingState(scalings=jnp.zeros((0,), jnp.float32))
  layouts = _kernels.resolve_layouts(params, kernel_layout)
  _kernels.check_plausible("sgs", params, layouts, kernel_layout)
  read = _scaling.kernel_matrices(spec, learned, params, layouts)
  _scaling.check_something_scaled(spec, read, params, layouts, kernel_layout)
  by_rank = isinstance(kernel_layout, str)
  return SpatialScalingState(ScalingTable(
      read.matrices, jax.tree.structure(params, is_leaf=_kernels.is_masked),
      learned, read.shapes,
      selected_by=kernel_layout if by_rank else None,
      rank_skipped=(_rank_skipped(params, layouts, kernel_layout)
                    if learned else ()),
      source=None if learned else _scaling.digest(spec.scaling)))


def _scaled(table: ScalingTable, updates: Any, layouts: Any) -> Any:
  """The updates with each scaled kernel's gradient times its matrix."""
  seen = set()

  def scale(name, layout, grad):
    if name not in table:
      return grad
    if layout is None:
      raise _scaling.error("sgs", f"the state has a matrix for {name}, but "
                           "kernel_layout selects no kernel there at update "
                           "time")
    seen.add(name)
    factor = _kernels.broadcast_to_kernel(table[name], layout)
    return (grad * factor).astype(grad.dtype)

  scaled = _kernels.map_layouts(scale, layouts, updates)
  if seen != set(table):
    raise _scaling.error(
        "sgs", f"the state has matrices for {sorted(set(table) - seen)}, "
        "which the updates do not hold", "Pass updates shaped like the "
        "params the optimizer was initialised with")
  return scaled


def _scale_by_table(spec: _scaling.Spec, learned: bool,
                    kernel_layout: _kernels.KernelLayoutSpec
                    ) -> optax.GradientTransformationExtraArgs:
  """The unmasked transform: the state table and its application."""

  def init_fn(params: optax.Params) -> SpatialScalingState:
    return _init_fn(spec, learned, kernel_layout, params)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    layouts = _kernels.resolve_layouts(updates, kernel_layout)
    _kernels.check_plausible("sgs", updates, layouts, kernel_layout)
    if _scaling.rereads(spec, learned, state.scalings):
      state = state._replace(scalings=_scaling.reread(
          spec, state.scalings, updates, layouts))
    return _scaled(state.scalings, updates, layouts), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spatial_gradient_scaling(
    scaling: _scaling.Scaling = None,
    *,
    learn: bool | None = None,
    kernel_layout: _kernels.KernelLayoutSpec = "HWIO",
    mask: Any = None,
    normalize: bool = False,
    strict: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies each conv kernel's gradient by a per-layer spatial matrix.

  For every eligible kernel the gradient ``g`` becomes ``S * g``, with ``S``
  of the kernel's spatial shape (``(k,)``, ``(kh, kw)`` or ``(kd, kh, kw)``)
  broadcast over the channel axes, or with a trailing ``C_out`` axis (one
  matrix per output channel). Eligible, the same rule for 1-D, 2-D and 3-D
  convs: a floating-point kernel whose spatial sizes are all at least 2, the
  stem and depthwise convs included. A size-1 axis mixes no neighbours, so
  1x1, 1xK and Kx1 2-D kernels (never scaled in the paper), 1-tap 1-D
  kernels and 3-D kernels such as ``(1, 3, 3)`` pass through bit-identical,
  as do biases, norm scales and dense kernels.

  With ``S = branch_scaling(...)`` of a set of parallel branches, SGD on the
  merged conv is *exactly* SGD on the branched conv (plain, heavy-ball or
  Nesterov momentum, coupled L2 weight decay), without paying for the branches.

  Placement (exact for branched networks, see the placement guide): for
  SGD-family optimizers put it first, before weight decay and momentum, as in
  the paper, with ``S = branch_scaling(..., power=2)``:
  ``optax.chain(sgs("acb"), optax.add_decayed_weights(5e-4),
  optax.sgd(0.1, momentum=0.9))``. Scale-invariant optimizers (Adam, AdamW,
  RMSProp, Adagrad, Lion, sign descent) divide a gradient scale out again, so
  there it goes *after* the direction and before decoupled weight decay and
  the learning rate, with ``S1 = branch_scaling(..., power=1)`` (the presets
  have unit scales and serve both):
  ``optax.chain(optax.scale_by_adam(), sgs("acb"),
  optax.add_decayed_weights(1e-2), optax.scale_by_learning_rate(1e-3))``
  for AdamW.

  Args:
    scaling: what to multiply by.

      * ``None``: all ones (a no-op) until the matrices are refreshed from
        data with :func:`sgs_optax.refresh_scalings` (odd sizes only).
      * a preset: the exact matrix of a branch set, built for each kernel's
        own (odd) size, every branch centred, unit scales:

        - ``"acb"``: KxK + 1xK + Kx1 (ACNet), 2-D kernels only (in 1-D its
          asymmetric branches are the kernel itself or one tap; in 3-D they
          could be lines or planes: build the one you mean with
          :func:`sgs_optax.branch_scaling`);
        - ``"repvgg"``: the kernel + its centre tap (RepVGG's 3x3 + 1x1), any
          rank;
        - ``"replknet"``: the kernel + a centred 5 taps per axis (RepLKNet's
          large kernel with a parallel 5x5), every axis at least 5;
        - ``"unireplknet"``: the kernel + UniRepLKNet's dilated small kernels,
          for equal sizes 5 to 17 on every axis (e.g. 13: sizes (5, 7, 3, 3,
          3), dilations (1, 2, 3, 4, 5)); see
          :func:`sgs_optax.preset_branches`.

        The published blocks train a BatchNorm on every branch, so they match
        these presets only with frozen unit scales: the presets are their
        unit-scale analogues. A kernel a preset is not defined for is left
        alone (``strict=True`` raises); a preset that scales none of the
        selected kernels raises.
      * an array, used for every eligible kernel it fits, as the kernel's
        matrix (``size``, e.g. ``(3, 3)``) or one matrix per output channel
        (``(*size, C_out)``); a stacked kernel uses it for every layer.
        Kernels of another size are left alone. It must mean the same for
        every kernel: a ``(3, 3)`` array is the matrix of a 3x3 2-D kernel
        but one matrix per output channel of a 3-tap 1-D kernel with 3
        output channels, so params holding both raise (pass a pytree).
      * a pytree with the structure of the params holding such an array or
        ``None`` at each leaf; a stacked kernel's leaf may also hold one
        matrix per layer, ``(L, *size)`` or ``(L, *size, C_out)`` (one array
        for all kernels is never read per layer).

      Matrices are read at init; constant arrays are read again at every
      eager update, so that an eager change under
      ``optax.inject_hyperparams`` applies. Under ``jit`` pass
      ``static_args=("scaling",)``; a traced ``scaling`` raises.
    learn: whether :func:`sgs_optax.refresh_scalings` replaces the matrices
      with ones learned from data. Defaults to ``scaling is None``;
      ``sgs("acb", learn=True)`` starts from ACB and is refreshed. The
      refresh never touches a transform built with ``learn=False``.
    kernel_layout: ``"HWIO"`` (Flax, Haiku), ``"OIHW"`` (PyTorch-style,
      Equinox), another layout string (``"WIO"``, ``"OIW"``, ``"DHWIO"``,
      ``"OIDHW"`` for 1-D and 3-D convs, a leading ``"L"`` for stacked
      layers), or a params-shaped pytree (or callable ``params -> pytree``)
      of layout strings and ``None`` per leaf, e.g. for transposed convs
      (``"HWOI"``) or models mixing ranks. A string applies to every leaf of
      its rank, and a leaf it reads far less plausibly than the other
      standard arrangement raises (see :func:`sgs_optax.conv_layouts`, which
      reads each kernel's layout from the model, and the "Kernel layouts"
      how-to).
    mask: optional optax-style mask (a pytree of booleans, possibly a prefix
      of the params, or a callable returning one); the transform is then
      ``optax.masked(..., mask)`` and leaves where it is False are never
      scaled.
    normalize: divide each matrix by its mean (per output channel for
      per-channel matrices). Off by default so that presets are exactly
      equivalent to the branched network; with no weight decay in the chain,
      normalising is the same as dividing the learning rate by ``mean(S)``.
    strict: raise instead of silently leaving an eligible kernel unscaled
      (an even-sized kernel under a preset or the learned mode, a kernel a
      preset is not defined for, or a kernel the given array does not fit).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SpatialScalingState` (inside an ``optax.MaskedState`` with
    ``mask``).

  Raises:
    ValueError: for an unknown preset or layout, a preset that scales no
      selected kernel, a matrix that does not fit its kernel, an array that
      fits kernels with different meanings or has a per-layer shape, a
      ``scaling`` pytree that does not match the params, a matrix that is
      not an array, negative, non-finite, or of mean 0 with
      ``normalize=True``, a layout string that
      misreads a leaf (e.g. a ``(32, 16, 3, 3)`` OIHW weight under
      ``"HWIO"``), and (with ``strict=True``) unscaled kernels.

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
    >>> conv1d = {"kernel": jnp.ones((7, 2, 4))}  # a 7-tap 1-D conv
    >>> state = sgs_optax.sgs("unireplknet", kernel_layout="WIO").init(conv1d)
    >>> sgs_optax.get_scalings(state)["kernel"]
    Array([2., 3., 2., 4., 2., 3., 2.], dtype=float32)

  References:
    Detkov et al., `Reparameterization through Spatial Gradient Scaling
    <https://arxiv.org/abs/2303.02733>`_, ICLR 2023.
    Ding et al., `Scaling Up Your Kernels to 31x31
    <https://arxiv.org/abs/2203.06717>`_, CVPR 2022 (RepLKNet).
    Ding et al., `UniRepLKNet <https://arxiv.org/abs/2311.15599>`_, CVPR 2024.
  """
  spec = _scaling.read_spec(scaling, normalize, strict,
                            isinstance(kernel_layout, str))
  if isinstance(kernel_layout, str):
    _kernels.parse_layout(kernel_layout)  # Fail here, not at init.
  learned = scaling is None if learn is None else bool(learn)
  tx = _scale_by_table(spec, learned, kernel_layout)
  return tx if mask is None else optax.masked(tx, mask)


sgs = spatial_gradient_scaling


def sgs_states(opt_state: optax.OptState) -> list[tuple[Any, Any]]:
  """Every :class:`SpatialScalingState` in ``opt_state`` with its path."""
  return optax.tree_utils.tree_get_all_with_path(
      opt_state, "SpatialScalingState")


def get_scalings(opt_state: optax.OptState) -> optax.Params:
  """Returns the matrices of the one SGS state inside an optimizer state.

  Args:
    opt_state: any optimizer state (a chain, ``masked``, ``partition``,
      ``inject_hyperparams`` ... nesting) holding one
      :class:`SpatialScalingState`.

  Returns:
    A tree with the structure of the params the transform was initialised
    with: the matrix at each scaled kernel, ``None`` elsewhere (and where a
    wrapper masked the params out).

  Raises:
    ValueError: if there is no SGS state, or more than one.

  Examples:
    >>> import jax.numpy as jnp, optax, sgs_optax
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)),
    ...                    "bias": jnp.ones(4)}}
    >>> state = optax.chain(sgs_optax.sgs("repvgg"), optax.sgd(0.1)).init(
    ...     params)
    >>> scalings = sgs_optax.get_scalings(state)
    >>> scalings["conv"]["bias"] is None
    True
    >>> scalings["conv"]["kernel"]
    Array([[1., 1., 1.],
           [1., 2., 1.],
           [1., 1., 1.]], dtype=float32)
  """
  states = sgs_states(opt_state)
  if len(states) != 1:
    raise _scaling.error("get_scalings", "expects exactly one "
                         "SpatialScalingState in the optimizer state, found "
                         f"{len(states)}")
  table = states[0][1].scalings
  if not isinstance(table, ScalingTable):
    raise _scaling.error("get_scalings", "the SpatialScalingState was "
                         "initialised without params (e.g. by optax.tree_utils"
                         ".tree_map_params) and holds no matrices")
  return table.as_params_tree()
