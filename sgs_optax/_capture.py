"""Walking a JAX function's jaxpr: conv inputs and conv layouts.

The learned mode of SGS needs each conv's input feature maps together with
the geometry the conv reads them with; both transforms need each kernel's
layout. One walk serves both: the model is traced to a jaxpr and its
equations are evaluated one by one, with a :mod:`_provenance` beside every
value (which params leaf it comes from, along which axes). At every
``conv_general_dilated`` whose kernel is computed from exactly one params
leaf (through casts, layout changes, elementwise arithmetic with constants,
``jit``, ``remat``, ``custom_jvp``/``custom_vjp`` and ``scan`` bodies), it
records the left operand (:func:`capture_conv_inputs`) and the letters the
conv's dimension numbers give the leaf's axes (:func:`conv_layouts`, which
runs the walk on abstract values only). The Flax linen, Flax NNX and Equinox
front doors (in ``_frameworks.py``) only build the plain function and the
params to key by.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any, NamedTuple
import warnings

import jax
from jax.extend import core as jex
import jax.numpy as jnp
import numpy as np

from sgs_optax import _frameworks
from sgs_optax import _kernels
from sgs_optax import _provenance
from sgs_optax._geometry import ConvInput
from sgs_optax._provenance import Provenance

_NONE = _provenance.NONE
# Call-like primitives whose body runs inline (param holding the body).
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
           "core_call": "call_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
           "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
_CONV = "conv_general_dilated"


class _Call(NamedTuple):
  """One conv call whose kernel depends on a params leaf."""

  leaf: int  # the params leaf its kernel comes from.
  record: ConvInput | None  # None: not recorded, see `problem`.
  letters: _provenance.Letters | None = None  # the leaf's axes, named.
  problem: str | None = None  # why the leaf gets no layout from this conv.
  stacked: bool = False  # recorded per iteration of a scan over layers.


def _unrecorded(leaves, problem: str) -> list[_Call]:
  return [_Call(leaf, None, problem=problem) for leaf in sorted(leaves)]


def _record(eqn, invals, inprovs, calls: list[_Call]) -> None:
  """Records a conv's input if its kernel comes from one params leaf."""
  params = eqn.params
  kernel_prov = inprovs[1]
  if len(kernel_prov.leaves) > 1:
    calls += _unrecorded(kernel_prov.leaves, "a conv's kernel is computed "
                         "from it and other params leaves together")
    return
  if not kernel_prov.leaves:
    return
  if params["batch_group_count"] != 1:
    calls += _unrecorded(kernel_prov.leaves, "it is the kernel of a conv "
                         "with batch_group_count > 1")
    return
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  x = jnp.transpose(invals[0], (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  if any(d != 1 for d in params["lhs_dilation"]):
    # A transposed conv reads its input with zeros inserted between pixels.
    interior = [(0, 0, d - 1) for d in params["lhs_dilation"]]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                    [(0, 0, 0), *interior, (0, 0, 0)])
  kernel = np.shape(invals[1])
  calls.append(_Call(next(iter(kernel_prov.leaves)), ConvInput(
      x, padding=tuple(params["padding"]),
      dilation=params["rhs_dilation"], strides=params["window_strides"],
      kernel_size=tuple(kernel[a] for a in rhs_spec[2:]),
      feature_group_count=params["feature_group_count"]),
      _provenance.kernel_letters(kernel_prov, rhs_spec)))


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


def _scan(eqn, invals, body_provs, calls: list[_Call]):
  """Runs a scan whose body convolves with params, recording per iteration."""
  p = eqn.params
  body, body_consts = _body(p["jaxpr"])
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts, init, xs = (invals[:n_consts], invals[n_consts:n_consts + n_carry],
                      invals[n_consts + n_carry:])
  template: list[_Call] = []

  def step(carry, x):
    inner: list[_Call] = []
    outs, _ = _run(body, body_consts, [*consts, *carry, *x], body_provs,
                   inner)
    template[:] = inner
    return outs[:n_carry], (outs[n_carry:], [
        c.record.inputs for c in inner if c.record is not None])

  carry, (ys, recorded) = jax.lax.scan(
      step, list(init), list(xs), length=p["length"], reverse=p["reverse"],
      unroll=p["unroll"])
  recorded = iter(recorded)
  for call in template:
    if call.record is not None:
      call = call._replace(record=dataclasses.replace(
          call.record, inputs=next(recorded)))
    calls.append(call._replace(stacked=True))
  union = frozenset().union(*(p.leaves for p in body_provs))
  return [*carry, *ys], [Provenance(union)] * (len(carry) + len(ys))


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  found = []
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else [value]:
      if isinstance(item, (jex.ClosedJaxpr, jex.Jaxpr)):
        found.append(_body(item)[0])
  return found


def _has_conv(jaxpr) -> bool:
  return any(eqn.primitive.name == _CONV or any(
      _has_conv(sub) for sub in _sub_jaxprs(eqn.params)) for eqn in jaxpr.eqns)


def _bodies(eqn, inprovs) -> list[tuple[Any, list[Any], list[Provenance]]]:
  """The bodies of a primitive the walk does not follow, each with the
  provenance of its inputs."""
  p = eqn.params
  if eqn.primitive.name == "cond":
    return [(*_body(b), inprovs[1:]) for b in p["branches"]]
  if eqn.primitive.name == "while":
    n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
    carry = [_provenance.carried(q) for q in inprovs[n_cond + n_body:]]
    return [(*_body(p["cond_jaxpr"]), [*inprovs[:n_cond], *carry]),
            (*_body(p["body_jaxpr"]),
             [*inprovs[n_cond:n_cond + n_body], *carry])]
  # Others (shard_map, ...): the body takes the operands as they are.
  return [(*_body(sub), list(inprovs)) for sub in _sub_jaxprs(p)
          if len(_body(sub)[0].invars) == len(inprovs)]


def _note_unfollowed(eqn, inprovs, calls: list[_Call]) -> None:
  """Params leaves that are conv kernels inside a body the walk does not
  follow (``cond``, ``while_loop``, ``shard_map`` ...) get no record; a
  dry run on types finds them."""
  if not any(p.leaves for p in inprovs) or not any(
      _has_conv(sub) for sub in _sub_jaxprs(eqn.params)):
    return
  inside: list[_Call] = []
  for jaxpr, consts, provs in _bodies(eqn, inprovs):
    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
            for v in jaxpr.invars]
    jax.eval_shape(lambda *a, j=jaxpr, c=consts, q=provs: _run(
        j, c, a, q, inside)[0], *args)
  leaves = {call.leaf for call in inside}
  calls += _unrecorded(leaves, f"it is the kernel of a conv inside a "
                       f"{eqn.primitive.name} body, which the walk does not "
                       "follow")


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
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    carry = inprovs[n_consts:n_consts + n_carry]
    body_provs = [*inprovs[:n_consts], *map(_provenance.carried, carry),
                  *map(_provenance.sliced, inprovs[n_consts + n_carry:])]
    if _has_kernel_convs(body, consts, body_provs):
      return _scan(eqn, invals, body_provs, calls)
  elif name != _CONV:
    _note_unfollowed(eqn, inprovs, calls)
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*invals,
                              **eqn.primitive.get_bind_params(eqn.params))
  outs = outs if eqn.primitive.multiple_results else [outs]
  return outs, _provenance.propagate(eqn, inprovs)


def _run(jaxpr, consts, args, provs, calls: list[_Call]):
  """Evaluates ``jaxpr``, tracking where each value comes from."""
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
  return isinstance(x, (jax.Array, np.ndarray, np.generic,
                        jax.ShapeDtypeStruct))


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


def _walk(fn: Callable[..., Any], params: Any, args, kwargs, *,
          abstract: bool):
  """Traces ``fn(params, *args, **kwargs)`` and walks it once.

  Returns:
    The conv calls, the params' array leaves, and where each sits among all
    the leaves of ``params``.
  """
  param_arrays, param_where, rebuild_params = _split(params)
  arg_arrays, _, rebuild_args = _split((args, kwargs))
  n = len(param_arrays)

  def flat_fn(*arrays):
    a, kw = rebuild_args(arrays[n:])
    return fn(rebuild_params(arrays[:n]), *a, **kw)

  arrays = [*param_arrays, *arg_arrays]
  if not abstract and any(isinstance(a, jax.ShapeDtypeStruct)
                          for a in arrays):
    raise ValueError(
        "capture_conv_inputs records values, so it needs concrete arrays, "
        "not jax.ShapeDtypeStruct (conv_layouts accepts those).")
  closed = jax.make_jaxpr(flat_fn)(*arrays)
  provs = [_provenance.of_leaf(i, np.ndim(a))
           for i, a in enumerate(param_arrays)] + [_NONE] * len(arg_arrays)
  calls: list[_Call] = []
  walk = lambda *values: _run(closed.jaxpr, closed.consts, values, provs,
                              calls)[0]
  if abstract:  # Types only: nothing is computed.
    jax.eval_shape(walk, *(jax.ShapeDtypeStruct(np.shape(a), a.dtype)
                           for a in arrays))
  else:
    walk(*arrays)
  return calls, param_arrays, param_where


def capture_function(fn: Callable[..., Any], params: Any, *args,
                     **kwargs) -> Any:
  """The plain-function form of :func:`capture_conv_inputs`."""
  calls, param_arrays, param_where = _walk(fn, params, args, kwargs,
                                           abstract=False)
  leaves, treedef = jax.tree.flatten(params)
  by_leaf: dict[int, list[_Call]] = {}
  for call in calls:
    if call.record is not None:
      call = _per_layer_or_pooled(call, param_arrays[call.leaf])
      by_leaf.setdefault(call.leaf, []).append(call)
  out = [None] * len(leaves)
  for i, leaf_calls in by_leaf.items():
    out[param_where[i]] = _merge(leaf_calls)
  return treedef.unflatten(out)


def _leaf_layout(calls: list[_Call], ndim: int) -> tuple[str | None,
                                                         str | None]:
  """A leaf's layout from every conv reading it, or None and why not."""
  problems = [c.problem for c in calls if c.problem is not None]
  if problems:
    return None, problems[0]
  layouts = {_provenance.layout(c.letters, ndim) for c in calls}
  if None in layouts:
    return None, ("a conv reads it along axes that are not a permutation of "
                  "its own (e.g. after a reshape that merges axes)")
  if len(layouts) > 1:
    return None, f"convs read it with different layouts {sorted(layouts)}"
  return layouts.pop(), None


def layouts_function(fn: Callable[..., Any], params: Any, *args,
                     **kwargs) -> Any:
  """The plain-function form of :func:`conv_layouts`."""
  calls, param_arrays, param_where = _walk(fn, params, args, kwargs,
                                           abstract=True)
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  by_leaf: dict[int, list[_Call]] = {}
  for call in calls:
    by_leaf.setdefault(call.leaf, []).append(call)
  out, problems = [None] * len(paths), {}
  for i, leaf_calls in by_leaf.items():
    layout, problem = _leaf_layout(leaf_calls, np.ndim(param_arrays[i]))
    out[param_where[i]] = layout
    if problem is not None:
      problems[_kernels.path_name(paths[param_where[i]][0])] = problem
  if problems:
    warnings.warn(
        "conv_layouts gives no layout (None: sgs and cdg leave them alone) "
        "to these params leaves that reach a conv: " + "; ".join(
            f"{name}: {why}" for name, why in problems.items())
        + ". Put their layout in the tree yourself if you know it.",
        stacklevel=3)
  return treedef.unflatten(out)


def _open(entry: str, model: Any, args, kwargs):
  """``(fn, params, args, kwargs)`` for a plain call ``fn(params, ...)``."""
  door = _frameworks.capture_door(model)
  if door is not None:
    return door(entry, model, *args, **kwargs)
  if not callable(model) or not args:
    raise TypeError(
        f"{entry} expects a Flax linen, Flax NNX or Equinox module, or a "
        "function fn(params, *inputs) followed by its params and inputs; "
        f"got {type(model).__name__}."
    )
  return model, args[0], args[1:], kwargs


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
  fn, params, args, kwargs = _open("capture_conv_inputs", model, args,
                                   kwargs)
  return capture_function(fn, params, *args, **kwargs)


def conv_layouts(model: Any, *args, **kwargs) -> Any:
  """Reads each conv kernel's layout from the model: a ``kernel_layout`` tree.

  The model is traced, not run: only shapes and dtypes are used, so any
  arrays (or :class:`jax.ShapeDtypeStruct`\\ s) of the right shapes will do.
  The same walk as :func:`capture_conv_inputs` follows every params leaf to
  the ``jax.lax.conv_general_dilated`` calls whose kernel is computed from it
  alone, through casts, transposes, reshapes that only add or drop size-1
  axes, elementwise arithmetic (e.g. weight standardisation), ``jit``,
  ``remat``, ``custom_jvp``/``custom_vjp`` and ``scan`` bodies, and names its
  axes by the conv's dimension numbers: ``O`` and ``I`` for the output and
  input channels, ``H``, ``W`` (``W``; ``D``, ``H``, ``W``) for the spatial
  axes in the conv's order, ``L`` for an axis a scan iterates over. Flax
  kernels come out ``"HWIO"``, Equinox and PyTorch-style weights
  ``"OIHW"``, an ``nn.scan`` stack ``"LHWIO"``, a kernel stored ``(kw, kh,
  I, O)`` and transposed before the conv ``"WHIO"``, a Flax
  ``ConvTranspose(transpose_kernel=True)`` ``"HWOI"``.

  Every other leaf is ``None``: biases, norms, dense kernels, embeddings,
  and a 4-D parameter used other than as a conv kernel (e.g. a ``(3, 3, C,
  C)`` dense mixing), so that ``sgs`` and ``cdg`` given this tree touch
  exactly the model's conv kernels. A leaf that reaches a conv but gets no
  layout is ``None`` too, and a warning names it with the reason: the conv
  reads it along axes that are not a permutation of its own (a reshape
  merging axes, ``vmap`` over kernels), several convs read it with
  different layouts, its conv's kernel also depends on other params leaves,
  or the conv sits in a ``cond``, ``while_loop`` or ``shard_map`` body,
  which the walk does not follow.

  Pass the result as ``kernel_layout=`` to :func:`sgs_optax.sgs` and
  :func:`sgs_optax.cdg`; it has the structure of the params the optimizer
  sees (see :func:`capture_conv_inputs` for how each front door keys them).

  Args:
    model: a Flax linen, Flax NNX or Equinox module, or a function
      ``fn(params, *args, **kwargs)``, read as by
      :func:`capture_conv_inputs`.
    *args: linen: the variables, then the inputs; plain function: the
      params, then the inputs; NNX and Equinox: the inputs.
    **kwargs: keyword inputs of the model.

  Returns:
    A pytree with the structure of the params holding a layout string at
    each conv kernel and ``None`` elsewhere.

  Raises:
    ValueError: for a linen module, if ``mutable`` is passed or the
      variables have no ``"params"`` collection.

  Examples:
    >>> import jax, jax.numpy as jnp, sgs_optax
    >>> def net(params, x):
    ...   w = jnp.transpose(params["w"], (1, 0, 2, 3))  # stored (kw, kh, I, O)
    ...   y = jax.lax.conv_general_dilated(
    ...       x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ...   return y @ params["dense"]
    >>> params = {"w": jnp.ones((5, 3, 2, 4)), "dense": jnp.ones((4, 4))}
    >>> sgs_optax.conv_layouts(net, params, jnp.ones((1, 8, 8, 2)))
    {'dense': None, 'w': 'WHIO'}
  """
  fn, params, args, kwargs = _open("conv_layouts", model, args, kwargs)
  return layouts_function(fn, params, *args, **kwargs)
