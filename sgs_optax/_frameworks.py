"""Everything that knows about Flax or Equinox, in one place.

The core only depends on jax, optax, chex and numpy. Flax (linen, NNX) and
Equinox are optional: this module never imports them, it looks them up in
``sys.modules``, where they are as soon as the user has imported them (a
model of a framework that is not imported cannot exist). It holds the
capture's front doors (how a linen, NNX or Equinox module becomes a plain
``fn(params, *inputs)``), the handling of NNX ``Variable`` trees and of Flax
metadata boxes, and the registration of a class with
``flax.serialization``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import importlib.util
import sys
from typing import Any

import jax


def flax_installed() -> bool:
  """Whether Flax can be imported (without importing it)."""
  return importlib.util.find_spec("flax") is not None


def _module(name: str) -> Any:
  """The framework module ``name`` if the user imported it, else None."""
  return sys.modules.get(name)


# Capture's front doors. Each takes the public entry point's name (for
# messages) and its arguments, and returns ``(fn, params, args, kwargs)`` for
# a plain call ``fn(params, *args, **kwargs)``.


def _linen(entry, model, variables, /, *args, **kwargs):
  if "mutable" in kwargs:
    raise ValueError(
        f"{entry} applies the model with mutable=True and discards every "
        "mutation (BatchNorm statistics, sown values): drop mutable=. The "
        "paper captures in eval mode: pass e.g. train=False."
    )
  if not isinstance(variables, Mapping) or "params" not in variables:
    found = (f"keys {sorted(map(str, variables))}"
             if isinstance(variables, Mapping)
             else f"a value of type {type(variables).__name__}")
    raise ValueError(
        f"{entry}(linen_model, variables, *inputs): pass the variables dict "
        "({'params': ...}, plus e.g. 'batch_stats') that the model is "
        f"applied with, not the params alone; got {found}."
    )

  # The other collections (e.g. batch statistics) are traced inputs too,
  # so that conv_layouts takes abstract ones.
  rest = {k: v for k, v in variables.items() if k != "params"}

  def fn(params, others, *a, **kw):
    return model.apply({**others, "params": params}, *a, mutable=True, **kw)

  return fn, variables["params"], (rest, *args), kwargs


def _nnx(entry, model, /, *args, **kwargs):
  del entry
  nnx = _module("flax.nnx")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def fn(pure_params, *a, **kw):
    copy = nnx.merge(graphdef, pure_params, rest)  # a copy: `model` stays.
    copy.eval()
    return copy(*a, **kw)

  return fn, nnx.as_pure(params), args, kwargs


def _equinox(entry, model, /, *args, **kwargs):
  del entry
  eqx = _module("equinox")
  params, static = eqx.partition(model, eqx.is_array)
  return (lambda p, *a, **kw: eqx.combine(p, static)(*a, **kw)), params, \
      args, kwargs


def capture_door(model: Any) -> Callable[..., Any] | None:
  """The capture entry point for a Flax or Equinox module, None otherwise."""
  linen, nnx, eqx = (_module("flax.linen"), _module("flax.nnx"),
                     _module("equinox"))
  if linen is not None and isinstance(model, linen.Module):
    return _linen
  if nnx is not None and isinstance(model, nnx.Module):
    return _nnx
  if eqx is not None and isinstance(model, eqx.Module):
    return _equinox
  return None


# NNX Variables and Flax metadata boxes.


def plain_arrays(tree: Any) -> Any:
  """``tree`` with any Flax NNX ``Variable`` replaced by its value.

  ``nnx.Optimizer`` initialises a transform with a state of Variables and
  updates it with plain arrays; reading both the same way keeps the parameter
  paths, hence the SGS state's keys, identical.
  """
  nnx = _module("flax.nnx")
  return tree if nnx is None else nnx.as_pure(tree)


def write_back(original: Any, refreshed: Any) -> Any:
  """NNX: update the Variables of ``original`` in place; else ``refreshed``."""
  nnx = _module("flax.nnx")
  is_variable = lambda x: nnx is not None and isinstance(x, nnx.Variable)
  if not any(is_variable(x) for x in jax.tree.leaves(
      original, is_leaf=is_variable)):
    return refreshed
  nnx.update(original, nnx.state(refreshed))
  return original


def box_hint(names: Iterable[str], others: Iterable[str]) -> str:
  """A hint if ``names`` and ``others`` differ only by Flax metadata boxes.

  Boxed params (``nn.with_partitioning`` gives ``nn.Partitioned`` leaves)
  name a kernel ``.../kernel/value``, unboxed ones ``.../kernel``.

  Example:
    >>> from sgs_optax import _frameworks
    >>> bool(_frameworks.box_hint(["conv/kernel"], ["conv/kernel/value"]))
    True
    >>> _frameworks.box_hint(["conv/kernel"], ["dense/kernel"])
    ''
  """
  others = set(others)
  boxed = lambda n: n + "/value" in others
  unboxed = lambda n: n.endswith("/value") and n[:-len("/value")] in others
  if not any(boxed(n) or unboxed(n) for n in names):
    return ""
  return (" The captured inputs and the optimizer's params differ by Flax "
          "metadata boxes (a kernel boxed by nn.with_partitioning is named "
          "'.../kernel/value'): capture with the params in the form the "
          "optimizer was initialised with, boxed or unboxed, e.g. "
          "capture_conv_inputs(model, nn.unbox(variables), x) for an "
          "optimizer on nn.unbox-ed params.")


# Flax serialization.

_serializable: set[type] = set()


def register_flax_serialization(
    cls: type,
    to_state_dict: Callable[[Any], Any],
    from_state_dict: Callable[[Any, Any], Any],
) -> None:
  """Lets ``flax.serialization`` (``to_bytes``, ``from_bytes``) save ``cls``.

  Flax is optional: call this whenever an instance of ``cls`` is built.
  Whoever serialises with Flax has imported it by then, and the class is
  registered on the first call that finds it imported, once.

  Args:
    cls: the class to register.
    to_state_dict: ``instance -> state dict``.
    from_state_dict: ``(target instance, state dict) -> instance``.

  Example:
    >>> import dataclasses
    >>> import flax.serialization
    >>> from sgs_optax import _frameworks
    >>> @dataclasses.dataclass
    ... class Box:
    ...   value: float
    >>> _frameworks.register_flax_serialization(
    ...     Box, lambda box: {"value": box.value},
    ...     lambda box, state: Box(state["value"]))
    >>> flax.serialization.to_state_dict(Box(1.5))
    {'value': 1.5}
    >>> flax.serialization.from_state_dict(Box(0.0), {"value": 2.0})
    Box(value=2.0)
  """
  serialization = _module("flax.serialization")
  if cls in _serializable or serialization is None:
    return
  serialization.register_serialization_state(
      cls, to_state_dict, from_state_dict)
  _serializable.add(cls)
