"""Capturing every conv's input from any JAX function, keyed like its params.

The learned mode of SGS needs each conv's input feature maps together with
the geometry the conv reads them with. :func:`capture_conv_inputs` traces the
model to a jaxpr and evaluates it once, recording the left operand of every
``conv_general_dilated`` whose kernel is computed from exactly one params
leaf (through casts, layout changes, elementwise arithmetic with constants,
``jit``, ``remat``, ``custom_jvp``/``custom_vjp`` and ``scan`` bodies). The
Flax linen, Flax NNX and Equinox entry points only build the plain function
and the params to key by.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from sgs_optax._refresh import ConvInput

Provenance = frozenset  # indices of the params leaves a value depends on.
_NONE: Provenance = frozenset()
# Call-like primitives whose body runs inline (param holding the body).
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
           "core_call": "call_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
           "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
_CONV = "conv_general_dilated"


class _Call(NamedTuple):
  """One recorded conv call."""

  leaf: int  # the params leaf its kernel comes from.
  record: ConvInput
  stacked: bool = False  # recorded per iteration of a scan over layers.


def _record(eqn, invals, inprovs, calls: list[_Call]) -> None:
  """Records a conv's input if its kernel comes from one params leaf."""
  params = eqn.params
  if len(inprovs[1]) != 1 or params["batch_group_count"] != 1:
    return
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  x = jnp.transpose(invals[0], (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  if any(d != 1 for d in params["lhs_dilation"]):
    # A transposed conv reads its input with zeros inserted between pixels.
    interior = [(0, 0, d - 1) for d in params["lhs_dilation"]]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                    [(0, 0, 0), *interior, (0, 0, 0)])
  kernel = np.shape(invals[1])
  calls.append(_Call(next(iter(inprovs[1])), ConvInput(
      x, padding=tuple(params["padding"]),
      dilation=params["rhs_dilation"], strides=params["window_strides"],
      kernel_size=tuple(kernel[a] for a in rhs_spec[2:]),
      feature_group_count=params["feature_group_count"])))


def _body(closed_or_open) -> tuple[Any, list[Any]]:
  if isinstance(closed_or_open, jex.ClosedJaxpr):
    return closed_or_open.jaxpr, list(closed_or_open.consts)
  return closed_or_open, []


def _has_kernel_convs(jaxpr, consts, provs) -> bool:
  """Whether evaluating ``jaxpr`` would record a conv (a dry run on types)."""
  calls: list[_Call] = []
  args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
          for v in jaxpr.invars]
  jax.eval_shape(lambda *a: _run(jaxpr, consts, a, provs, calls)[0], *args)
  return bool(calls)


def _scan(eqn, invals, inprovs, calls: list[_Call]):
  """Runs a scan whose body convolves with params, recording per iteration."""
  p = eqn.params
  body, body_consts = _body(p["jaxpr"])
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts, init, xs = (invals[:n_consts], invals[n_consts:n_consts + n_carry],
                      invals[n_consts + n_carry:])
  template: list[_Call] = []

  def step(carry, x):
    inner: list[_Call] = []
    outs, _ = _run(body, body_consts, [*consts, *carry, *x], inprovs, inner)
    template[:] = inner
    return outs[:n_carry], (outs[n_carry:], [c.record.inputs for c in inner])

  carry, (ys, recorded) = jax.lax.scan(
      step, list(init), list(xs), length=p["length"], reverse=p["reverse"],
      unroll=p["unroll"])
  for call, inputs in zip(template, recorded):
    calls.append(call._replace(
        record=dataclasses.replace(call.record, inputs=inputs), stacked=True))
  union = frozenset().union(*inprovs)
  return [*carry, *ys], [union] * (len(carry) + len(ys))


def _eval(eqn, invals, inprovs, calls: list[_Call]):
  """Evaluates one equation: outputs and their provenance."""
  name = eqn.primitive.name
  if name == _CONV:
    _record(eqn, invals, inprovs, calls)
  if name in _INLINE:
    body, consts = _body(eqn.params[_INLINE[name]])
    return _run(body, consts, invals, inprovs, calls)
  if name == "scan":
    body, consts = _body(eqn.params["jaxpr"])
    if _has_kernel_convs(body, consts, inprovs):
      return _scan(eqn, invals, inprovs, calls)
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*invals,
                              **eqn.primitive.get_bind_params(eqn.params))
  outs = outs if eqn.primitive.multiple_results else [outs]
  # A value depends on every params leaf its operands depend on.
  union = frozenset().union(*inprovs)
  return outs, [union] * len(outs)


def _run(jaxpr, consts, args, provs, calls: list[_Call]):
  """Evaluates ``jaxpr``, tracking which params leaves each value uses."""
  env, prov = {}, {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  def read_prov(v):
    return _NONE if isinstance(v, jex.Literal) else prov.get(v, _NONE)

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value, p in zip(jaxpr.invars, args, provs):
    env[var], prov[var] = value, p
  for eqn in jaxpr.eqns:
    outs, out_provs = _eval(eqn, [read(v) for v in eqn.invars],
                            [read_prov(v) for v in eqn.invars], calls)
    for var, value, p in zip(eqn.outvars, outs, out_provs):
      if not isinstance(var, jex.DropVar):
        env[var], prov[var] = value, p
  return [read(v) for v in jaxpr.outvars], [read_prov(v)
                                            for v in jaxpr.outvars]


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _split(tree: Any):
  """Array leaves, and a function rebuilding the tree from new ones."""
  leaves, treedef = jax.tree.flatten(tree)
  where = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

  def rebuild(arrays):
    full = list(leaves)
    for i, a in zip(where, arrays):
      full[i] = a
    return treedef.unflatten(full)

  return [leaves[i] for i in where], where, rebuild


def _merge(calls: list[_Call]) -> ConvInput | tuple[ConvInput, ...]:
  """Calls with one geometry pooled along the batch; one record per geometry."""
  groups: dict[Any, list[ConvInput]] = {}
  for call in calls:
    r = call.record
    shape = r.inputs.shape[int(call.stacked) + 1:]
    key = (call.stacked, shape, r.padding, r.dilation, r.strides,
           r.kernel_size, r.feature_group_count)
    groups.setdefault(key, []).append(r)
  merged = []
  for (stacked, *_), records in groups.items():
    inputs = jnp.concatenate([r.inputs for r in records], axis=int(stacked))
    merged.append(dataclasses.replace(records[0], inputs=inputs))
  return merged[0] if len(merged) == 1 else tuple(merged)


def _per_layer_or_pooled(call: _Call, kernel: Any) -> _Call:
  """A scan's records stay per layer only if the kernel is stacked by layer.

  A kernel stacked over layers has one more axis than the conv's kernel; a
  kernel reused at every iteration (a scan over time) gets its iterations
  pooled into the batch.
  """
  if not call.stacked or np.ndim(kernel) == len(call.record.kernel_size) + 3:
    return call
  x = call.record.inputs
  record = dataclasses.replace(call.record, inputs=x.reshape((-1,) +
                                                             x.shape[2:]))
  return call._replace(record=record, stacked=False)


def capture_function(fn: Callable[..., Any], params: Any, *args,
                     **kwargs) -> Any:
  """The plain-function form of :func:`capture_conv_inputs`."""
  param_arrays, param_where, rebuild_params = _split(params)
  arg_arrays, _, rebuild_args = _split((args, kwargs))
  n = len(param_arrays)

  def flat_fn(*arrays):
    a, kw = rebuild_args(arrays[n:])
    return fn(rebuild_params(arrays[:n]), *a, **kw)

  closed = jax.make_jaxpr(flat_fn)(*param_arrays, *arg_arrays)
  provs = [frozenset([i]) for i in range(n)] + [_NONE] * len(arg_arrays)
  calls: list[_Call] = []
  _run(closed.jaxpr, closed.consts, [*param_arrays, *arg_arrays], provs,
       calls)
  leaves, treedef = jax.tree.flatten(params)
  by_leaf: dict[int, list[_Call]] = {}
  for call in calls:
    call = _per_layer_or_pooled(call, param_arrays[call.leaf])
    by_leaf.setdefault(call.leaf, []).append(call)
  out = [None] * len(leaves)
  for i, leaf_calls in by_leaf.items():
    out[param_where[i]] = _merge(leaf_calls)
  return treedef.unflatten(out)


def _linen(model, variables, *args, **kwargs):
  if "mutable" in kwargs:
    raise ValueError(
        "capture_conv_inputs applies the model with mutable=True and "
        "discards every mutation (BatchNorm statistics, sown values): drop "
        "mutable=. The paper captures in eval mode: pass e.g. train=False."
    )
  if not isinstance(variables, Mapping) or "params" not in variables:
    found = (f"keys {sorted(map(str, variables))}"
             if isinstance(variables, Mapping)
             else f"a value of type {type(variables).__name__}")
    raise ValueError(
        "capture_conv_inputs(linen_model, variables, *inputs): pass the "
        "variables dict ({'params': ...}, plus e.g. 'batch_stats') that the "
        f"model is applied with, not the params alone; got {found}."
    )

  def fn(params, *a, **kw):
    return model.apply({**variables, "params": params}, *a, mutable=True,
                       **kw)

  return fn, variables["params"], args, kwargs


def _nnx(model, *args, **kwargs):
  nnx = sys.modules["flax.nnx"]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def fn(pure_params, *a, **kw):
    copy = nnx.merge(graphdef, pure_params, rest)  # a copy: `model` stays.
    copy.eval()
    return copy(*a, **kw)

  return fn, nnx.as_pure(params), args, kwargs


def _equinox(model, *args, **kwargs):
  eqx = sys.modules["equinox"]
  params, static = eqx.partition(model, eqx.is_array)
  return (lambda p, *a, **kw: eqx.combine(p, static)(*a, **kw)), params, \
      args, kwargs


def _framework_door(model: Any):
  """The entry point for a Flax or Equinox module, or None for a callable."""
  linen = sys.modules.get("flax.linen")
  nnx = sys.modules.get("flax.nnx")
  eqx = sys.modules.get("equinox")
  if linen is not None and isinstance(model, linen.Module):
    return _linen
  if nnx is not None and isinstance(model, nnx.Module):
    return _nnx
  if eqx is not None and isinstance(model, eqx.Module):
    return _equinox
  return None


def capture_conv_inputs(model: Any, *args, **kwargs) -> Any:
  """Runs a model once and returns every conv's input, keyed like its params.

  One mechanism serves any JAX model: the model is traced to a jaxpr and
  evaluated once, recording the left operand of every
  ``jax.lax.conv_general_dilated`` whose kernel is computed from exactly one
  params leaf (through casts, transposes, reshapes, elementwise arithmetic
  such as weight standardisation, ``jit``, ``remat``,
  ``custom_jvp``/``custom_vjp``, ``vmap``-batched code and ``scan`` bodies),
  whatever its dimension numbers and feature groups. How ``model`` is read:

  * a Flax linen module: ``capture_conv_inputs(model, variables, *args,
    **kwargs)`` applies it (mutations, e.g. BatchNorm statistics, are
    discarded; the paper captures in eval mode, so pass ``train=False`` or
    the like), keyed like ``variables["params"]``;
  * a Flax NNX module: ``capture_conv_inputs(model, *args, **kwargs)`` runs
    an ``eval()`` copy of it (``model`` itself is untouched), keyed like
    ``nnx.as_pure(nnx.state(model, nnx.Param))``, the params that
    ``nnx.Optimizer`` gives the transform;
  * an Equinox module: ``capture_conv_inputs(model, *args, **kwargs)`` calls
    ``model(*args, **kwargs)`` as is, keyed like
    ``eqx.filter(model, eqx.is_array)``;
  * any other callable: ``capture_conv_inputs(fn, params, *args, **kwargs)``
    calls ``fn(params, *args, **kwargs)``, keyed like ``params``.

  Pass the params the optimizer sees, so that the keys match its state:
  with Flax metadata boxes (``nn.with_partitioning``), boxed variables if
  the optimizer was initialised with boxed params, ``nn.unbox(variables)``
  if with unboxed ones.
  Array leaves of the arguments are traced; other leaves (flags such as
  ``train=False``) stay static. It works eagerly and under ``jax.jit``.

  What is recorded, per conv call: the input moved to channels last,
  ``(N, *spatial, C)``; the conv's explicit pads, kernel dilation, strides,
  feature groups and kernel size. A transposed conv's input (lax
  ``lhs_dilation``) is recorded with the zeros the conv inserts between
  pixels, because those are what its kernel reads, as padding zeros are. A
  conv that pads before convolving (Flax's ``CIRCULAR``, ``REFLECT``) is
  recorded padded, with ``VALID`` pads. Calls of one kernel with one geometry
  are pooled along the batch; calls at several geometries give a tuple of
  records. Convs inside a ``scan`` over stacked kernels (``nn.scan``) give
  per-layer inputs ``(L, N, *spatial, C)``. Not recorded: convs whose kernel
  depends on no params leaf or on several (e.g. ``nn.WeightNorm``, kernels
  modulated by activations, branches merged on the fly), convs inside
  ``cond``, ``while_loop`` and ``shard_map`` bodies; :func:`refresh_scalings`
  raises for a learned kernel that has no record.

  Args:
    model: a Flax linen, Flax NNX or Equinox module, or a function
      ``fn(params, *args, **kwargs)``.
    *args: linen: the variables, then the inputs; plain function: the
      params, then the inputs; NNX and Equinox: the inputs.
    **kwargs: keyword inputs of the model.

  Returns:
    A pytree with the structure of the params holding a
    :class:`ConvInput` (or a tuple of them) at each captured kernel and
    ``None`` elsewhere.

  Raises:
    ValueError: for a linen module, if ``mutable`` is passed or the
      variables have no ``"params"`` collection (the params were passed
      instead of the variables).

  Examples:
    >>> import jax, jax.numpy as jnp, sgs_optax
    >>> def net(params, x):
    ...   return jax.lax.conv_general_dilated(
    ...       x, params["w"], (1, 1), "SAME",
    ...       dimension_numbers=("NCHW", "OIHW", "NCHW"))
    >>> params = {"w": jnp.ones((4, 3, 3, 3)), "b": jnp.zeros(4)}
    >>> captured = sgs_optax.capture_conv_inputs(net, params,
    ...                                          jnp.ones((2, 3, 8, 8)))
    >>> captured["w"].inputs.shape, captured["w"].padding, captured["b"]
    ((2, 8, 8, 3), ((1, 1), (1, 1)), None)
  """
  door = _framework_door(model)
  if door is None:
    if not callable(model) or not args:
      raise TypeError(
          "capture_conv_inputs expects a Flax linen, Flax NNX or Equinox "
          "module, or a function fn(params, *inputs) followed by its params "
          f"and inputs; got {type(model).__name__}."
      )
    return capture_function(model, *args, **kwargs)
  fn, params, args, kwargs = door(model, *args, **kwargs)
  return capture_function(fn, params, *args, **kwargs)
