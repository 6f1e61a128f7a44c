"""Refreshing SGS matrices in an optimizer state from captured conv inputs.

The learned mode of SGS (Detkov et al., 2023) recomputes each layer's matrix
from the mutual information between neighbouring pixels of the layer's input
every few epochs. This module holds the record of a captured conv input
(:class:`ConvInput`) and the jittable :func:`refresh_scalings`; capturing the
inputs from a Flax model lives in ``_capture.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sgs_optax import _dependence
from sgs_optax import _spatial

Pads = tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class ConvInput:
  """A conv layer's input and the geometry it is padded and read with.

  Attributes:
    inputs: the input feature maps, NHWC, unpadded; a layer called several
      times holds its inputs concatenated along the batch.
    padding: the conv's explicit ``((top, bottom), (left, right))`` pads for
      these inputs (lax ``SAME`` with stride 2 pads asymmetrically).
    dilation: the conv's kernel dilation ``(dh, dw)``.
    padding_mode: ``"zeros"``, ``"circular"`` or ``"reflect"``.
    kernel_size: the conv's ``(kh, kw)``, checked against the SGS state.
  """

  inputs: jax.Array
  padding: Pads
  dilation: tuple[int, int] = (1, 1)
  padding_mode: str = "zeros"
  kernel_size: tuple[int, int] | None = None


jax.tree_util.register_dataclass(
    ConvInput,
    data_fields=["inputs"],
    meta_fields=["padding", "dilation", "padding_mode", "kernel_size"],
)


def _raw_key(entry: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  raise TypeError(f"Unsupported pytree path entry {entry!r}.")


def _lookup(captured: Any, path) -> ConvInput | None:
  node = captured
  for entry in path:
    if isinstance(node, ConvInput) or node is None:
      return None
    try:
      node = node[_raw_key(entry)]
    except (KeyError, IndexError, TypeError):
      return None
  return node if isinstance(node, ConvInput) else None


def _captured_paths(captured: Any) -> list[tuple[Any, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(
      captured, is_leaf=lambda x: isinstance(x, ConvInput))[0]
  return [tuple(_raw_key(e) for e in path) for path, _ in leaves]


def _name(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def refresh_scalings(
    opt_state: optax.OptState,
    captured: Any,
    *,
    k: float = 5.0,
    diagonal_removal: bool = False,
) -> optax.OptState:
  """Recomputes every SGS matrix from captured conv inputs.

  For each kernel that an SGS state scales and that has a captured input, the
  new matrix is ``D / mean(D)`` with ``D = spatial_dependence(inputs, ...)``
  computed with the conv's own padding, dilation and padding mode. A layer
  whose new matrix has a NaN (e.g. every channel constant) keeps its previous
  matrix, as do kernels with no captured input. Per-channel ``(kh, kw, C_out)``
  matrices get the layer's matrix broadcast over channels. The state's shapes
  and dtypes never change, so a jitted train step does not recompile.

  Jittable: ``jax.jit(refresh_scalings, static_argnames=("k",
  "diagonal_removal"))``. Call it every few epochs, outside the train step.

  Args:
    opt_state: an optimizer state holding one or more
      :class:`SpatialScalingState` anywhere (``chain``, ``masked``,
      ``partition``, ``inject_hyperparams`` ...); each is refreshed.
    captured: a nested dict keyed like the params, holding a
      :class:`ConvInput` at each conv kernel's position, as returned by
      :func:`sgs_optax.capture_conv_inputs`.
    k: the NMI sharpening constant (5 in the paper).
    diagonal_removal: use the paper's ImageNet variant of the statistics.

  Returns:
    The optimizer state with new matrices.

  Raises:
    ValueError: if there is no SGS state, if a captured layer is not in any
      SGS state's tree, or if a captured kernel size does not match the state.

  References:
    Detkov et al., `Reparameterization through Spatial Gradient Scaling
    <https://arxiv.org/abs/2303.02733>`_, ICLR 2023.
  """
  states = _spatial.find_states(opt_state)
  if not states:
    raise ValueError("refresh_scalings found no SpatialScalingState in the "
                     "optimizer state.")
  known = set()
  for state in states:
    for path, _ in jax.tree_util.tree_flatten_with_path(
        state.scalings,
        is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode))[0]:
      known.add(tuple(_raw_key(e) for e in path))
  for path in _captured_paths(captured):
    if path not in known:
      raise ValueError(
          f"captured conv input {_name(path)!r} has no matching parameter in "
          "the SGS state: are the captured and optimizer trees from the same "
          "model (and keyed without a top-level 'params')?"
      )

  def refresh_one(path, matrix):
    if matrix is None:
      return None
    record = _lookup(captured, path)
    if record is None:
      return matrix
    kernel_size = tuple(matrix.shape[:2])
    name = _name(tuple(_raw_key(e) for e in path))
    if record.kernel_size is not None and tuple(
        record.kernel_size) != kernel_size:
      raise ValueError(
          f"captured conv {name!r} has kernel size {record.kernel_size} but "
          f"its SGS matrix has shape {matrix.shape}."
      )
    try:
      dependence = _dependence.spatial_dependence(
          record.inputs,
          kernel_size,
          padding=record.padding,
          k=k,
          diagonal_removal=diagonal_removal,
          dilation=record.dilation,
          padding_mode=record.padding_mode,
      )
    except ValueError as e:
      raise ValueError(f"Layer {name!r}: {e}") from None
    new = _dependence.dependence_to_scaling(dependence)
    new = jnp.broadcast_to(
        new.reshape(new.shape + (1,) * (matrix.ndim - 2)), matrix.shape)
    return jnp.where(jnp.any(jnp.isnan(new)), matrix, new.astype(matrix.dtype))

  def refresh_state(state):
    scalings = jax.tree_util.tree_map_with_path(
        refresh_one, state.scalings, is_leaf=lambda x: x is None)
    return state._replace(scalings=scalings)

  return _spatial.map_states(refresh_state, opt_state)
