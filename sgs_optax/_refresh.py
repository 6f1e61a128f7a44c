"""Refreshing learned SGS matrices in an optimizer state from conv inputs.

The learned mode of SGS (Detkov et al., 2023) recomputes each layer's matrix
from the mutual information between neighbouring pixels of the layer's input
every few epochs. This module holds the jittable :func:`refresh_scalings`;
the record of a captured conv input (:class:`ConvInput`) lives with the conv
geometry in ``_geometry.py``, capturing the inputs in ``_capture.py``, the
statistics in ``_dependence.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgs_optax import _dependence
from sgs_optax import _frameworks
from sgs_optax import _kernels
from sgs_optax import _mi_plan
from sgs_optax import _scaling
from sgs_optax import _sgs
from sgs_optax._geometry import ConvInput


def _is_record(x: Any) -> bool:
  return isinstance(x, ConvInput) or (
      isinstance(x, tuple) and bool(x)
      and all(isinstance(r, ConvInput) for r in x))


def _captured_inputs(captured: Any) -> dict[str, tuple[ConvInput, ...]]:
  """The captured records by path name; anything else is a usage error."""
  flat = jax.tree_util.tree_flatten_with_path(captured, is_leaf=_is_record)[0]
  records = {}
  for path, leaf in flat:
    name = _kernels.path_name(path)
    if not _is_record(leaf):
      raise ValueError(
          f"captured[{name!r}] is a {type(leaf).__name__}, not a ConvInput: "
          "pass what sgs_optax.capture_conv_inputs returns, or wrap each "
          "input as ConvInput(inputs, padding, ...)."
      )
    records[name] = leaf if isinstance(leaf, tuple) else (leaf,)
  return records


def _is_param_name(name: str, table: _scaling.ScalingTable) -> bool:
  """Whether ``name`` is a leaf of the table's params, or under a masked one."""
  return any(name == n or name.startswith(n + "/") for n in table.names)


def _learned_states(opt_state: optax.OptState):
  states = _sgs.sgs_states(opt_state)
  if not states:
    raise ValueError("refresh_scalings found no SpatialScalingState in the "
                     "optimizer state.")
  learned = [(path, s) for path, s in states
             if isinstance(s.scalings, _scaling.ScalingTable)
             and s.scalings.learned]
  if not learned:
    raise ValueError(
        "refresh_scalings found no learned SGS state: every sgs transform "
        "here was built with constant matrices. Build it with "
        "sgs(None) or sgs(..., learn=True) to refresh it from data."
    )
  return learned


def _check_captured(records: dict[str, Any], tables) -> None:
  for name in records:
    if not any(_is_param_name(name, t) for t in tables):
      raise ValueError(
          f"captured conv input {name!r} is not a parameter of the model "
          "the optimizer was initialised with: key the captured inputs like "
          "the params the optimizer sees (without a top-level 'params')."
          + _frameworks.box_hint([name], [n for t in tables for n in t.names])
      )
  for table in tables:
    missing = [name for name in table if name not in records]
    if missing:
      cause = _frameworks.box_hint(missing, records) or (
          " Was each of these layers called in the captured forward pass? "
          "Or is its kernel computed from several params (e.g. "
          "nn.WeightNorm, nn.SpectralNorm), which capture does not follow?")
      raise ValueError(
          f"No captured input for the learned SGS kernels {missing}.{cause} "
          "Leave a kernel out of learning with sgs(..., mask=...) or "
          "learn=False."
      )


def _size_mismatch(name: str, captured: tuple[int, ...],
                   info: _scaling.KernelShape) -> str:
  """Why a captured kernel size differs from the state's, axis order named."""
  axes = "".join(sorted((info.layout[a] for a in
                         _kernels.parse_layout(info.layout).spatial),
                        key="DHW".index))
  message = (
      f"Layer {name!r}: the conv reads a kernel of size {captured} (axes "
      f"{', '.join(axes)}, in the conv's order), but kernel_layout "
      f"{info.layout!r} reads the parameter's spatial sizes {info.size} as "
      f"{', '.join(axes)} = {info.conv_size}."
  )
  if sorted(captured) != sorted(info.conv_size):
    return message
  return message + (
      " The parameter stores its spatial axes in another order than the "
      "layout says (e.g. 'WHIO' for a kernel stored (kw, kh, I, O) and "
      "transposed before the conv): pass the layout that "
      "sgs_optax.conv_layouts(model, ...) reads from the model.")


def _kernel_rank(records: tuple[ConvInput, ...]) -> int | None:
  """The rank of the kernel a conv's records come from (None if unknown)."""
  record = records[0]
  if record.kernel_size is None:
    return None
  n = len(record.kernel_size)
  return n + 2 + (np.ndim(record.inputs) == n + 3)


def _check_rank_skipped(records: dict[str, Any], tables) -> None:
  """Raises for captured convs whose kernels a learned state's layout
  string left out only because of their rank (e.g. stacked by nn.scan)."""
  for table in tables:
    missed = {name: _kernel_rank(records[name]) for name in table.rank_skipped
              if name in records and all(
                  min(r.kernel_size or (2,)) >= 2 for r in records[name])}
    if not missed:
      continue
    layout = table.selected_by
    stacked = [n for n, rank in missed.items() if rank == len(layout) + 1]
    hint = (f"{'L' + layout!r} for the layers stacked by a scan "
            f"({', '.join(stacked)})" if stacked and "L" not in layout
            else "e.g. 'WIO' for 1-D, 'DHWIO' for 3-D convs")
    raise ValueError(
        f"refresh_scalings: the captured convs {sorted(missed)} have kernels "
        f"of rank {sorted(set(missed.values()) - {None})}, which the learned "
        f"sgs state's kernel_layout {layout!r} did not select (a layout "
        f"string selects the leaves of its rank, {len(layout)}): they would "
        f"never be scaled. Give them their layout in a layout tree ({hint}); "
        "kernel_layout=sgs_optax.conv_layouts(model, ...) reads every "
        "kernel's layout from the model. To leave them unscaled, say so: "
        "None for them in a layout tree, or mask."
    )


def _check_record(name: str, record: ConvInput,
                  info: _scaling.KernelShape) -> None:
  """Raises if a record cannot be the input of the kernel ``info`` describes."""
  rank = len(info.size) + 2 + (info.layers is not None)
  shape = tuple(np.shape(record.inputs))
  if len(shape) != rank:
    raise ValueError(
        f"Layer {name!r}: captured inputs of shape {shape} do not fit a "
        f"{len(info.size)}-D conv kernel"
        f"{' stacked over layers' if info.layers else ''}: expected rank "
        f"{rank}, channels last."
    )
  if record.kernel_size is not None and record.kernel_size != info.conv_size:
    raise ValueError(_size_mismatch(name, record.kernel_size, info))
  if info.layers is not None and shape[0] != info.layers:
    raise ValueError(
        f"Layer {name!r}: {shape[0]} captured layers for a stack of "
        f"{info.layers}."
    )
  expected = info.in_channels * record.feature_group_count
  if shape[-1] != expected:
    raise ValueError(
        f"Layer {name!r}: captured inputs have {shape[-1]} channels (last "
        f"axis) but the kernel reads {info.in_channels} x "
        f"{record.feature_group_count} group(s) = {expected}: inputs must be "
        "channels last, e.g. (N, H, W, C); transpose NCHW data first."
    )


def _dependence_of(records: Sequence[ConvInput], size, *, k,
                   diagonal_removal, counting) -> jax.Array:
  """The dependence of several calls, each entry weighted by the pixels
  (N x spatial, unpadded) of the calls where it is defined."""
  total, weight = 0.0, 0.0
  for record in records:
    d = _dependence.spatial_dependence(
        record.inputs, size, padding=record.padding, k=k,
        diagonal_removal=diagonal_removal,
        dilation=record.dilation or 1, strides=record.strides or 1,
        padding_mode=record.padding_mode, counting=counting)
    pixels = float(np.prod(np.shape(record.inputs)[:-1]))
    defined = ~jnp.isnan(d)
    total = total + jnp.where(defined, pixels * d, 0.0)
    weight = weight + jnp.where(defined, pixels, 0.0)
  # Undefined in every call: 0 / 0 = NaN, and the previous matrix stays.
  return total / weight


def _holds_pixels(name: str, records: tuple[ConvInput, ...],
                  info: _scaling.KernelShape) -> bool:
  """False for a kernel without input channels (it has no entries, so no
  matrix can matter); raises for inputs without pixels."""
  if info.in_channels == 0:
    return False
  for record in records:
    if not np.prod(np.shape(record.inputs)[:-1], dtype=int):
      raise ValueError(
          f"Layer {name!r}: the captured inputs of shape "
          f"{tuple(np.shape(record.inputs))} hold no pixels: capture from "
          "a non-empty batch.")
  return True


def _new_matrix(name: str, matrix: jax.Array, info: _scaling.KernelShape,
                records: tuple[ConvInput, ...], **stats) -> jax.Array:
  for record in records:
    _check_record(name, record, info)
  if not _holds_pixels(name, records, info):
    return matrix
  # Measured in the conv's axis order, stored in the parameter's.
  size = info.conv_size
  try:
    if info.layers is None:
      dependence = _dependence_of(records, size, **stats)
    else:
      # Mapped over the stack rather than unrolled: compile time does not
      # grow with the number of layers.
      dependence = jax.vmap(lambda stacks: _dependence_of(
          [dataclasses.replace(r, inputs=x) for r, x in zip(records, stacks)],
          size, **stats))([r.inputs for r in records])
  except ValueError as e:
    raise ValueError(f"Layer {name!r}: {e}") from None
  # Mean 1 over the kernel's own spatial axes, of any rank: one matrix per
  # stacked layer.
  new = _kernels.matrix_from_conv_order(
      _dependence.dependence_to_scaling(dependence, ndim=len(size)),
      info.layout, lead=int(info.layers is not None))
  if matrix.ndim > new.ndim:  # One matrix per output channel.
    new = jnp.broadcast_to(new[..., None], matrix.shape)
  # A NaN (e.g. every channel constant) keeps that layer's previous matrix.
  spatial = tuple(range(int(info.layers is not None), matrix.ndim))
  broken = jnp.any(jnp.isnan(new), axis=spatial, keepdims=True)
  return jnp.where(broken, matrix, new.astype(matrix.dtype))


def _refreshed(
    tables: list[_scaling.ScalingTable],
    records: dict[str, tuple[ConvInput, ...]], **stats,
) -> list[_scaling.ScalingTable]:
  """Each learned table with every matrix recomputed from its records."""
  return [table.replace({
      name: _new_matrix(name, table[name], table.shapes[name],
                        records[name], **stats)
      for name in table}) for table in tables]


_refreshed_jit = jax.jit(
    _refreshed, static_argnames=("k", "diagonal_removal", "counting"))


def _refreshed_on(
    device: jax.Device, tables: list[_scaling.ScalingTable],
    records: dict[str, tuple[ConvInput, ...]], **stats,
) -> list[_scaling.ScalingTable]:
  """`_refreshed`, jitted on `device`, with the matrices moved back.

  Only the captured inputs and the learned matrices travel: the rest of the
  optimizer state (momentum, parameter-sized) stays where it is.
  """
  if any(isinstance(x, jax.core.Tracer)
         for x in jax.tree.leaves((tables, records))):
    raise ValueError(
        "refresh_scalings(..., device=...) moves the captured inputs to "
        "that device and the matrices back, which a traced call cannot do: "
        "call it outside jax.jit (it jits the refresh on the device itself), "
        "or leave device=None to refresh where the inputs are."
    )
  # Committed to `device`, the inputs make the jit compile for it.
  new = _refreshed_jit(*jax.device_put((tables, records), device), **stats)
  back = lambda fresh, old: (
      jax.device_put(fresh, old.sharding) if isinstance(old, jax.Array)
      else np.asarray(fresh))
  return jax.tree.map(back, new, tables)


def refresh_scalings(
    opt_state: optax.OptState,
    captured: Any,
    *,
    k: float = 5.0,
    diagonal_removal: bool = False,
    counting: str | None = None,
    device: jax.Device | None = None,
) -> optax.OptState:
  """Recomputes every learned SGS matrix from captured conv inputs.

  For each kernel of a learned SGS state (``sgs(None)`` or ``learn=True``),
  the new matrix is ``D / mean(D)`` with ``D = spatial_dependence(inputs,
  ...)`` computed with the conv's own padding, dilation and padding mode. A
  conv called several times at different resolutions gets the average of
  each call's ``D`` weighted by its number of pixels; stacked layers get one
  matrix each. A layer whose new matrix has a NaN (e.g. every channel
  constant) keeps its previous matrix. 1-D, 2-D and 3-D kernels alike: the
  mean is taken over the kernel's own spatial axes. Per-channel
  ``(*size, C_out)`` matrices get the layer's matrix broadcast over
  channels. Each matrix is measured in the conv's spatial order and stored
  in the parameter's, by the letters of its layout (``"WHIO"``: measured
  ``(kh, kw)``, stored ``(kw, kh)``). A kernel without input channels has no
  entries and keeps its matrix. Constant SGS
  states (presets and given matrices without ``learn=True``) are left
  untouched. Shapes and dtypes never change, so a jitted train step does not
  recompile.

  Jittable: ``jax.jit(refresh_scalings, static_argnames=("k",
  "diagonal_removal", "counting"))``. Call it every few epochs, outside the
  train step. With ``device`` (an eager call) the statistics are computed
  on that device, typically the host's CPU while the accelerator trains, as
  the paper's code does.
  A Flax NNX ``nnx.Optimizer``'s ``opt_state`` is accepted as it is and
  updated in place (and returned).

  Args:
    opt_state: an optimizer state holding one or more
      :class:`SpatialScalingState` anywhere (``chain``, ``masked``,
      ``partition``, ``inject_hyperparams`` ...).
    captured: a pytree keyed like the params, holding a :class:`ConvInput`
      (or a tuple of them, one per call geometry) at each conv kernel's
      position, as returned by :func:`sgs_optax.capture_conv_inputs`. Inputs
      of convs that no learned state scales (1x1 convs, masked-out kernels)
      are ignored.
    k: the NMI sharpening constant (5 in the paper).
    diagonal_removal: use the paper's ImageNet variant of the statistics.
    counting: how the estimator counts its histograms, a static string:
      ``"scatter"``, ``"matmul"``, or ``None`` (the default: scatter on CPU,
      matmul on GPU and TPU, for the platform the refresh is compiled for).
      Both give the same matrices; see :func:`spatial_dependence`.
    device: if given, a ``jax.Device`` (e.g. ``jax.devices("cpu")[0]``): the
      captured inputs and the learned matrices are moved there, the refresh
      runs there, jitted, and each new matrix is moved back with its old
      matrix's sharding. Only those arrays travel; the rest of the state
      stays in place. Needs an eager call (not under ``jax.jit``). ``None``
      (the default) computes where the inputs are.

  Returns:
    The optimizer state with new matrices.

  Raises:
    ValueError: if there is no learned SGS state; a captured entry is not a
      :class:`ConvInput` or not a parameter of the model; a learned kernel
      has no captured input; a captured input's rank, kernel size (in the
      conv's axis order), number of layers or channel count does not fit
      its kernel, or it holds no pixels; a captured conv's kernel was left
      out by a learned state's layout string only because of its rank
      (e.g. ``"HWIO"`` on an ``nn.scan`` model, whose kernels are
      ``"LHWIO"``): pass a layout tree, e.g. from
      :func:`sgs_optax.conv_layouts`, with ``None`` where a kernel is meant
      to stay unscaled; ``counting`` is unknown; or ``device`` is given
      under a trace.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sgs_optax
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}
    >>> state = optax.chain(sgs_optax.sgs(), optax.sgd(0.1)).init(params)
    >>> x = jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 8, 8, 2)))
    >>> captured = {"conv": {"kernel": sgs_optax.ConvInput(
    ...     x, ((1, 1), (1, 1)), kernel_size=(3, 3))}}
    >>> state = sgs_optax.refresh_scalings(state, captured)
    >>> matrix = sgs_optax.get_scalings(state)["conv"]["kernel"]
    >>> bool(matrix[1, 1] == matrix.max()), round(float(matrix.mean()), 4)
    (True, 1.0)
    >>> on_host = sgs_optax.refresh_scalings(
    ...     state, captured, device=jax.devices("cpu")[0])
    >>> host_matrix = sgs_optax.get_scalings(on_host)["conv"]["kernel"]
    >>> bool(jnp.allclose(host_matrix, matrix))
    True

  References:
    Detkov et al., `Reparameterization through Spatial Gradient Scaling
    <https://arxiv.org/abs/2303.02733>`_, ICLR 2023.
  """
  original, opt_state = opt_state, _frameworks.plain_arrays(opt_state)
  records = _captured_inputs(_frameworks.plain_arrays(captured))
  learned = _learned_states(opt_state)
  tables = [s.scalings for _, s in learned]
  _check_captured(records, tables)
  _check_rank_skipped(records, tables)
  stats = dict(k=k, diagonal_removal=diagonal_removal,
               counting=_mi_plan.check_counting(counting))
  # Inputs of convs that no learned state scales are ignored.
  used = {name: records[name] for table in tables for name in table}
  if device is None:
    new_tables = _refreshed(tables, used, **stats)
  else:
    new_tables = _refreshed_on(device, tables, used, **stats)
  for (path, state), new in zip(learned, new_tables):
    opt_state = optax.tree_utils.tree_set(
        opt_state, lambda p, _, path=path: p == path,
        SpatialScalingState=state._replace(scalings=new))
  return _frameworks.write_back(original, opt_state)
