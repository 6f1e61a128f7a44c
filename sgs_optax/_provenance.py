"""Which params leaf a traced value comes from, and along which of its axes.

The jaxpr walk of ``_capture.py`` carries a :class:`Provenance` beside every
value. It serves both of the walk's records: a conv's input is captured when
its kernel depends on exactly one params leaf, and the kernel's layout is
that leaf's axes named by the conv's dimension numbers, once the casts,
transposes, reshapes and scans between the leaf and the conv are composed.

A value's ``axes`` give, for each of its axes, the leaf axis it runs along
(``None`` for an axis that is not one of the leaf's, e.g. a broadcast one).
Structural primitives move them (``transpose``, ``reshape`` that only adds or
drops size-1 axes, ``squeeze``, ``broadcast_in_dim``, reductions); a
primitive whose operands have the output's shape keeps them when its
operands agree (casts, arithmetic with constants or with reductions of the
same leaf, as weight standardisation does, ``rev``). Anything else, a
reshape that merges or splits axes included, makes them unknown.

A primitive that keeps its operand's shape while mixing its axes would get
wrong axes here: the known ones (``dot_general``, ``gather`` ...) are listed
in ``_MIXING`` and give unknown axes.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from sgs_optax import _provenance
  >>> jaxpr = jax.make_jaxpr(lambda w: w.T.astype(jnp.bfloat16))(
  ...     jnp.ones((3, 5)))
  >>> prov = _provenance.of_leaf(0, 2)
  >>> for eqn in jaxpr.eqns:
  ...   (prov,) = _provenance.propagate(eqn, [prov])
  >>> prov.axes
  (1, 0)
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sgs_optax import _kernels

Axes = tuple[int | None, ...]
Letters = tuple[tuple[int, str], ...]  # (leaf axis, layout letter) pairs.

# Reductions: their `axes` parameter names the axes they remove.
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
    "reduce_or", "reduce_xor", "argmax", "argmin"})
# Primitives whose output may have an operand's shape while its axes are
# not that operand's axes.
_MIXING = frozenset({
    "dot_general", "conv_general_dilated", "gather", "ragged_dot",
    "triangular_solve", "custom_linear_solve"})


class Provenance(NamedTuple):
  """The params leaves a value depends on and, for one leaf, its axes.

  Attributes:
    leaves: the indices of the params leaves the value depends on.
    axes: with exactly one leaf, the leaf axis each value axis runs along
      (``None`` entries: no leaf axis); ``None`` when not known.
    scanned: the leaf axes that enclosing scans iterate over, outermost
      first (a scan body sees one slice of a kernel stacked by layer).
  """

  leaves: frozenset = frozenset()
  axes: Axes | None = None
  scanned: tuple[int, ...] = ()


NONE = Provenance()


def of_leaf(index: int, ndim: int) -> Provenance:
  """A params leaf itself."""
  return Provenance(frozenset([index]), tuple(range(ndim)))


def sliced(prov: Provenance) -> Provenance:
  """What a scan body sees of one iteration over ``prov``'s leading axis."""
  if prov.axes is None or len(prov.leaves) != 1:
    return prov._replace(axes=None)
  first, *rest = prov.axes
  scanned = prov.scanned + (() if first is None else (first,))
  return Provenance(prov.leaves, tuple(rest), scanned)


def carried(prov: Provenance) -> Provenance:
  """A scan's carry: it may change between iterations, so axes are lost."""
  return prov._replace(axes=None)


def _reshape(in_shape, out_shape, axes: Axes) -> Axes | None:
  """A reshape's axes if it only adds or drops size-1 axes, else None."""
  out, i, j = [], 0, 0
  while i < len(in_shape) or j < len(out_shape):
    if (i < len(in_shape) and j < len(out_shape)
        and in_shape[i] == out_shape[j]):
      out.append(axes[i])
      i, j = i + 1, j + 1
    elif i < len(in_shape) and in_shape[i] == 1:
      i += 1
    elif j < len(out_shape) and out_shape[j] == 1:
      out.append(None)
      j += 1
    else:
      return None  # Axes merged or split.
  return tuple(out)


def _structural(name: str, params: dict[str, Any], in_shape, out_shape,
                axes: Axes) -> Axes | None:
  """Axes through a primitive that moves, adds or removes axes."""
  if name == "transpose":
    return tuple(axes[p] for p in params["permutation"])
  if name == "reshape":
    if params.get("dimensions") is not None:
      axes = tuple(axes[p] for p in params["dimensions"])
      in_shape = tuple(in_shape[p] for p in params["dimensions"])
    return _reshape(in_shape, out_shape, axes)
  if name == "squeeze":
    gone = {d % len(in_shape) for d in params["dimensions"]}
    return tuple(a for i, a in enumerate(axes) if i not in gone)
  if name == "broadcast_in_dim":
    out = [None] * len(out_shape)
    for k, d in enumerate(params["broadcast_dimensions"]):
      if in_shape[k] == out_shape[d]:
        out[d] = axes[k]
    return tuple(out)
  # A reduction.
  gone = set(params["axes"])
  return tuple(a for i, a in enumerate(axes) if i not in gone)


def _same_shape(operands, out_shape) -> Axes | None:
  """Axes through an elementwise-like primitive: each axis keeps the leaf
  axis its operands agree on. Operands have the output's rank (size-1 axes
  broadcast, as lax's binary operations allow) or rank 0."""
  known = []
  for shape, axes in operands:
    if not shape:
      continue
    if (len(shape) != len(out_shape) or axes is None
        or any(s not in (o, 1) for s, o in zip(shape, out_shape))):
      return None
    # A broadcast size-1 axis runs along no leaf axis of the output.
    known.append([a if s == o else None
                  for a, s, o in zip(axes, shape, out_shape)])
  out = []
  for i in range(len(out_shape)):
    entries = {axes[i] for axes in known} - {None}
    if len(entries) > 1:
      return None
    out.append(next(iter(entries), None))
  return tuple(out)


def _shape(var) -> tuple[int, ...]:
  return tuple(getattr(var.aval, "shape", ()))


def _out_axes(eqn, inprovs, leaf: int) -> Axes | None:
  name = eqn.primitive.name
  if eqn.primitive.multiple_results or name in _MIXING:
    return None
  operands = [(_shape(v), p.axes) for v, p in zip(eqn.invars, inprovs)
              if leaf in p.leaves]
  out_shape = _shape(eqn.outvars[0])
  if name in _REDUCTIONS or name in ("transpose", "reshape", "squeeze",
                                     "broadcast_in_dim"):
    first = inprovs[0]
    if len(operands) != 1 or leaf not in first.leaves or first.axes is None:
      return None
    return _structural(name, eqn.params, _shape(eqn.invars[0]), out_shape,
                       first.axes)
  return _same_shape(operands, out_shape)


def propagate(eqn, inprovs: list[Provenance]) -> list[Provenance]:
  """The provenance of an equation's outputs from its operands'."""
  leaves = frozenset().union(*(p.leaves for p in inprovs))
  if len(leaves) != 1:
    return [Provenance(leaves)] * len(eqn.outvars)
  (leaf,) = leaves
  scanned = next(p.scanned for p in inprovs if p.leaves)
  return [Provenance(leaves, _out_axes(eqn, inprovs, leaf), scanned)
          ] * len(eqn.outvars)


def kernel_letters(prov: Provenance, rhs_spec) -> Letters | None:
  """The layout letter of each leaf axis a conv reads its kernel along.

  Args:
    prov: the provenance of the conv's kernel operand (one leaf).
    rhs_spec: the conv's kernel dimension numbers: the output-channel, the
      input-channel, then the spatial axes of the kernel operand.

  Returns:
    ``(leaf axis, letter)`` pairs: ``O``, ``I``, the spatial letters in the
    conv's order (``W``; ``H``, ``W``; ``D``, ``H``, ``W``) and ``L`` for an
    axis a scan iterates over; None if a conv axis is not one leaf axis.
  """
  n = len(rhs_spec) - 2
  if prov.axes is None or not 1 <= n <= 3:
    return None
  names = ("O", "I", *"DHW"[3 - n:])
  letters = {}
  for value_axis, letter in zip(rhs_spec, names):
    leaf_axis = prov.axes[value_axis]
    if leaf_axis is None or leaf_axis in letters:
      return None
    letters[leaf_axis] = letter
  for leaf_axis in prov.scanned:
    if leaf_axis in letters:
      return None
    letters[leaf_axis] = "L"
  return tuple(sorted(letters.items()))


def layout(letters: Letters | None, ndim: int) -> str | None:
  """The layout string of a leaf of rank ``ndim``, or None if the conv's
  axes are not a permutation of the leaf's (or not a valid layout)."""
  if letters is None or [a for a, _ in letters] != list(range(ndim)):
    return None
  string = "".join(letter for _, letter in letters)
  try:
    _kernels.parse_layout(string)
  except ValueError:
    return None  # e.g. two scans over one stack, or "L" not first.
  return string
