"""Which leaves of a params pytree are conv kernels, and where their axes are.

Every transform, the refresh and the capture in this package select kernels
through :func:`resolve_layouts`; none re-derives axes from shapes on its own.

A *layout* is a string of axis letters, one per array dimension:

* ``"O"``: the output-channel axis (exactly one);
* ``"I"``: the input-channel axis (exactly one);
* ``"D"``, ``"H"``, ``"W"``: spatial axes (each at most once);
* ``"L"``: a leading stack of layers (at most once, first), as ``nn.scan``
  or a ``jax.lax.scan`` over layers stores their kernels: ``"LHWIO"``.

Spatial letters are names, not positions: the conv reads its spatial axes in
the order ``D``, ``H``, ``W`` (its dimension numbers' order), whatever order
the parameter stores them in. ``"WHIO"`` is a kernel stored ``(kw, kh, I,
O)`` and transposed to ``(kh, kw, I, O)`` before the conv; it differs from
``"HWIO"``. SGS matrices are stored in the parameter's order (shape
``(kw, kh)`` for ``"WHIO"``); the refresh, which measures the conv's input,
computes them in the conv's order and moves them by these letters
(:func:`to_conv_order`, :func:`matrix_from_conv_order`).

Flax and Haiku conv kernels are ``"HWIO"``; PyTorch-style and Equinox conv
weights are ``"OIHW"``; Flax ``ConvTranspose(transpose_kernel=True)`` is
``"HWOI"``; PyTorch ``ConvTranspose2d`` weights are ``"IOHW"``; 1-D and 3-D
convs are e.g. ``"WIO"`` and ``"DHWIO"``; dense kernels are ``"IO"`` (Flax) or
``"OI"`` (PyTorch-style).

A *kernel layout spec*, as accepted by the public transforms, is one of:

* a layout string: applied to every leaf whose rank equals its length (so the
  default ``"HWIO"`` selects every 4-D leaf); with ``include_dense=True`` the
  string without its spatial letters is applied to every 2-D leaf. The
  transforms check each leaf a string selects with :func:`check_plausible`;
* a pytree with the structure of the params holding a layout string or
  ``None`` per leaf;
* a callable ``params -> such a pytree``.

A tree is an explicit statement and is not second-guessed;
:func:`sgs_optax.conv_layouts` reads one from the model itself.

Leaves that ``optax.masked`` or ``optax.partition`` replaced by
``optax.MaskedNode`` are never selected, whatever the spec says there.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

Layout: TypeAlias = str
LayoutTree: TypeAlias = Any  # a params-shaped pytree of `Layout | None`.
KernelLayoutSpec: TypeAlias = Layout | LayoutTree | Callable[[Any], LayoutTree]

_SPATIAL_LETTERS = "DHW"  # also the order in which a conv reads them.


class KernelAxes(NamedTuple):
  """Positions of a kernel's axes, parsed from a layout string.

  Attributes:
    spatial: the spatial axes in the parameter's order, e.g. ``(0, 1)`` for
      both ``"HWIO"`` and ``"WHIO"``.
    input: the input-channel axis.
    output: the output-channel axis.
    ndim: the number of axes.
    stack: the ``"L"`` axis of stacked layers, if any.
    conv_order: for each spatial axis of the conv, in ``D``, ``H``, ``W``
      order, its index in ``spatial``: ``(0, 1)`` for ``"HWIO"``, ``(1, 0)``
      for ``"WHIO"``.

  Examples:
    >>> from sgs_optax import parse_layout
    >>> parse_layout("LHWIO").stack, parse_layout("LHWIO").spatial
    (0, (1, 2))
    >>> parse_layout("WHIO").conv_order
    (1, 0)
  """

  spatial: tuple[int, ...]
  input: int
  output: int
  ndim: int
  stack: int | None = None
  conv_order: tuple[int, ...] = ()


@functools.cache
def parse_layout(layout: Layout) -> KernelAxes:
  """Parses and validates a layout string such as ``"HWIO"``.

  Args:
    layout: one letter per axis: ``O`` (output), ``I`` (input), spatial
      letters ``D``, ``H``, ``W``, and an optional leading ``L`` (a stack of
      layers).

  Returns:
    The axis positions.

  Raises:
    ValueError: if the string is not a valid layout.

  Examples:
    >>> from sgs_optax import parse_layout
    >>> parse_layout("OIHW")
    KernelAxes(spatial=(2, 3), input=1, output=0, ndim=4, stack=None,
               conv_order=(0, 1))
  """
  if not isinstance(layout, str):
    raise ValueError(
        f"kernel_layout must be a string such as 'HWIO' or 'OIHW', got "
        f"{layout!r}."
    )
  allowed = set(_SPATIAL_LETTERS + "IOL")
  bad = set(layout) - allowed
  if (bad or layout.count("O") != 1 or layout.count("I") != 1
      or any(layout.count(c) > 1 for c in _SPATIAL_LETTERS + "L")
      or layout.find("L") > 0):
    raise ValueError(
        f"Unknown kernel_layout {layout!r}: expected one 'O', one 'I', at "
        "most one each of the spatial letters 'D', 'H', 'W', and optionally "
        "a leading 'L' for stacked layers (for example 'HWIO' for Flax, "
        "'OIHW' for PyTorch-style weights, 'LHWIO' under nn.scan)."
    )
  spatial = tuple(i for i, c in enumerate(layout) if c in _SPATIAL_LETTERS)
  stack = 0 if layout.startswith("L") else None
  letters = [layout[a] for a in spatial]
  conv_order = tuple(sorted(range(len(spatial)),
                            key=lambda i: _SPATIAL_LETTERS.index(letters[i])))
  return KernelAxes(spatial, layout.index("I"), layout.index("O"),
                    len(layout), stack, conv_order)


def is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def is_layout_leaf(x: Any) -> bool:
  """Leaves of a layout tree: a layout string, ``None`` or a ``MaskedNode``."""
  return x is None or isinstance(x, str) or is_masked(x)


def path_name(path: tuple[Any, ...]) -> str:
  """A readable ``"a/b/kernel"`` name for a pytree key path."""
  return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def map_layouts(fn: Callable[..., Any], layouts: LayoutTree, *trees: Any):
  """`jax.tree.map` over a layout tree (whose ``None`` entries are leaves).

  ``fn(name, layout, *subtrees)`` is called once per entry of ``layouts``;
  ``name`` is the entry's :func:`path_name`, for messages and lookups.
  """
  return jax.tree.map_with_path(
      lambda p, layout, *xs: fn(path_name(p), layout, *xs),
      layouts,
      *trees,
      is_leaf=is_layout_leaf,
  )


def _dense_layout(layout: Layout) -> Layout:
  return "".join(c for c in layout if c not in _SPATIAL_LETTERS + "L")


def _from_rank(layout: Layout, include_dense: bool) -> Callable[[Any], Any]:
  conv = parse_layout(layout)
  dense = _dense_layout(layout)

  def pick(x):
    ndim = getattr(x, "ndim", None)
    if ndim == conv.ndim:
      return layout
    if include_dense and ndim == 2:
      return dense
    return None

  return pick


def _checked(name: str, x: Any, layout: Any) -> Layout | None:
  """A user-given layout for leaf ``x``, validated; None where masked out."""
  if layout is None or is_masked(x) or is_masked(layout):
    return None
  try:
    axes = parse_layout(layout)
  except ValueError as e:
    raise ValueError(f"At {name!r}: {e}") from None
  if getattr(x, "ndim", None) != axes.ndim:
    raise ValueError(
        f"kernel_layout {layout!r} at {name!r} has {axes.ndim} axes but the "
        f"leaf has shape {getattr(x, 'shape', None)}."
    )
  return layout


def _is_layout_function(spec: Any) -> bool:
  """A callable spec, as opposed to a layout tree that happens to be
  callable (an Equinox module holding layout strings, from conv_layouts)."""
  if not callable(spec):
    return False
  leaves = jax.tree.leaves(spec, is_leaf=is_layout_leaf)
  return not (leaves and all(is_layout_leaf(x) for x in leaves))


def resolve_layouts(
    tree: Any,
    kernel_layout: KernelLayoutSpec = "HWIO",
    *,
    include_dense: bool = False,
) -> LayoutTree:
  """Assigns a layout string, or ``None``, to every leaf of ``tree``.

  Args:
    tree: the params (or updates) pytree, possibly holding
      ``optax.MaskedNode`` where a wrapper masked leaves out.
    kernel_layout: a kernel layout spec (see the module docstring).
    include_dense: with a string ``kernel_layout``, also select 2-D leaves as
      dense kernels (the layout without its spatial letters).

  Returns:
    A pytree with the structure of ``tree`` (a ``MaskedNode`` counting as a
    leaf) holding a layout or ``None`` at each leaf. Map over it with
    :func:`map_layouts`.

  Raises:
    ValueError: for an unknown layout, a layout whose rank does not match its
      leaf, or a layout tree that does not match ``tree``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sgs_optax import resolve_layouts
    >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 2, 4)),
    ...                    "bias": jnp.zeros(4)}}
    >>> resolve_layouts(params)
    {'conv': {'bias': None, 'kernel': 'HWIO'}}
  """
  if isinstance(kernel_layout, str):
    return jax.tree.map(_from_rank(kernel_layout, include_dense), tree,
                        is_leaf=is_masked)
  layouts = (kernel_layout(tree) if _is_layout_function(kernel_layout)
             else kernel_layout)
  try:
    # `tree` first: each of its leaves (or MaskedNodes) meets one entry of
    # the layout tree, where `None` is an empty subtree.
    jax.tree.map(lambda *_: None, tree, layouts, is_leaf=is_masked)
  except ValueError as e:
    raise ValueError(
        f"kernel_layout pytree does not match the structure of the params: {e}"
    ) from None
  return jax.tree.map_with_path(
      lambda p, x, layout: _checked(path_name(p), x, layout),
      tree, layouts, is_leaf=is_masked,
  )


def check_selects_a_leaf(transform: str, tree: Any, layouts: LayoutTree,
                         kernel_layout: KernelLayoutSpec) -> None:
  """Raises when ``layouts`` select no leaf of ``tree``: the transform would
  silently do nothing. A tree whose leaves are all masked out, or that has
  none (the placeholder of ``optax.tree_utils.tree_map_params``), passes.
  """
  leaves = [x for x in jax.tree.leaves(tree, is_leaf=is_masked)
            if not is_masked(x)]
  if not leaves or any(jax.tree.leaves(layouts)):
    return
  ranks = sorted({np.ndim(x) for x in leaves})
  spec = kernel_layout if isinstance(kernel_layout, str) else "the given tree"
  raise ValueError(
      f"{transform}: kernel_layout {spec!r} selects none of the "
      f"{len(leaves)} parameter leaves left by any mask (their ranks: "
      f"{ranks}), so it would do nothing. Pass the layout of your conv "
      "kernels: e.g. 'OIHW' for Equinox or PyTorch-style weights, 'WIO' "
      "for 1-D convs, 'DHWIO' for 3-D convs, 'LHWIO' for layers stacked "
      "by a scan, or a per-leaf tree (sgs_optax.conv_layouts(model, ...) "
      "reads one from the model). Flattened params (optax.flatten) hold no "
      "kernel."
  )


def spatial_shape(x: jax.Array, layout: Layout) -> tuple[int, ...]:
  """The sizes of ``x`` along the spatial axes of ``layout``."""
  return tuple(x.shape[a] for a in parse_layout(layout).spatial)


def output_channels(x: jax.Array, layout: Layout) -> int:
  """The size of ``x`` along the output-channel axis of ``layout``."""
  return x.shape[parse_layout(layout).output]


def input_channels(x: jax.Array, layout: Layout) -> int:
  """The size of ``x`` along the input-channel axis of ``layout``."""
  return x.shape[parse_layout(layout).input]


def layers(x: jax.Array, layout: Layout) -> int | None:
  """The number of stacked layers (the ``"L"`` axis), or None."""
  stack = parse_layout(layout).stack
  return None if stack is None else x.shape[stack]


def to_conv_order(sizes: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
  """Per-spatial-axis values in the parameter's order, put in the conv's.

  Examples:
    >>> from sgs_optax import _kernels
    >>> _kernels.to_conv_order((5, 3), "WHIO")  # stored (kw, kh): H is 3.
    (3, 5)
  """
  return tuple(sizes[i] for i in parse_layout(layout).conv_order)


def matrix_from_conv_order(matrix: jax.Array, layout: Layout,
                           lead: int = 0) -> jax.Array:
  """Moves a matrix's spatial axes from the conv's order to the parameter's.

  Args:
    matrix: ``lead`` leading axes (e.g. one per stacked layer), the spatial
      axes in the conv's (``D``, ``H``, ``W``) order, then any other axes.
    layout: the kernel's layout.
    lead: how many leading axes stay in place.

  Returns:
    ``matrix`` with its spatial axes in the order ``layout`` stores them, as
    :func:`broadcast_to_kernel` reads them.
  """
  order = parse_layout(layout).conv_order
  if list(order) == sorted(order):
    return matrix  # Stored in the conv's order already.
  inverse = [lead + int(i) for i in np.argsort(order)]
  rest = range(lead + len(order), np.ndim(matrix))
  return jnp.transpose(matrix, (*range(lead), *inverse, *rest))


def _other_arrangements(axes: KernelAxes) -> tuple[Layout, ...]:
  """The standard layouts of the same rank that put the spatial axes
  elsewhere: spatial first (Flax's ``"HWIO"``) or last (``"OIHW"``)."""
  letters = _SPATIAL_LETTERS[len(_SPATIAL_LETTERS) - len(axes.spatial):]
  lead = "" if axes.stack is None else "L"
  return tuple(other for other in (lead + letters + "IO",
                                   lead + "OI" + letters)
               if parse_layout(other).spatial != axes.spatial)


def more_plausible_layout(shape: tuple[int, ...],
                          layout: Layout) -> Layout | None:
  """A standard layout that reads ``shape`` far more plausibly, or None.

  The rule of :func:`check_plausible`: ``layout`` reads some spatial size
  that is even and more than twice ``k``, while the other standard
  arrangement of the same rank (spatial axes first, as Flax's ``"HWIO"``, or
  last, as PyTorch's ``"OIHW"``) reads a ``k x k`` (``k``, ``k x k x k``)
  kernel with ``k`` odd and at least 3.

  Examples:
    >>> from sgs_optax import _kernels
    >>> _kernels.more_plausible_layout((32, 16, 3, 3), "HWIO")
    'OIHW'
    >>> print(_kernels.more_plausible_layout((3, 3, 16, 32), "HWIO"))
    None
  """
  axes = parse_layout(layout)
  if not axes.spatial or len(shape) != axes.ndim:
    return None
  size = [shape[a] for a in axes.spatial]
  for other in _other_arrangements(axes):
    sizes = {shape[a] for a in parse_layout(other).spatial}
    if len(sizes) != 1:
      continue
    (k,) = sizes
    if k >= 3 and k % 2 and any(s % 2 == 0 and s > 2 * k for s in size):
      return other
  return None


def _reading(shape: tuple[int, ...], layout: Layout) -> str:
  axes = parse_layout(layout)
  size = "x".join(str(shape[a]) for a in axes.spatial)
  return (f"a {size} kernel with {shape[axes.input]} input and "
          f"{shape[axes.output]} output channels")


def check_plausible(transform: str, tree: Any, layouts: LayoutTree,
                    kernel_layout: KernelLayoutSpec) -> None:
  """Raises when a layout string selects a leaf that is far more plausibly
  laid out otherwise: the one plausibility rule of ``sgs`` and ``cdg``.

  Applied to every leaf that a layout *string* selects, at init and at
  update. What it flags (see :func:`more_plausible_layout`): the string reads
  some spatial size that is even and more than twice ``k``, while the other
  standard arrangement reads a square odd ``k x k`` kernel, ``k >= 3``: a
  ``(32, 16, 3, 3)`` or ``(32, 1, 3, 3)`` PyTorch/Equinox weight under
  ``"HWIO"`` (a 32x16 "kernel" with 3 input and 3 output channels), a Flax
  ``(3, 3, 16, 32)`` kernel under ``"OIHW"``, and their 1-D, 3-D and
  stacked (``"L"``) forms. Real kernels read right never trip it: their
  spatial sizes are odd, or small next to the channel counts (3x3, 1x1,
  7x7 stems with 3 input channels, depthwise ``(3, 3, 1, C)``, 2x2 and 4x4
  kernels, 16x16 patch embeddings). It would flag an even kernel larger than
  twice an odd channel count equal on both sides, such as ``(8, 8, 3, 3)``.

  What no rule can catch: a leaf that reads plausibly either way (``(3, 3,
  5, 5)`` as HWIO or OIHW; kernels with even or odd channel counts too small
  to tell), a 4-D leaf that is no conv kernel at all (a positional
  embedding, a ``(3, 3, C, C)`` parameter used as a dense mixing), and a
  kernel whose spatial axes are stored in another order (``"WHIO"``). For
  those, :func:`sgs_optax.conv_layouts` reads each kernel's layout from the
  model. Layout trees are explicit statements and are not checked.

  Args:
    transform: the transform's name, for the message.
    tree: the params or updates.
    layouts: their layouts, from :func:`resolve_layouts`.
    kernel_layout: the spec the layouts were resolved from.

  Raises:
    ValueError: naming the leaf, both readings and the ways out.
  """
  if not isinstance(kernel_layout, str):
    return

  def check(name, layout, x):
    if layout is None or is_masked(x):
      return
    shape = tuple(np.shape(x))
    other = more_plausible_layout(shape, layout)
    if other is not None:
      raise ValueError(
          f"{transform}: kernel_layout {layout!r} reads {name!r} of shape "
          f"{shape} as {_reading(shape, layout)}; it is far more plausibly "
          f"{other!r}, {_reading(shape, other)}. Pass the layout of your "
          "conv kernels (Equinox and PyTorch-style weights are 'OIHW', Flax "
          "and Haiku kernels 'HWIO'), or kernel_layout=sgs_optax.conv_layouts("
          "model, ...), which reads every kernel's layout from the model. "
          "A layout tree is not checked: name this leaf's layout there if it "
          f"really is {layout!r}, or leave the leaf out with None there or "
          "with mask."
      )

  map_layouts(check, layouts, tree)


def sgs_skip_reason(x: Any, layout: Layout | None) -> str | None:
  """Why SGS leaves leaf ``x`` untouched, or ``None`` if it scales it.

  The one eligibility rule of Spatial Gradient Scaling, the same for 1-D,
  2-D and 3-D convs: a floating-point conv kernel whose spatial sizes are
  all at least 2 (the stem and depthwise convs included). A size-1 axis
  means the kernel mixes no neighbours along it, so there is no spatial
  redistribution of the gradient to make there: 1x1, 1xK and Kx1 2-D
  kernels (which the paper never scales), 1-tap 1-D kernels, and 3-D
  kernels such as ``(1, 3, 3)`` (the per-frame half of a factorised
  (2+1)-D block) or ``(3, 1, 1)`` are not scaled. Unselected leaves and
  leaves without spatial axes are not scaled either. Which matrix an
  eligible kernel gets (and whether a preset or the learned mode is defined
  for its size) is decided by :func:`sgs_optax.sgs`.
  """
  if layout is None:
    return "it is not a selected conv kernel"
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return f"its dtype {x.dtype} is not floating point"
  size = spatial_shape(x, layout)
  if not size:
    return f"its layout {layout!r} has no spatial axis"
  if min(size) < 2:
    return f"its kernel size {size} has an axis of size 1"
  return None


def broadcast_to_kernel(matrix: jax.Array, layout: Layout) -> jax.Array:
  """Reshapes a per-position matrix so that it broadcasts against a kernel.

  Args:
    matrix: shape ``spatial`` (e.g. ``(kh, kw)``) or ``spatial + (C_out,)``
      (one matrix per output channel), each preceded by ``(L,)`` for a
      layout with a stack axis (one matrix per stacked layer).
    layout: the kernel's layout.

  Returns:
    ``matrix`` with its axes moved to the kernel's (stack,) spatial (and
    output) axes and size-1 axes elsewhere.

  Raises:
    ValueError: if ``matrix`` has neither rank.
  """
  axes = parse_layout(layout)
  targets = [] if axes.stack is None else [axes.stack]
  targets += list(axes.spatial)
  if matrix.ndim == len(targets) + 1:
    targets.append(axes.output)
  elif matrix.ndim != len(targets):
    raise ValueError(
        f"A matrix of shape {matrix.shape} does not fit a kernel of layout "
        f"{layout!r}."
    )
  order = sorted(range(len(targets)), key=lambda i: targets[i])
  moved = jnp.transpose(matrix, order)
  shape = [1] * axes.ndim
  for i in order:
    shape[targets[i]] = matrix.shape[i]
  return moved.reshape(shape)
