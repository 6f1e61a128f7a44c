"""Spatial Gradient Scaling: one spatial matrix per conv kernel's gradient."""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgs_optax import _branches
from sgs_optax import _kernels

Scaling = Any  # None, a preset name, an array, or a params-shaped tree.


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


class KernelInfo(NamedTuple):
  """What the refresh needs to know of a scaled kernel, beyond its matrix."""

  size: tuple[int, ...]  # spatial sizes, in the parameter's order.
  in_channels: int  # per feature group, as stored in the kernel.
  layers: int | None  # the size of a stack ("L") axis, if any.
  # The kernel's layout: the matrix's spatial axes are in the order it
  # stores them (see `_kernels.to_conv_order`).
  layout: str = ""

  @classmethod
  def of(cls, kernel: Any, layout: str) -> KernelInfo:
    return cls(_kernels.spatial_shape(kernel, layout),
               _kernels.input_channels(kernel, layout),
               _kernels.layers(kernel, layout), layout)

  @property
  def conv_size(self) -> tuple[int, ...]:
    """The spatial sizes in the order the conv reads them (D, H, W)."""
    return _kernels.to_conv_order(self.size, self.layout)


@jax.tree_util.register_pytree_with_keys_class
class ScalingTable(Mapping):
  """The SGS matrices of one transform, keyed by parameter path.

  A mapping from a scaled kernel's path name (``"conv1/kernel"``, as
  :func:`jax.tree_util.keystr` with ``separator="/"`` writes it) to its
  matrix. It is a pytree whose leaves are the matrices only; the structure of
  the params it was built for and whether the matrices are learned are static
  (part of the tree structure), so a jitted step never retraces when the
  matrices are refreshed. It is keyed by path rather than shaped like the
  params because the matrices do not have the parameters' shapes: utilities
  that pair optimizer state with params (such as
  ``optax.tree_utils.tree_map_params``) must not take them for params.

  Attributes:
    structure: the tree structure of the params (``optax.MaskedNode``
      counting as a leaf).
    learned: whether :func:`sgs_optax.refresh_scalings` refreshes the
      matrices.
    kernels: a :class:`KernelInfo` per key (spatial size, input channels,
      stacked layers, layout), static.
    selected_by: the layout string that selected the kernels, or None for
      a layout tree or callable.
    rank_skipped: the floating-point leaves of rank 3 or more that the
      layout string did not select because of their rank (recorded for
      learned tables: :func:`sgs_optax.refresh_scalings` raises if they
      turn out to be convs).
    source: a digest of the constant array ``scaling`` the matrices were
      read from (None for presets and learned tables): an update reads the
      scaling again only when it changed (under
      ``optax.inject_hyperparams``), so edits to the state's matrices stand.

  Examples:
    >>> import jax.numpy as jnp, sgs_optax
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)),
    ...                    "bias": jnp.ones(4)}}
    >>> table = sgs_optax.sgs("repvgg").init(params).scalings
    >>> list(table), table.learned
    (['conv/kernel'], False)
    >>> table["conv/kernel"][1, 1]
    Array(2., dtype=float32)
  """

  def __init__(self, matrices: Mapping[str, Any], structure: Any,
               learned: bool, kernels: Mapping[str, KernelInfo], *,
               selected_by: str | None = None,
               rank_skipped: tuple[str, ...] = (),
               source: str | None = None):
    self._matrices = dict(matrices)
    self.structure = structure
    self.learned = bool(learned)
    self.kernels = dict(kernels)
    self.selected_by = selected_by
    self.rank_skipped = tuple(rank_skipped)
    self.source = source
    _register_with_flax()

  def __getitem__(self, name: str) -> Any:
    return self._matrices[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._matrices)

  def __len__(self) -> int:
    return len(self._matrices)

  def __repr__(self) -> str:
    return f"ScalingTable(learned={self.learned}, {self._matrices!r})"

  def replace(self, matrices: Mapping[str, Any],
              **facts: Any) -> ScalingTable:
    """A table with the same keys and structure holding ``matrices``
    (and the keyword attributes given, such as ``source``)."""
    if set(matrices) != set(self._matrices):
      raise ValueError("replace() must give a matrix for every key.")
    return ScalingTable({k: matrices[k] for k in self._matrices},
                        self.structure, self.learned, self.kernels,
                        **{**self._selection, **facts})

  @property
  def _selection(self) -> dict[str, Any]:
    return dict(selected_by=self.selected_by, rank_skipped=self.rank_skipped,
                source=self.source)

  @functools.cached_property
  def names(self) -> tuple[str, ...]:
    """The path name of every leaf of the params, in tree order."""
    dummy = self.structure.unflatten([0] * self.structure.num_leaves)
    return tuple(
        _kernels.path_name(path) for path, _ in
        jax.tree_util.tree_flatten_with_path(dummy)[0])

  def as_params_tree(self) -> Any:
    """The matrices in a params-shaped tree, ``None`` at other leaves."""
    return self.structure.unflatten(
        [self._matrices.get(name) for name in self.names])

  def _aux(self):
    keys = tuple(self._matrices)
    infos = tuple(self.kernels[k] for k in keys)
    return keys, (keys, self.structure, self.learned, infos,
                  self.selected_by, self.rank_skipped, self.source)

  def tree_flatten_with_keys(self):
    keys, aux = self._aux()
    return [(jax.tree_util.DictKey(k), self._matrices[k]) for k in keys], aux

  def tree_flatten(self):
    keys, aux = self._aux()
    return [self._matrices[k] for k in keys], aux

  @classmethod
  def tree_unflatten(cls, aux, children) -> ScalingTable:
    keys, structure, learned, infos, selected_by, rank_skipped, source = aux
    return cls(dict(zip(keys, children)), structure, learned,
               dict(zip(keys, infos)), selected_by=selected_by,
               rank_skipped=rank_skipped, source=source)


def _table_to_state_dict(table: ScalingTable) -> dict[str, Any]:
  return dict(table)


def _table_from_state_dict(table: ScalingTable,
                           state: dict[str, Any]) -> ScalingTable:
  if set(state) != set(table):
    raise ValueError(
        f"The saved SGS matrices are for {sorted(state)}, the state to "
        f"restore into has {sorted(table)}: is it the same model?")
  return table.replace(state)


_flax_registered = False


def _register_with_flax() -> None:
  """Lets ``flax.serialization`` (``to_bytes``, ``from_bytes``) save tables.

  Flax is optional; whoever serialises a state with it has imported it by
  the time a table is built, and the table then registers itself, once.
  """
  global _flax_registered
  serialization = sys.modules.get("flax.serialization")
  if _flax_registered or serialization is None:
    return
  serialization.register_serialization_state(
      ScalingTable, _table_to_state_dict, _table_from_state_dict)
  _flax_registered = True


class SpatialScalingState(NamedTuple):
  """State of :func:`spatial_gradient_scaling`.

  Attributes:
    scalings: a :class:`ScalingTable`: at each scaled kernel's path, its
      matrix of the kernel's spatial shape, e.g. ``(kh, kw)`` (or ``(kh, kw,
      C_out)``; with a leading ``(L,)`` for stacked layers), in float32 or in
      the parameter's dtype when that is wider.

  Examples:
    >>> import jax.numpy as jnp, optax, sgs_optax
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}
    >>> state = optax.chain(sgs_optax.sgs(), optax.sgd(0.1)).init(params)
    >>> sgs_state = optax.tree_utils.tree_get(state, "SpatialScalingState")
    >>> sgs_state.scalings.learned, sgs_state.scalings["conv/kernel"].shape
    (True, (3, 3))
  """

  scalings: ScalingTable


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_matrix(name: str, matrix: Any) -> None:
  """Validates a user-given matrix (type, finiteness, sign)."""
  if np.ndim(matrix) == 0 and not isinstance(matrix, str):
    raise ValueError(
        f"scaling for {name} is the scalar {matrix!r}: a constant factor "
        "only rescales the learning rate. Pass a matrix (e.g. "
        "np.array([[1, 2, 1], [2, 3, 2], [1, 2, 1]])), a preset name, a "
        "params-shaped pytree of arrays, or None."
    )
  if not isinstance(matrix, (np.ndarray, jax.Array)):
    raise ValueError(
        f"scaling for {name} must be an array, got {type(matrix).__name__}: "
        "pass e.g. np.array([[1, 2, 1], [2, 3, 2], [1, 2, 1]]), a preset "
        "name, a params-shaped pytree of arrays, or None."
    )
  if not _is_concrete(matrix):
    return
  values = np.asarray(matrix, dtype=np.float64)
  if not np.all(np.isfinite(values)):
    raise ValueError(f"scaling for {name} has non-finite entries.")
  if np.any(values < 0):
    raise ValueError(
        f"scaling for {name} has negative entries; a gradient scale must be "
        ">= 0 (a branch contributes its scale squared)."
    )


class _Reading(NamedTuple):
  """One way a matrix's shape can fit a kernel."""

  shape: tuple[int, ...]
  meaning: str
  stacked: bool  # a leading axis of one matrix per stacked layer.


def _readings(info: KernelInfo, channels: int) -> list[_Reading]:
  """Every shape a matrix may take for a kernel, with what it then means."""
  size, layers = info.size, info.layers
  out = [_Reading(size, f"its {len(size)}-D matrix", False),
         _Reading((*size, channels), "one matrix per output channel", False)]
  if layers is not None:
    out += [_Reading((layers, *size), "one matrix per stacked layer", True),
            _Reading((layers, *size, channels),
                     "one matrix per stacked layer and output channel", True)]
  return out


def _reading(name: str, shape: tuple[int, ...], info: KernelInfo,
             channels: int) -> _Reading | None:
  """How a matrix of ``shape`` is read for a kernel, or None if it fits not.

  Raises:
    ValueError: if the shape fits the kernel in two ways.
  """
  fits = [r for r in _readings(info, channels) if r.shape == tuple(shape)]
  if len(fits) > 1:
    raise ValueError(
        f"scaling of shape {tuple(shape)} is ambiguous for {name} (kernel "
        f"size {info.size}, {channels} output channels, {info.layers} "
        f"stacked layers): it could be {' or '.join(r.meaning for r in fits)}"
        ". Pass the matrix with every axis, (layers, *size, C_out)."
    )
  return fits[0] if fits else None


def _fit_error(name: str, shape: tuple[int, ...], info: KernelInfo,
               channels: int) -> ValueError:
  return ValueError(
      f"scaling of shape {tuple(shape)} does not fit {name} with kernel "
      f"size {info.size}, {channels} output channels and "
      f"{info.layers or 'no'} stacked layers."
  )


def _kernel_facts(kernel: Any, layout: str) -> tuple[KernelInfo, int]:
  return (KernelInfo.of(kernel, layout),
          _kernels.output_channels(kernel, layout))


class _Spec(NamedTuple):
  """What a transform was asked to scale by, validated once."""

  scaling: Scaling
  single_array: bool
  normalize: bool
  strict: bool
  by_rank: bool  # kernel_layout is a string, selecting leaves by rank.


def _could_be_a_kernel(x: Any) -> bool:
  """A float leaf of rank 3 to 5 that mixes at least two axes: a bias kept
  as (C, 1, 1), as Equinox does, is not taken for a kernel."""
  shape = np.shape(x)
  return (not _is_masked(x) and 3 <= len(shape) <= 5
          and sum(size > 1 for size in shape) >= 2
          and jnp.issubdtype(jnp.result_type(x), jnp.floating))


def _skip(spec: _Spec, name: str, reason: str) -> tuple[None, str]:
  if spec.strict:
    raise ValueError(f"sgs(strict=True): {name} is not scaled: {reason}.")
  return None, reason


def _preset_matrix(spec: _Spec, name: str, size: tuple[int, ...]):
  """A preset's (or the learned mode's all-ones) starting matrix."""
  if any(s % 2 == 0 for s in size):
    return _skip(spec, name, f"its kernel size {size} is even")
  if spec.scaling is None:
    return np.ones(size), None
  reason = _branches.preset_skip_reason(spec.scaling, size)
  if reason is not None:
    return _skip(spec, name, reason)
  branches, dilations = _branches.preset_branches(spec.scaling, size)
  return _branches.branch_scaling(size, branches, dilations=dilations), None


def _starting_matrix(spec: _Spec, name: str, kernel: Any, layout: Any,
                     given: Any) -> tuple[Any, str | None]:
  """The matrix an eligible kernel starts with, or None and why not."""
  reason = _kernels.sgs_skip_reason(kernel, layout)
  if reason is not None:
    if given is not None and not spec.single_array:
      raise ValueError(f"scaling has a matrix for {name}, but {reason}.")
    if (spec.strict and spec.by_rank and layout is None
        and _could_be_a_kernel(kernel)):
      raise ValueError(
          f"sgs(strict=True): {name} of shape {kernel.shape} could be a conv "
          "kernel but the kernel_layout string only selects leaves of its "
          "rank: pass a per-leaf kernel_layout tree naming it (e.g. 'WIO' for "
          "a 1-D conv, 'LHWIO' for stacked layers, 'DHWIO' for a 3-D conv) "
          "or None to skip it."
      )
    return None, None if layout is None else reason
  size = _kernels.spatial_shape(kernel, layout)
  if spec.single_array:
    if given is None:
      return _skip(spec, name, f"no {size} matrix was given")
    return given, None
  if spec.scaling is None or isinstance(spec.scaling, str):
    return _preset_matrix(spec, name, size)
  if given is None:
    return _skip(spec, name, "the scaling pytree holds None there")
  _check_matrix(name, given)
  info, channels = _kernel_facts(kernel, layout)
  if _reading(name, np.shape(given), info, channels) is None:
    raise _fit_error(name, np.shape(given), info, channels)
  return given, None


def _as_state_matrix(name: str, matrix: Any, kernel: Any, layout: str,
                     normalize: bool) -> jax.Array:
  """The matrix in the state's dtype, normalised, one per stacked layer."""
  info, channels = _kernel_facts(kernel, layout)
  dtype = jnp.promote_types(jnp.float32, kernel.dtype)
  reading = _reading(name, np.shape(matrix), info, channels)
  matrix = jnp.asarray(matrix, dtype)
  lead = int(reading.stacked)
  if normalize:
    spatial = tuple(range(lead, lead + len(info.size)))
    mean = jnp.mean(matrix, axis=spatial, keepdims=True)
    if _is_concrete(mean) and np.any(np.asarray(mean) == 0):
      raise ValueError(
          f"scaling for {name} has mean 0, which normalize=True cannot "
          "divide by."
      )
    matrix = matrix / mean
  if info.layers is not None and not lead:
    matrix = jnp.broadcast_to(matrix, (info.layers, *matrix.shape))
  return matrix


def _is_size_prefix(shape: tuple[int, ...], info: KernelInfo) -> bool:
  """Whether ``shape`` starts with the kernel's size (a mistyped fit)."""
  n = len(info.size)
  return shape[:n] == info.size or (
      info.layers is not None and shape[:n + 1] == (info.layers, *info.size))


def _single_array_targets(shape: tuple[int, ...], params: Any,
                          layouts: Any) -> set[str]:
  """The kernels one given array is for, resolved by their spatial rank.

  Each eligible kernel reads the array by its own rank and stack (see
  :func:`_readings`); the array must mean the same for every kernel it fits.

  Raises:
    ValueError: if the array fits kernels with different meanings (e.g. a
      (3, 3) array: a 3x3 2-D kernel's matrix, and one matrix per output
      channel of a 3-tap 1-D kernel with 3 output channels), fits a kernel in
      two ways, fits no kernel, or starts with the size of a kernel of the
      rank it is for but misfits it (e.g. a wrong channel count).
  """
  fits, near = {}, {}

  def find(name, layout, kernel):
    if _kernels.sgs_skip_reason(kernel, layout) is None:
      info, channels = _kernel_facts(kernel, layout)
      reading = _reading(name, shape, info, channels)
      if reading is not None:
        fits[name] = (len(info.size), reading.meaning)
      elif _is_size_prefix(shape, info):
        near[name] = (len(info.size), _fit_error(name, shape, info, channels))

  _kernels.map_layouts(find, layouts, params)
  meanings = {meaning: name for name, meaning in fits.items()}
  if len(meanings) > 1:
    which = "; ".join(f"{name} ({rank}-D kernel) as {reading}"
                      for (rank, reading), name in sorted(meanings.items()))
    raise ValueError(
        f"scaling of shape {shape} is ambiguous: it fits {which}. Pass a "
        "params-shaped pytree with a matrix (or None) per kernel instead."
    )
  ranks = {rank for rank, _ in meanings}
  for rank, error in near.values():
    if not ranks or rank in ranks:
      raise error
  if not fits:
    raise ValueError(
        f"scaling of shape {shape} does not fit any selected conv kernel of "
        "the params."
    )
  return set(fits)


def _given_tree(spec: _Spec, params: Any, layouts: Any) -> Any:
  """A params-shaped tree of the user's matrices (None where none given)."""
  if spec.single_array:
    targets = _single_array_targets(np.shape(spec.scaling), params, layouts)
    return _kernels.map_layouts(
        lambda name, _: spec.scaling if name in targets else None, layouts)
  if spec.scaling is None or isinstance(spec.scaling, str):
    return jax.tree.map(lambda _: None, layouts,
                        is_leaf=_kernels.is_layout_leaf)
  try:
    jax.tree.map(lambda *_: None, params, spec.scaling, is_leaf=_is_masked)
  except ValueError as e:
    raise ValueError(
        f"scaling pytree does not match the structure of the params: {e}"
    ) from None
  # Masked-out leaves take no matrix, whatever the user's tree holds there.
  return jax.tree.map(lambda x, g: None if _is_masked(x) else g, params,
                      spec.scaling, is_leaf=_is_masked)


def _check_something_scaled(spec: _Spec, matrices: dict,
                            skipped: dict[str, str], params: Any,
                            layouts: Any, kernel_layout: Any) -> None:
  """A preset or the learned mode that scales no kernel at all raises."""
  if matrices or not (spec.scaling is None or isinstance(spec.scaling, str)):
    return
  _kernels.check_selects_a_leaf(f"sgs({spec.scaling!r})", params, layouts,
                                kernel_layout)
  if not skipped:
    return
  by_reason = {}
  for name, why in skipped.items():
    by_reason.setdefault(why, []).append(name)
  reasons = "; ".join(f"{', '.join(names)}: {why}"
                      for why, names in by_reason.items())
  raise ValueError(
      f"sgs({spec.scaling!r}) scales none of the conv kernels it selected "
      f"({reasons}). Pass matrices (e.g. from branch_scaling) or another "
      "preset, or leave these kernels out with kernel_layout or mask. If "
      "they are not laid out as kernel_layout says, pass their layout "
      "(Equinox and PyTorch-style weights are 'OIHW')."
  )


def _table_entries(spec: _Spec, learned: bool, params: Any, layouts: Any):
  """The matrices a spec gives ``params``, their kernels' facts, and why
  selected kernels got none."""
  given = _given_tree(spec, params, layouts)
  matrices, kernels, skipped = {}, {}, {}

  def add(name, layout, kernel, given_matrix):
    matrix, reason = _starting_matrix(spec, name, kernel, layout,
                                      given_matrix)
    if matrix is None:
      if reason is not None:
        skipped[name] = reason
      return
    if name in kernels:
      raise ValueError(
          f"Two scaled kernels have the path name {name!r} (a key "
          "holding '/' clashes with nested keys): rename one.")
    kernels[name] = KernelInfo.of(kernel, layout)
    if learned and any(s % 2 == 0 for s in kernels[name].size):
      raise ValueError(
          f"Learned SGS: {name} has the even kernel size "
          f"{kernels[name].size}, which the dependence matrix (centred "
          "on a tap) cannot fit: leave it out with kernel_layout or mask, "
          "or use learn=False.")
    matrices[name] = _as_state_matrix(name, matrix, kernel, layout,
                                      spec.normalize)

  _kernels.map_layouts(add, layouts, params, given)
  return matrices, kernels, skipped


def _rank_skipped(params: Any, layouts: Any,
                  kernel_layout: _kernels.KernelLayoutSpec) -> tuple[str, ...]:
  """Float leaves of rank 3 or more that a layout string left out for their
  rank alone: conv kernels of another rank (1-D, 3-D, stacked by a scan)
  look like this, and the refresh, which sees the convs, tells."""
  if not isinstance(kernel_layout, str):
    return ()
  names = []

  def note(name, layout, x):
    if (layout is None and not _is_masked(x)
        and np.ndim(x) not in (0, 1, 2, len(kernel_layout))
        and jnp.issubdtype(jnp.result_type(x), jnp.floating)):
      names.append(name)

  _kernels.map_layouts(note, layouts, params)
  return tuple(names)


def _digest(scaling: Scaling) -> str | None:
  """A digest of a constant array ``scaling`` (None for a preset or None)."""
  if scaling is None or isinstance(scaling, str):
    return None
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(scaling):
    leaf = np.asarray(leaf)
    digest.update(f"{leaf.shape}{leaf.dtype}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _rereads(spec: _Spec, learned: bool, table: Any) -> bool:
  """Whether this update reads constant matrices from the spec again.

  ``optax.inject_hyperparams`` calls the factory with the state's current
  hyperparameters at every update, so an array ``scaling`` changed there
  reaches the spec: eagerly it must apply. The table records a digest of the
  scaling it was read from, so an unchanged scaling leaves the state's
  matrices as they are (edited ones included). Under ``jit`` the injected
  array is traced and :func:`_validated_spec` raises, and a closed-over one
  is the one the table was built from. Learned matrices belong to the
  refresh; presets and ``None`` cannot change.
  """
  return (not learned and isinstance(table, ScalingTable)
          and not (spec.scaling is None or isinstance(spec.scaling, str))
          and all(_is_concrete(m) for m in table.values())
          and _digest(spec.scaling) != table.source)


def _reread(spec: _Spec, table: ScalingTable, updates: Any,
            layouts: Any) -> ScalingTable:
  """The table holding the spec's matrices now, in the table's dtypes and
  shardings."""
  matrices, _, _ = _table_entries(spec, False, updates, layouts)
  if set(matrices) != set(table):
    raise ValueError(
        f"sgs: the scaling now gives matrices for {sorted(matrices)}, the "
        f"state was initialised with matrices for {sorted(table)}: a new "
        "scaling must fit the same kernels. Re-initialise the optimizer."
    )

  def like(new, old):
    new = jnp.asarray(new, old.dtype)
    sharding = getattr(old, "sharding", None)
    return new if sharding is None else jax.device_put(new, sharding)

  return table.replace({name: like(m, table[name])
                        for name, m in matrices.items()},
                       source=_digest(spec.scaling))


def _scale_by_table(spec: _Spec, learned: bool,
                    kernel_layout: _kernels.KernelLayoutSpec
                    ) -> optax.GradientTransformationExtraArgs:
  """The unmasked transform: the state table and its application."""

  def init_fn(params: optax.Params) -> SpatialScalingState:
    params = _kernels.plain_arrays(params)
    if not jax.tree.leaves(params, is_leaf=_is_masked):
      # `optax.tree_utils.tree_map_params` calls init with a leafless
      # placeholder to find the params-shaped parts of the state (optax's
      # own `masked` detects it too). The table is keyed by the real params,
      # so it cannot match an empty one: a leaf marks it as not params.
      return SpatialScalingState(scalings=jnp.zeros((0,), jnp.float32))
    layouts = _kernels.resolve_layouts(params, kernel_layout)
    _kernels.check_plausible("sgs", params, layouts, kernel_layout)
    matrices, kernels, skipped = _table_entries(spec, learned, params,
                                                layouts)
    _check_something_scaled(spec, matrices, skipped, params, layouts,
                            kernel_layout)
    structure = jax.tree.structure(params, is_leaf=_is_masked)
    return SpatialScalingState(ScalingTable(
        matrices, structure, learned, kernels,
        selected_by=kernel_layout if isinstance(kernel_layout, str) else None,
        rank_skipped=_rank_skipped(params, layouts, kernel_layout)
        if learned else (),
        source=None if learned else _digest(spec.scaling)))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    layouts = _kernels.resolve_layouts(updates, kernel_layout)
    _kernels.check_plausible("sgs", updates, layouts, kernel_layout)
    table = state.scalings
    if _rereads(spec, learned, table):
      table = _reread(spec, table, updates, layouts)
      state = state._replace(scalings=table)
    seen = set()

    def scale(name, layout, grad):
      if name not in table:
        return grad
      if layout is None:
        raise ValueError(
            f"sgs has a matrix for {name} but kernel_layout selects no "
            "kernel there at update time."
        )
      seen.add(name)
      factor = _kernels.broadcast_to_kernel(table[name], layout)
      return (grad * factor).astype(grad.dtype)

    scaled = _kernels.map_layouts(scale, layouts, updates)
    if seen != set(table):
      raise ValueError(
          f"sgs state has matrices for {sorted(set(table) - seen)}, which "
          "the updates do not hold: are they from the params the optimizer "
          "was initialised with?"
      )
    return scaled, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _validated_spec(scaling: Scaling, normalize: bool, strict: bool,
                    by_rank: bool) -> _Spec:
  if isinstance(scaling, jax.core.Tracer):
    raise ValueError(
        "sgs(scaling=...) got a traced array: the matrices are read once, "
        "into the optimizer state, so a traced (e.g. injected) value would "
        "be ignored after init. Under optax.inject_hyperparams pass "
        "static_args=('scaling',)."
    )
  if isinstance(scaling, str) and scaling not in _branches.PRESET_NAMES:
    _branches.preset_branches(scaling, (3, 3))  # raises with the valid names.
  if isinstance(scaling, (list, tuple)) and all(
      isinstance(x, (int, float, list, tuple)) for x in scaling):
    _check_matrix("all kernels", scaling)  # raises: not an array.
  single_array = isinstance(scaling, (np.ndarray, jax.Array))
  if single_array or isinstance(scaling, (int, float, np.number)):
    _check_matrix("all kernels", scaling)
  return _Spec(scaling, single_array, bool(normalize), bool(strict), by_rank)


def spatial_gradient_scaling(
    scaling: Scaling = None,
    *,
    learn: bool | None = None,
    kernel_layout: _kernels.KernelLayoutSpec = "HWIO",
    mask: Any = None,
    normalize: bool = False,
    strict: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies each conv kernel's gradient by a per-layer spatial matrix.

  For every eligible kernel the gradient ``g`` becomes ``S * g``, with ``S``
  of the kernel's spatial shape (``(k,)``, ``(kh, kw)`` or ``(kd, kh, kw)``)
  broadcast over the channel axes, or with a trailing ``C_out`` axis (one
  matrix per output channel). Eligible, the same rule for 1-D, 2-D and 3-D
  convs: a floating-point kernel whose spatial sizes are all at least 2, the
  stem and depthwise convs included. A size-1 axis mixes no neighbours, so
  1x1, 1xK and Kx1 2-D kernels (never scaled in the paper), 1-tap 1-D
  kernels and 3-D kernels such as ``(1, 3, 3)`` pass through bit-identical,
  as do biases, norm scales and dense kernels.

  With ``S = branch_scaling(...)`` of a set of parallel branches, SGD on the
  merged conv is *exactly* SGD on the branched conv (plain, heavy-ball or
  Nesterov momentum, coupled L2 weight decay), without paying for the branches.

  Placement (exact for branched networks, see the placement guide): for
  SGD-family optimizers put it first, before weight decay and momentum, as in
  the paper, with ``S = branch_scaling(..., power=2)``:
  ``optax.chain(sgs("acb"), optax.add_decayed_weights(5e-4),
  optax.sgd(0.1, momentum=0.9))``. Scale-invariant optimizers (Adam, AdamW,
  RMSProp, Adagrad, Lion, sign descent) divide a gradient scale out again, so
  there it goes *after* the direction and before decoupled weight decay and
  the learning rate, with ``S1 = branch_scaling(..., power=1)`` (the presets
  have unit scales and serve both):
  ``optax.chain(optax.scale_by_adam(), sgs("acb"),
  optax.add_decayed_weights(1e-2), optax.scale_by_learning_rate(1e-3))``
  for AdamW.

  Args:
    scaling: what to multiply by.

      * ``None``: all ones (a no-op) until the matrices are refreshed from
        data with :func:`sgs_optax.refresh_scalings` (odd sizes only).
      * a preset: the exact matrix of a branch set, built for each kernel's
        own (odd) size, every branch centred, unit scales:

        - ``"acb"``: KxK + 1xK + Kx1 (ACNet), 2-D kernels only (in 1-D its
          asymmetric branches are the kernel itself or one tap; in 3-D they
          could be lines or planes: build the one you mean with
          :func:`sgs_optax.branch_scaling`);
        - ``"repvgg"``: the kernel + its centre tap (RepVGG's 3x3 + 1x1), any
          rank;
        - ``"replknet"``: the kernel + a centred 5 taps per axis (RepLKNet's
          large kernel with a parallel 5x5), every axis at least 5;
        - ``"unireplknet"``: the kernel + UniRepLKNet's dilated small kernels,
          for equal sizes 5 to 17 on every axis (e.g. 13: sizes (5, 7, 3, 3,
          3), dilations (1, 2, 3, 4, 5)); see
          :func:`sgs_optax.preset_branches`.

        The published blocks train a BatchNorm on every branch, so they match
        these presets only with frozen unit scales: the presets are their
        unit-scale analogues. A kernel a preset is not defined for is left
        alone (``strict=True`` raises); a preset that scales none of the
        selected kernels raises.
      * an array, used for every eligible kernel it fits, read by that
        kernel's rank: ``size`` (its matrix), ``(*size, C_out)`` (one per
        output channel) and, for stacked layers, ``(L, *size)`` and ``(L,
        *size, C_out)``. Kernels it does not fit are left alone. It must mean
        the same for every kernel: a ``(3, 3)`` array is the matrix of a 3x3
        2-D kernel but one matrix per output channel of a 3-tap 1-D kernel
        with 3 output channels, so params holding both raise (pass a pytree).
      * a pytree with the structure of the params holding such an array or
        ``None`` at each leaf.

      Matrices are read at init; constant arrays are read again at every
      eager update, so that an eager change under
      ``optax.inject_hyperparams`` applies. Under ``jit`` pass
      ``static_args=("scaling",)``; a traced ``scaling`` raises.
    learn: whether :func:`sgs_optax.refresh_scalings` replaces the matrices
      with ones learned from data. Defaults to ``scaling is None``;
      ``sgs("acb", learn=True)`` starts from ACB and is refreshed. The
      refresh never touches a transform built with ``learn=False``.
    kernel_layout: ``"HWIO"`` (Flax, Haiku), ``"OIHW"`` (PyTorch-style,
      Equinox), another layout string (``"WIO"``, ``"OIW"``, ``"DHWIO"``,
      ``"OIDHW"`` for 1-D and 3-D convs, a leading ``"L"`` for stacked
      layers), or a params-shaped pytree (or callable ``params -> pytree``)
      of layout strings and ``None`` per leaf, e.g. for transposed convs
      (``"HWOI"``) or models mixing ranks. A string applies to every leaf of
      its rank, and a leaf it reads far less plausibly than the other
      standard arrangement raises (see :func:`sgs_optax.conv_layouts`, which
      reads each kernel's layout from the model, and the "Kernel layouts"
      how-to).
    mask: optional optax-style mask (a pytree of booleans, possibly a prefix
      of the params, or a callable returning one); the transform is then
      ``optax.masked(..., mask)`` and leaves where it is False are never
      scaled.
    normalize: divide each matrix by its mean (per output channel for
      per-channel matrices). Off by default so that presets are exactly
      equivalent to the branched network; with no weight decay in the chain,
      normalising is the same as dividing the learning rate by ``mean(S)``.
    strict: raise instead of silently leaving an eligible kernel unscaled
      (an even-sized kernel under a preset or the learned mode, a kernel a
      preset is not defined for, or a kernel no given array fits).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SpatialScalingState` (inside an ``optax.MaskedState`` with
    ``mask``).

  Raises:
    ValueError: for an unknown preset or layout, a preset that scales no
      selected kernel, a matrix that does not fit its kernel or an array that
      fits kernels with different meanings, a ``scaling`` pytree that does
      not match the params, a matrix that is not an array, negative,
      non-finite, or of mean 0 with ``normalize=True``, a layout string that
      misreads a leaf (e.g. a ``(32, 16, 3, 3)`` OIHW weight under
      ``"HWIO"``), and (with ``strict=True``) unscaled kernels.

  Examples:
    >>> import jax.numpy as jnp, optax, sgs_optax
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)),
    ...                    "bias": jnp.ones(4)}}
    >>> tx = optax.chain(sgs_optax.sgs("acb"), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates["conv"]["kernel"][:, :, 0, 0]
    Array([[-0.1, -0.2, -0.1],
           [-0.2, -0.3, -0.2],
           [-0.1, -0.2, -0.1]], dtype=float32)
    >>> conv1d = {"kernel": jnp.ones((7, 2, 4))}  # a 7-tap 1-D conv
    >>> state = sgs_optax.sgs("unireplknet", kernel_layout="WIO").init(conv1d)
    >>> sgs_optax.get_scalings(state)["kernel"]
    Array([2., 3., 2., 4., 2., 3., 2.], dtype=float32)

  References:
    Detkov et al., `Reparameterization through Spatial Gradient Scaling
    <https://arxiv.org/abs/2303.02733>`_, ICLR 2023.
    Ding et al., `Scaling Up Your Kernels to 31x31
    <https://arxiv.org/abs/2203.06717>`_, CVPR 2022 (RepLKNet).
    Ding et al., `UniRepLKNet <https://arxiv.org/abs/2311.15599>`_, CVPR 2024.
  """
  spec = _validated_spec(scaling, normalize, strict,
                         isinstance(kernel_layout, str))
  if isinstance(kernel_layout, str):
    _kernels.parse_layout(kernel_layout)  # Fail here, not at init.
  learned = scaling is None if learn is None else bool(learn)
  tx = _scale_by_table(spec, learned, kernel_layout)
  return tx if mask is None else optax.masked(tx, mask)


sgs = spatial_gradient_scaling


def sgs_states(opt_state: optax.OptState) -> list[tuple[Any, Any]]:
  """Every :class:`SpatialScalingState` in ``opt_state`` with its path."""
  return optax.tree_utils.tree_get_all_with_path(
      opt_state, "SpatialScalingState")


def get_scalings(opt_state: optax.OptState) -> optax.Params:
  """Returns the matrices of the one SGS state inside an optimizer state.

  Args:
    opt_state: any optimizer state (a chain, ``masked``, ``partition``,
      ``inject_hyperparams`` ... nesting) holding one
      :class:`SpatialScalingState`.

  Returns:
    A tree with the structure of the params the transform was initialised
    with: the matrix at each scaled kernel, ``None`` elsewhere (and where a
    wrapper masked the params out).

  Raises:
    ValueError: if there is no SGS state, or more than one.

  Examples:
    >>> import jax.numpy as jnp, optax, sgs_optax
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)),
    ...                    "bias": jnp.ones(4)}}
    >>> state = optax.chain(sgs_optax.sgs("repvgg"), optax.sgd(0.1)).init(
    ...     params)
    >>> scalings = sgs_optax.get_scalings(state)
    >>> scalings["conv"]["bias"] is None
    True
    >>> scalings["conv"]["kernel"]
    Array([[1., 1., 1.],
           [1., 2., 1.],
           [1., 1., 1.]], dtype=float32)
  """
  states = sgs_states(opt_state)
  if len(states) != 1:
    raise ValueError(
        f"get_scalings expects exactly one SpatialScalingState in the "
        f"optimizer state, found {len(states)}."
    )
  table = states[0][1].scalings
  if not isinstance(table, ScalingTable):
    raise ValueError(
        "This SpatialScalingState was initialised without params (e.g. by "
        "optax.tree_utils.tree_map_params): it holds no matrices."
    )
  return table.as_params_tree()
