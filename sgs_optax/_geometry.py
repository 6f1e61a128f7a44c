"""Conv geometry, resolved once: sizes per axis and explicit pads.

A conv's padding can be given in several spellings: lax's strings, Flax's
strings that pad the input before a ``VALID`` conv, an int, or per-axis pads.
The statistics of SGS's learned mode and the branched baseline both need the
pads the conv really applies, per spatial axis, and what the padding is filled
with. This module is the one place that turns any spelling into that, for any
number of spatial axes, by the same rules as :func:`jax.lax.padtype_to_pads`
and :class:`flax.linen.Conv`. It also holds :class:`ConvInput`, the record of
a captured conv input with the geometry its kernel reads it with.

Example:
  >>> from sgs_optax import _geometry
  >>> _geometry.explicit_pads(
  ...     "SAME", spatial_shape=(8, 8), kernel_size=(3, 3), strides=2)
  (((0, 1), (0, 1)), 'zeros')
  >>> _geometry.explicit_pads(
  ...     "CIRCULAR", spatial_shape=(8,), kernel_size=4)
  (((1, 2),), 'circular')
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import operator
from typing import Any, TypeAlias

import jax
import numpy as np

Pads: TypeAlias = tuple[tuple[int, int], ...]
PaddingLike: TypeAlias = str | int | Sequence[int | Sequence[int]]

PAD_MODES = ("zeros", "circular", "reflect")
# How `jnp.pad` spells each of `PAD_MODES`.
JNP_PAD_MODES = {"zeros": "constant", "circular": "wrap", "reflect": "reflect"}
_LAX_STRINGS = ("SAME", "SAME_LOWER", "VALID")
# Flax pads the input with these fills, then runs a VALID conv.
_FLAX_FILLS = {"CIRCULAR": "circular", "REFLECT": "reflect"}


def _as_int(value: Any, name: str) -> int:
  # bool is an int subclass and numpy booleans convert with __index__ on some
  # versions: neither is a size.
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must hold ints, got the bool {value!r}.")
  if isinstance(value, (int, np.integer)):
    return operator.index(value)
  raise ValueError(f"{name} must hold ints, got {value!r}.")


def as_sizes(
    value: Any, n: int, name: str, *, minimum: int | None = None
) -> tuple[int, ...]:
  """Reads one int per spatial axis, as lax and Flax accept sizes.

  Args:
    value: an int (broadcast to ``n`` axes) or a sequence of ``n`` ints;
      numpy integers are accepted.
    n: the number of spatial axes.
    name: the argument's name, for error messages.
    minimum: if given, every size must be at least this.

  Returns:
    A tuple of ``n`` Python ints.

  Raises:
    ValueError: for bools, floats, strings, a sequence of the wrong length, or
      a size below ``minimum``; the message names ``name``.
  """
  if isinstance(value, np.ndarray) and value.ndim == 1:
    value = value.tolist()
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != n:
      raise ValueError(
          f"{name} must be an int or {n} ints (one per spatial axis), got "
          f"{value!r}."
      )
    sizes = tuple(_as_int(v, name) for v in value)
  else:
    try:
      sizes = (_as_int(value, name),) * n
    except ValueError:
      raise ValueError(
          f"{name} must be an int or {n} ints (one per spatial axis), got "
          f"{value!r}."
      ) from None
  if minimum is not None and any(s < minimum for s in sizes):
    raise ValueError(f"{name} must be at least {minimum}, got {sizes}.")
  return sizes


def dilated_kernel(
    kernel_size: Sequence[int], dilation: Sequence[int]
) -> tuple[int, ...]:
  """Span of each axis of a dilated kernel: ``(k - 1) * d + 1``."""
  return tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))


def _pads_from_sequence(padding: Sequence[Any], n: int) -> Pads:
  """Flax's per-axis spelling: an int (symmetric) or a (lo, hi) pair each."""
  if isinstance(padding, np.ndarray):
    padding = padding.tolist()
  if len(padding) != n:
    raise ValueError(
        f"padding {padding!r} must give one entry per spatial axis ({n})."
    )
  pads = []
  for entry in padding:
    if isinstance(entry, (Sequence, np.ndarray)) and not isinstance(entry, str):
      lo, hi = as_sizes(entry, 2, "each (lo, hi) padding pair")
    else:
      lo = hi = _as_int(entry, "padding")
    pads.append((lo, hi))
  return tuple(pads)


def _pads_from_string(
    name: str,
    spatial_shape: tuple[int, ...],
    span: tuple[int, ...],
    strides: tuple[int, ...],
    padding_mode: str,
) -> tuple[Pads, str]:
  if name in _LAX_STRINGS:
    pads = jax.lax.padtype_to_pads(spatial_shape, span, strides, name)
    return tuple((int(lo), int(hi)) for lo, hi in pads), padding_mode
  if name in _FLAX_FILLS:
    fill = _FLAX_FILLS[name]
    # Flax pads these whatever the stride, then convolves VALID.
    return tuple(((s - 1) // 2, s // 2) for s in span), fill
  if name == "CAUSAL":
    if len(span) != 1:
      raise ValueError(
          "padding='CAUSAL' is only defined for 1-D convs (as in Flax), got "
          f"{len(span)} spatial axes."
      )
    return ((span[0] - 1, 0),), "zeros"
  raise ValueError(
      f"Unsupported padding {name!r}: expected 'SAME', 'SAME_LOWER', 'VALID', "
      "'CIRCULAR', 'REFLECT', 'CAUSAL', an int, or one int or (lo, hi) pair "
      "per spatial axis."
  )


def explicit_pads(
    padding: PaddingLike,
    *,
    spatial_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    padding_mode: str = "zeros",
) -> tuple[Pads, str]:
  """The pads a conv applies to its input, per spatial axis, and their fill.

  Args:
    padding: the conv's padding. ``"SAME"``, ``"SAME_LOWER"`` or ``"VALID"``
      are resolved with :func:`jax.lax.padtype_to_pads`, using ``strides`` and
      the dilated kernel, exactly as lax pads the conv (``"SAME"`` with stride
      2 can pad asymmetrically). Flax's ``"CIRCULAR"`` and ``"REFLECT"`` pad
      ``((k_eff - 1) // 2, k_eff // 2)`` per axis whatever the stride and
      imply that fill; Flax's ``"CAUSAL"`` (1-D only) pads ``(k_eff - 1, 0)``
      with zeros. Strings are case-insensitive. An int pads every side by it;
      a sequence gives, per spatial axis, an int (both sides) or a ``(lo,
      hi)`` pair, as Flax accepts it.
    spatial_shape: the input's spatial sizes (its rank sets the axis count).
    kernel_size: the kernel's spatial sizes, an int or one per axis.
    strides: the conv's strides, an int or one per axis.
    dilation: the kernel dilation, an int or one per axis.
    padding_mode: the fill: ``"zeros"``, ``"circular"`` (wrap around) or
      ``"reflect"`` (mirror without repeating the edge, as ``jnp.pad``'s
      ``"reflect"``).

  Returns:
    ``(pads, mode)``: a ``(lo, hi)`` pair of Python ints per spatial axis, and
    the fill mode, one of :data:`PAD_MODES`.

  Raises:
    ValueError: for an unknown string or padding mode, a padding mode that
      conflicts with a Flax string, ``"CAUSAL"`` on more than one axis,
      negative pads, or sizes of the wrong length or type.
  """
  spatial_shape = as_sizes(
      tuple(spatial_shape), len(spatial_shape), "spatial_shape", minimum=0
  )
  n = len(spatial_shape)
  kernel_size = as_sizes(kernel_size, n, "kernel_size", minimum=1)
  strides = as_sizes(strides, n, "strides", minimum=1)
  dilation = as_sizes(dilation, n, "dilation", minimum=1)
  if padding_mode not in PAD_MODES:
    raise ValueError(
        f"padding_mode must be one of {PAD_MODES}, got {padding_mode!r}."
    )
  if isinstance(padding, str):
    span = dilated_kernel(kernel_size, dilation)
    pads, mode = _pads_from_string(
        padding.upper(), spatial_shape, span, strides, padding_mode
    )
    if padding_mode not in ("zeros", mode):
      raise ValueError(
          f"padding={padding!r} implies padding_mode={mode!r}, got "
          f"padding_mode={padding_mode!r}."
      )
  elif isinstance(padding, (Sequence, np.ndarray)):
    pads, mode = _pads_from_sequence(padding, n), padding_mode
  else:
    lo = _as_int(padding, "padding")
    pads, mode = ((lo, lo),) * n, padding_mode
  if any(p < 0 for pair in pads for p in pair):
    raise ValueError(f"Negative padding is not supported, got {padding!r}.")
  return pads, mode


def _as_tuple(value: Any) -> Any:
  """Hashable, plain-int form of a geometry field (for static metadata)."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, (Sequence, np.ndarray)):
    return tuple(_as_tuple(v) for v in value)
  return int(value)


@dataclasses.dataclass(frozen=True)
class ConvInput:
  """A conv layer's input and the geometry its kernel reads it with.

  Attributes:
    inputs: the input feature maps, channels last: ``(N, *spatial, C)``, or
      ``(L, N, *spatial, C)`` for a stack of ``L`` layers (``nn.scan``). A
      transposed (input-dilated) conv's input is recorded dilated, zeros
      inserted, as its kernel sees it; a conv whose framework pads before the
      conv (Flax's ``CIRCULAR``, ``REFLECT``) is recorded padded, with
      ``VALID`` padding.
    padding: explicit ``(low, high)`` pads per spatial axis (or a padding
      string that :func:`sgs_optax.spatial_dependence` accepts).
    dilation: the kernel dilation per spatial axis (default 1).
    padding_mode: ``"zeros"``, ``"circular"`` or ``"reflect"``.
    kernel_size: the conv's kernel size per spatial axis, checked against
      the SGS state when given.
    strides: the conv's strides per spatial axis (the statistics ignore
      them, as the paper's code does).
    feature_group_count: the conv's feature groups: ``C`` must equal the
      kernel's input channels times this.

  Examples:
    >>> import jax.numpy as jnp, sgs_optax
    >>> record = sgs_optax.ConvInput(jnp.ones((2, 8, 8, 3)), ((1, 1), (1, 1)),
    ...                              kernel_size=(3, 3))
    >>> record.inputs.shape, record.padding
    ((2, 8, 8, 3), ((1, 1), (1, 1)))
  """

  inputs: jax.Array
  padding: Any
  dilation: tuple[int, ...] | None = None
  padding_mode: str = "zeros"
  kernel_size: tuple[int, ...] | None = None
  strides: tuple[int, ...] | None = None
  feature_group_count: int = 1

  def __post_init__(self):
    for name in ("padding", "dilation", "kernel_size", "strides",
                 "feature_group_count"):
      object.__setattr__(self, name, _as_tuple(getattr(self, name)))


jax.tree_util.register_dataclass(
    ConvInput,
    data_fields=["inputs"],
    meta_fields=["padding", "dilation", "padding_mode", "kernel_size",
                 "strides", "feature_group_count"],
)
