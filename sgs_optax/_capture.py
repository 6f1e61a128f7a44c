"""Capturing every conv layer's input from a Flax model (linen or NNX).

The learned mode of SGS needs each conv's input feature maps, padded exactly
as the conv pads them. :func:`capture_conv_inputs` runs the model once and
returns them keyed like the params that the optimizer sees, without asking
the user to change their layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from sgs_optax._refresh import ConvInput

_COLLECTION = "sgs_conv_inputs"
_PADDING_MODES = {"CIRCULAR": "circular", "REFLECT": "reflect"}
_MODE_ATTRIBUTES = ("deterministic", "use_running_average")


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int]:
  if value is None:
    return (1, 1)
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2:
    raise ValueError(f"{name}={value} is not 2-D.")
  return value


def conv_geometry(conv: Any, inputs: jax.Array, name: str) -> dict[str, Any]:
  """Explicit pads, dilation and padding mode of a 2-D Flax conv (linen/NNX).

  Mirrors how ``flax.linen.Conv`` and ``flax.nnx.Conv`` turn their
  ``padding`` attribute into pads for an input of this spatial size.
  """
  kernel_size = _pair(conv.kernel_size, "kernel_size")
  strides = _pair(conv.strides, "strides")
  dilation = _pair(conv.kernel_dilation, "kernel_dilation")
  if _pair(conv.input_dilation, "input_dilation") != (1, 1):
    raise ValueError(f"Conv {name!r}: input_dilation is not supported.")
  dilated = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
  padding, mode = conv.padding, "zeros"
  if isinstance(padding, str):
    if padding in _PADDING_MODES:
      pads = tuple(((k - 1) // 2, k // 2) for k in dilated)
      mode = _PADDING_MODES[padding]
    elif padding in ("SAME", "VALID", "SAME_LOWER"):
      pads = jax.lax.padtype_to_pads(inputs.shape[-3:-1], dilated, strides,
                                     padding)
    else:
      raise ValueError(f"Conv {name!r}: padding {padding!r} is not supported "
                       "for a 2-D conv.")
  elif isinstance(padding, int):
    pads = ((padding, padding),) * 2
  else:
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  return dict(padding=tuple(tuple(int(v) for v in p) for p in pads),
              dilation=dilation, padding_mode=mode, kernel_size=kernel_size)


def _as_batch(inputs: jax.Array) -> jax.Array:
  """NHWC with one batch axis (Flax convs accept none or several)."""
  if inputs.ndim == 3:
    return inputs[None]
  return inputs.reshape((-1,) + inputs.shape[-3:])


def _nest(flat: dict[tuple[Any, ...], ConvInput]) -> dict[Any, Any]:
  tree: dict[Any, Any] = {}
  for path, record in flat.items():
    node = tree
    for key in path:
      node = node.setdefault(key, {})
    node["kernel"] = record
  return tree


def _merge_calls(name: str, calls: list[tuple[jax.Array, dict]]) -> ConvInput:
  geometries = {tuple(sorted(g.items())) for _, g in calls}
  shapes = {x.shape[1:] for x, _ in calls}
  if len(geometries) > 1 or len(shapes) > 1:
    raise ValueError(
        f"Conv {name!r} was called on inputs of different shapes or geometry "
        f"({sorted(shapes)}); their statistics cannot be pooled."
    )
  inputs = jnp.concatenate([x for x, _ in calls], axis=0)
  return ConvInput(inputs, **calls[0][1])


def _is_2d_conv(module: Any) -> bool:
  kernel_size = getattr(module, "kernel_size", None)
  return kernel_size is not None and len(_as_tuple(kernel_size)) == 2


def _as_tuple(value):
  return (value,) if isinstance(value, int) else tuple(value)


def capture_conv_inputs(model: Any, variables: Any = None, *args,
                        **kwargs) -> dict[Any, Any]:
  """Runs a Flax model once and returns every 2-D conv's input.

  For Flax linen, call ``capture_conv_inputs(model, variables, x, **kw)``;
  ``kw`` (e.g. ``train=False``) passes through to ``model.apply``, so eval mode
  is the caller's choice, and nothing is mutated (BatchNorm statistics stay as
  they were). For Flax NNX, call ``capture_conv_inputs(model, x, **kw)``: the
  model is switched to ``model.eval()`` for the call and its previous mode is
  restored afterwards. Works under ``jax.jit`` (linen) and ``nnx.jit`` (NNX).

  Args:
    model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
    variables: linen only: the variables dict (``{"params": ..., ...}``). For
      NNX this is the first positional input of the model.
    *args: the model's positional inputs.
    **kwargs: the model's keyword inputs.

  Returns:
    A sparse nested dict keyed exactly like the params that the optimizer sees
    (no top-level ``"params"``), holding a :class:`ConvInput` at each 2-D
    ``Conv`` kernel's position. A conv called several times holds its inputs
    concatenated along the batch.

  Raises:
    ValueError: for unsupported conv geometry (input dilation, causal
      padding), or a conv called on inputs of different shapes.
  """
  if isinstance(model, nnx.Module):
    return _capture_nnx(model, *((variables,) + args), **kwargs)
  if isinstance(model, nn.Module):
    return _capture_linen(model, variables, *args, **kwargs)
  raise TypeError(
      f"capture_conv_inputs expects a Flax linen or NNX module, got "
      f"{type(model).__name__}."
  )


def _capture_linen(model, variables, *args, **kwargs):
  if "mutable" in kwargs or "capture_intermediates" in kwargs:
    raise ValueError("capture_conv_inputs manages 'mutable' itself.")
  geometry: dict[tuple[str, ...], list[dict]] = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, nn.Conv)
        and _is_2d_conv(module)):
      inputs = _as_batch(call_args[0])
      path = tuple(module.scope.path)
      geometry.setdefault(path, []).append(
          conv_geometry(module, inputs, "/".join(path)))
      module.sow(_COLLECTION, "inputs", inputs)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    _, state = model.apply(variables, *args, mutable=[_COLLECTION], **kwargs)
  sown = state.get(_COLLECTION, {})
  flat = {}
  for path, geometries in geometry.items():
    node = sown
    for key in path:
      node = node[key]
    calls = list(zip(node["inputs"], geometries))
    flat[path] = _merge_calls("/".join(path), calls)
  return _nest(flat)


@contextlib.contextmanager
def _eval_mode(model):
  """Switches an NNX model to eval mode and restores each module's flags."""
  previous = []
  for _, module in nnx.iter_modules(model):
    for attribute in _MODE_ATTRIBUTES:
      if hasattr(module, attribute):
        previous.append((module, attribute, getattr(module, attribute)))
  model.eval()
  try:
    yield
  finally:
    for module, attribute, value in previous:
      setattr(module, attribute, value)


@contextlib.contextmanager
def _recording_nnx_convs(targets: dict[int, tuple[Any, ...]], calls: dict):
  """Temporarily records the inputs of the given ``nnx.Conv`` instances."""
  original = nnx.Conv.__call__

  def recording_call(self, inputs, *rest, **kw):
    path = targets.get(id(self))
    if path is not None:
      batch = _as_batch(inputs)
      name = "/".join(str(p) for p in path)
      calls.setdefault(path, []).append(
          (batch, conv_geometry(self, batch, name)))
    return original(self, inputs, *rest, **kw)

  nnx.Conv.__call__ = recording_call
  try:
    yield
  finally:
    nnx.Conv.__call__ = original


def _capture_nnx(model, *args, **kwargs):
  targets = {
      id(module): tuple(path)
      for path, module in nnx.iter_modules(model)
      if isinstance(module, nnx.Conv) and _is_2d_conv(module)
  }
  calls: dict[tuple[Any, ...], list] = {}
  with _eval_mode(model), _recording_nnx_convs(targets, calls):
    model(*args, **kwargs)
  return _nest({path: _merge_calls("/".join(str(p) for p in path), c)
                for path, c in calls.items()})
