"""Which leaves of a params pytree are conv kernels, and where their axes are.

Every transform, the refresh and the capture in this package select kernels
through :func:`resolve_layouts`; none re-derives axes from shapes on its own.

A *layout* is a string of axis letters, one per array dimension:

* ``"O"``: the output-channel axis (exactly one);
* ``"I"``: the input-channel axis (exactly one);
* ``"D"``, ``"H"``, ``"W"``: spatial axes (each at most once).

Flax and Haiku conv kernels are ``"HWIO"``; PyTorch-style and Equinox conv
weights are ``"OIHW"``; Flax ``ConvTranspose(transpose_kernel=True)`` is
``"HWOI"``; PyTorch ``ConvTranspose2d`` weights are ``"IOHW"``; 1-D and 3-D
convs are e.g. ``"WIO"`` and ``"DHWIO"``; dense kernels are ``"IO"`` (Flax) or
``"OI"`` (PyTorch-style).

A *kernel layout spec*, as accepted by the public transforms, is one of:

* a layout string: applied to every leaf whose rank equals its length (so the
  default ``"HWIO"`` selects every 4-D leaf); with ``include_dense=True`` the
  string without its spatial letters is applied to every 2-D leaf;
* a pytree with the structure of the params holding a layout string or
  ``None`` per leaf;
* a callable ``params -> such a pytree``.

A *mask* (optax style: a pytree of booleans, possibly a prefix of the params,
or a callable returning one) only ever removes leaves from the selection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp

Layout: TypeAlias = str
LayoutTree: TypeAlias = Any  # a params-shaped pytree of `Layout | None`.
KernelLayoutSpec: TypeAlias = Layout | LayoutTree | Callable[[Any], LayoutTree]
MaskSpec: TypeAlias = Any | Callable[[Any], Any]

_SPATIAL_LETTERS = "DHW"


class KernelAxes(NamedTuple):
  """Positions of a kernel's axes, parsed from a layout string."""

  spatial: tuple[int, ...]  # in layout order, e.g. (0, 1) for "HWIO".
  input: int
  output: int
  ndim: int


@functools.lru_cache(maxsize=None)
def parse_layout(layout: Layout) -> KernelAxes:
  """Parses and validates a layout string such as ``"HWIO"``.

  Args:
    layout: one letter per axis: ``O`` (output), ``I`` (input), and spatial
      letters ``D``, ``H``, ``W``.

  Returns:
    The axis positions.

  Raises:
    ValueError: if the string is not a valid layout.
  """
  if not isinstance(layout, str):
    raise ValueError(
        f"kernel_layout must be a string such as 'HWIO' or 'OIHW', got "
        f"{layout!r}."
    )
  allowed = set(_SPATIAL_LETTERS + "IO")
  bad = set(layout) - allowed
  if bad or layout.count("O") != 1 or layout.count("I") != 1 or any(
      layout.count(c) > 1 for c in _SPATIAL_LETTERS
  ):
    raise ValueError(
        f"Unknown kernel_layout {layout!r}: expected one 'O', one 'I' and at "
        "most one each of the spatial letters 'D', 'H', 'W' (for example "
        "'HWIO' for Flax, 'OIHW' for PyTorch-style weights)."
    )
  spatial = tuple(i for i, c in enumerate(layout) if c in _SPATIAL_LETTERS)
  return KernelAxes(spatial, layout.index("I"), layout.index("O"), len(layout))


def is_layout_leaf(x: Any) -> bool:
  return x is None or isinstance(x, str)


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def map_layouts(fn: Callable[..., Any], layouts: LayoutTree, *trees: Any):
  """`jax.tree.map` over a layout tree (whose ``None`` entries are leaves).

  ``fn(path, layout, *subtrees)`` is called once per entry of ``layouts``;
  ``path`` is a readable ``"a/b/kernel"`` name for error messages.
  """
  return jax.tree.map_with_path(
      lambda p, layout, *xs: fn(_path_name(p), layout, *xs),
      layouts,
      *trees,
      is_leaf=is_layout_leaf,
  )


def _dense_layout(layout: Layout) -> Layout:
  return "".join(c for c in layout if c not in _SPATIAL_LETTERS)


def resolve_layouts(
    tree: Any,
    kernel_layout: KernelLayoutSpec = "HWIO",
    mask: MaskSpec | None = None,
    *,
    include_dense: bool = False,
) -> LayoutTree:
  """Assigns a layout string, or ``None``, to every array leaf of ``tree``.

  Args:
    tree: the params (or updates) pytree.
    kernel_layout: a kernel layout spec (see the module docstring).
    mask: optional optax-style mask; leaves where it is False get ``None``.
    include_dense: with a string ``kernel_layout``, also select 2-D leaves as
      dense kernels (the layout without its spatial letters).

  Returns:
    A pytree with the structure of ``tree`` holding a layout or ``None`` at
    each leaf. Map over it with :func:`map_layouts`.

  Raises:
    ValueError: for an unknown layout, a layout whose rank does not match its
      leaf, or a layout tree that does not match ``tree``.
  """
  if isinstance(kernel_layout, str):
    conv = parse_layout(kernel_layout)
    dense = _dense_layout(kernel_layout)

    def from_rank(x):
      if getattr(x, "ndim", None) == conv.ndim:
        return kernel_layout
      if include_dense and getattr(x, "ndim", None) == 2:
        return dense
      return None

    layouts = jax.tree.map(from_rank, tree)
  else:
    layouts = kernel_layout(tree) if callable(kernel_layout) else kernel_layout
    try:
      jax.tree.map(lambda *_: None, layouts, tree, is_leaf=is_layout_leaf)
    except ValueError as e:
      raise ValueError(
          "kernel_layout pytree does not match the structure of the params: "
          f"{e}"
      ) from None

    def check(path, layout, x):
      if layout is None:
        return None
      try:
        axes = parse_layout(layout)
      except ValueError as e:
        raise ValueError(f"At {path!r}: {e}") from None
      if getattr(x, "ndim", None) != axes.ndim:
        raise ValueError(
            f"kernel_layout {layout!r} at {path!r} has {axes.ndim} axes but "
            f"the leaf has shape {getattr(x, 'shape', None)}."
        )
      return layout

    layouts = map_layouts(check, layouts, tree)

  if mask is None:
    return layouts
  mask_tree = mask(tree) if callable(mask) else mask
  try:
    return jax.tree.map(
        lambda keep, sub: sub if keep else jax.tree.map(lambda _: None, sub),
        mask_tree,
        layouts,
        is_leaf=lambda x: x is None,
    )
  except ValueError as e:
    raise ValueError(
        f"mask does not match the structure of the params: {e}"
    ) from None


def spatial_shape(x: jax.Array, layout: Layout) -> tuple[int, ...]:
  """The sizes of ``x`` along the spatial axes of ``layout``."""
  return tuple(x.shape[a] for a in parse_layout(layout).spatial)


def output_channels(x: jax.Array, layout: Layout) -> int:
  """The size of ``x`` along the output-channel axis of ``layout``."""
  return x.shape[parse_layout(layout).output]


def broadcast_to_kernel(
    matrix: jax.Array, layout: Layout, ndim: int | None = None
) -> jax.Array:
  """Reshapes a per-position matrix so that it broadcasts against a kernel.

  Args:
    matrix: shape ``spatial`` (e.g. ``(kh, kw)``), or ``spatial + (C_out,)``
      for one matrix per output channel.
    layout: the kernel's layout.
    ndim: unused beyond a consistency check; defaults to the layout's rank.

  Returns:
    ``matrix`` with its axes moved to the kernel's spatial (and output) axes
    and size-1 axes elsewhere.
  """
  axes = parse_layout(layout)
  if ndim is not None and ndim != axes.ndim:
    raise ValueError(f"layout {layout!r} does not have {ndim} axes.")
  targets = list(axes.spatial)
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
