"""The reading of ``sgs``'s ``scaling`` into one matrix per conv kernel.

``scaling`` is read once, at init, into a :class:`ScalingTable`: the state
matrix of every scaled kernel, keyed by its path, beside a
:class:`KernelShape` per kernel. What it may be:

* ``None`` (all ones, for the learned mode) or a preset name (the matrix of
  the preset's branch set, built for each kernel's own odd size);
* one array, for every eligible kernel it fits, as that kernel's matrix
  (``size``) or one matrix per output channel (``(*size, C_out)``); a stacked
  kernel uses it for every layer;
* a params-shaped pytree with a matrix or ``None`` per leaf, where a stacked
  kernel may also take one matrix per layer (``(L, *size)`` or ``(L, *size,
  C_out)``).

Every error of the reading is made by :func:`error`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import functools
import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgs_optax import _branches
from sgs_optax import _frameworks
from sgs_optax import _kernels

Scaling = Any  # None, a preset name, an array, or a params-shaped tree.


def error(where: str, problem: str, hint: str = "") -> ValueError:
  """The one form of every error in the reading of ``scaling``."""
  return ValueError(f"{where}: {problem}." + (f" {hint}." if hint else ""))


class KernelShape(NamedTuple):
  """The sizes of a scaled kernel that its matrix and the refresh need."""

  size: tuple[int, ...]  # spatial sizes, in the parameter's order.
  in_channels: int  # per feature group, as stored in the kernel.
  out_channels: int
  layers: int | None  # the size of a stack ("L") axis, if any.
  # The kernel's layout: the matrix's spatial axes are in the order it
  # stores them (see `_kernels.to_conv_order`).
  layout: str = ""

  @classmethod
  def of(cls, kernel: Any, layout: str) -> KernelShape:
    return cls(_kernels.spatial_shape(kernel, layout),
               _kernels.input_channels(kernel, layout),
               _kernels.output_channels(kernel, layout),
               _kernels.layers(kernel, layout), layout)

  @property
  def conv_size(self) -> tuple[int, ...]:
    """The spatial sizes in the order the conv reads them (D, H, W)."""
    return _kernels.to_conv_order(self.size, self.layout)

  def describe(self) -> str:
    stack = f", {self.layers} stacked layers" if self.layers else ""
    return (f"kernel size {self.size}, {self.out_channels} output "
            f"channels{stack}")


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
    shapes: per key, the kernel's spatial size, input and output channels,
      stacked layers and layout (static).
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
    >>> list(table), table.learned, table.shapes["conv/kernel"].size
    (['conv/kernel'], False, (3, 3))
    >>> table["conv/kernel"][1, 1]
    Array(2., dtype=float32)
  """

  def __init__(self, matrices: Mapping[str, Any], structure: Any,
               learned: bool, shapes: Mapping[str, KernelShape], *,
               selected_by: str | None = None,
               rank_skipped: tuple[str, ...] = (),
               source: str | None = None):
    self._matrices = dict(matrices)
    self.structure = structure
    self.learned = bool(learned)
    self.shapes = dict(shapes)
    self.selected_by = selected_by
    self.rank_skipped = tuple(rank_skipped)
    self.source = source
    _frameworks.register_flax_serialization(
        ScalingTable, _table_to_state_dict, _table_from_state_dict)

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
                        self.structure, self.learned, self.shapes,
                        **{**self._selection, **facts})

  @property
  def _selection(self) -> dict[str, Any]:
    return {"selected_by": self.selected_by,
            "rank_skipped": self.rank_skipped, "source": self.source}

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
    shapes = tuple(self.shapes[k] for k in keys)
    return keys, (keys, self.structure, self.learned, shapes,
                  self.selected_by, self.rank_skipped, self.source)

  def tree_flatten_with_keys(self):
    keys, aux = self._aux()
    return [(jax.tree_util.DictKey(k), self._matrices[k]) for k in keys], aux

  def tree_flatten(self):
    keys, aux = self._aux()
    return [self._matrices[k] for k in keys], aux

  @classmethod
  def tree_unflatten(cls, aux, children) -> ScalingTable:
    keys, structure, learned, shapes, selected_by, rank_skipped, source = aux
    return cls(dict(zip(keys, children)), structure, learned,
               dict(zip(keys, shapes)), selected_by=selected_by,
               rank_skipped=rank_skipped, source=source)


# Docs and reprs show the public name; doctest then finds the class's
# examples through `__test__` only.
ScalingTable.__module__ = "sgs_optax"
__test__ = {"ScalingTable": ScalingTable}


def _table_to_state_dict(table: ScalingTable) -> dict[str, Any]:
  return dict(table)


def _table_from_state_dict(table: ScalingTable,
                           state: dict[str, Any]) -> ScalingTable:
  if set(state) != set(table):
    raise ValueError(
        f"The saved SGS matrices are for {sorted(state)}, the state to "
        f"restore into has {sorted(table)}: is it the same model?")
  return table.replace(state)


class Spec(NamedTuple):
  """What a transform was asked to scale by, validated once."""

  scaling: Scaling
  kind: str  # "ones" (None), "preset", "array" or "tree".
  normalize: bool
  strict: bool
  by_rank: bool  # kernel_layout is a string, selecting leaves by rank.


_EXAMPLE = "np.array([[1, 2, 1], [2, 3, 2], [1, 2, 1]])"
_WHAT_TO_PASS = (f"Pass a matrix (e.g. {_EXAMPLE}), a preset name, a "
                 "params-shaped pytree of arrays, or None")


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_matrix(where: str, matrix: Any) -> None:
  """Validates a user-given matrix (type, finiteness, sign)."""
  if np.ndim(matrix) == 0 and not isinstance(matrix, str):
    raise error(where, f"got the scalar {matrix!r}, a constant factor that "
                "only rescales the learning rate", _WHAT_TO_PASS)
  if not isinstance(matrix, (np.ndarray, jax.Array)):
    raise error(where, f"must be an array, got {type(matrix).__name__}",
                _WHAT_TO_PASS)
  if not _is_concrete(matrix):
    return
  values = np.asarray(matrix, dtype=np.float64)
  if not np.all(np.isfinite(values)):
    raise error(where, "has non-finite entries")
  if np.any(values < 0):
    raise error(where, "has negative entries", "A gradient scale must be >= 0 "
                "(a branch contributes its scale squared)")


def _kind(scaling: Scaling) -> str:
  if scaling is None:
    return "ones"
  if isinstance(scaling, str):
    return "preset"
  if isinstance(scaling, (np.ndarray, jax.Array, int, float, np.number)):
    return "array"
  if isinstance(scaling, (list, tuple)) and all(
      isinstance(x, (int, float, list, tuple)) for x in scaling):
    return "array"  # meant as one; `_check_matrix` says to pass an array.
  return "tree"


def read_spec(scaling: Scaling, normalize: bool, strict: bool,
              by_rank: bool) -> Spec:
  """Validates ``scaling`` as far as it can be without the params."""
  where = "sgs(scaling=...)"
  if isinstance(scaling, jax.core.Tracer):
    raise error(where, "got a traced array, which would be ignored after "
                "init (the matrices are read once, into the state)",
                "Under optax.inject_hyperparams pass "
                "static_args=('scaling',)")
  if isinstance(scaling, str) and scaling not in _branches.PRESETS:
    raise error(where, f"unknown scaling preset {scaling!r}",
                f"Pass one of {', '.join(map(repr, _branches.PRESETS))}, "
                "an array, a params-shaped pytree of arrays, or None")
  kind = _kind(scaling)
  if kind == "array":
    _check_matrix(where, scaling)  # raises for a scalar or a nested list.
  return Spec(scaling, kind, bool(normalize), bool(strict), by_rank)


class MatrixForm(NamedTuple):
  """One way a matrix's axes can map onto a kernel's."""

  shape: tuple[int, ...]
  meaning: str
  per_layer: bool  # a leading axis of one matrix per stacked layer.


def matrix_forms(ks: KernelShape, per_layer: bool) -> list[MatrixForm]:
  """The shapes a matrix may take for a kernel, with what each means; the
  per-layer ones only where ``per_layer`` (a pytree's matrix)."""
  size, out = ks.size, ks.out_channels
  forms = [MatrixForm(size, f"its {len(size)}-D matrix", False),
           MatrixForm((*size, out), "one matrix per output channel", False)]
  if per_layer and ks.layers is not None:
    forms += [MatrixForm((ks.layers, *size), "one matrix per stacked layer",
                         True),
              MatrixForm((ks.layers, *size, out),
                         "one matrix per stacked layer and output channel",
                         True)]
  return forms


def _tree_matrix_form(name: str, shape: tuple[int, ...],
                      ks: KernelShape) -> MatrixForm:
  """How a pytree's matrix of ``shape`` is read for its kernel."""
  fits = [f for f in matrix_forms(ks, True) if f.shape == shape]
  where = f"sgs: the scaling of shape {shape} for {name}"
  if not fits:
    raise error(where, f"does not fit its kernel ({ks.describe()})")
  if len(fits) > 1:
    raise error(where, f"is ambiguous ({ks.describe()}): it could be "
                f"{' or '.join(f.meaning for f in fits)}",
                "Pass the matrix with every axis, (layers, *size, C_out)")
  return fits[0]


def _array_misfit(shape: tuple[int, ...], ks: KernelShape) -> str | None:
  """Why one array, meant for kernels like ``ks``, does not fit it; None if
  it is not meant for such a kernel (it does not start with its size)."""
  n, size = len(ks.size), ks.size
  if ks.layers is not None and shape[:n + 1] == (ks.layers, *size):
    return (f"One array is never read per stacked layer: pass a "
            f"params-shaped pytree with the {shape} matrix at that kernel")
  if shape[:n] == size:
    return (f"One array is the kernel's matrix, {size}, or one per output "
            f"channel, {(*size, ks.out_channels)}")
  return None


def _array_targets(shape: tuple[int, ...],
                   shapes: Mapping[str, KernelShape]) -> set[str]:
  """The kernels one array is for: those it fits as their matrix or one per
  output channel, which must all be of one spatial rank (the array must
  mean the same for all of them)."""
  where = f"sgs: the scaling of shape {shape}"
  fits = {name: len(ks.size) for name, ks in shapes.items()
          if shape in (ks.size, (*ks.size, ks.out_channels))}
  if len(set(fits.values())) > 1:
    which = "; ".join(
        f"{name} as a {len(shapes[name].size)}-D kernel's "
        f"{'matrix' if len(shape) == fits[name] else 'per-channel matrix'}"
        for name in sorted(fits))
    raise error(where, f"is ambiguous: it fits {which}",
                "Pass a params-shaped pytree with a matrix (or None) per "
                "kernel instead")
  for name, ks in shapes.items():
    if name in fits or (fits and len(ks.size) not in fits.values()):
      continue  # a kernel of another rank does not read it.
    why = _array_misfit(shape, ks)
    if why is not None:
      raise error(where, f"does not fit {name} ({ks.describe()})", why)
  if not fits:
    raise error(where, "does not fit any selected conv kernel of the params")
  return set(fits)


class _Kernel(NamedTuple):
  """An eligible kernel met in the reading."""

  leaf: Any
  shape: KernelShape
  given: Any  # the matrix a pytree gives it, or None.


def _given_tree(spec: Spec, params: Any, layouts: Any) -> Any:
  """A params-shaped tree of a pytree ``scaling``'s matrices, None where it
  gives none (and everywhere for another kind)."""
  if spec.kind != "tree":
    return jax.tree.map(lambda _: None, layouts,
                        is_leaf=_kernels.is_layout_leaf)
  try:
    jax.tree.map(lambda *_: None, params, spec.scaling,
                 is_leaf=_kernels.is_masked)
  except ValueError as e:
    raise error("sgs", "the scaling pytree does not match the structure of "
                f"the params: {e}") from None
  # Masked-out leaves take no matrix, whatever the user's tree holds there.
  return jax.tree.map(lambda x, g: None if _kernels.is_masked(x) else g,
                      params, spec.scaling, is_leaf=_kernels.is_masked)


def _could_be_a_kernel(x: Any) -> bool:
  """A float leaf of rank 3 to 5 that mixes at least two axes: a bias kept
  as (C, 1, 1), as Equinox does, is not taken for a kernel."""
  shape = np.shape(x)
  return (not _kernels.is_masked(x) and 3 <= len(shape) <= 5
          and sum(size > 1 for size in shape) >= 2
          and jnp.issubdtype(jnp.result_type(x), jnp.floating))


def _check_unscaled(spec: Spec, name: str, leaf: Any, layout: Any,
                    given: Any, reason: str) -> None:
  """Raises for a leaf SGS does not scale that was meant to be."""
  if given is not None:
    raise error("sgs", f"the scaling has a matrix for {name}, but {reason}")
  if (spec.strict and spec.by_rank and layout is None
      and _could_be_a_kernel(leaf)):
    raise error(
        "sgs(strict=True)", f"{name} of shape {leaf.shape} could be a conv "
        "kernel but the kernel_layout string only selects leaves of its rank",
        "Pass a per-leaf kernel_layout tree naming it (e.g. 'WIO' for a 1-D "
        "conv, 'LHWIO' for stacked layers, 'DHWIO' for a 3-D conv) or None "
        "to skip it")


def _eligible_kernels(spec: Spec, params: Any, layouts: Any,
                      skipped: dict[str, str]) -> dict[str, _Kernel]:
  """The kernels SGS may scale; the other selected leaves go to
  ``skipped`` with the reason."""
  kernels = {}

  def visit(name, layout, leaf, given):
    reason = _kernels.sgs_skip_reason(leaf, layout)
    if reason is None:
      if name in kernels:
        raise error("sgs", f"two kernels have the path name {name!r} (a key "
                    "holding '/' clashes with nested keys)", "Rename one")
      kernels[name] = _Kernel(leaf, KernelShape.of(leaf, layout), given)
      return
    _check_unscaled(spec, name, leaf, layout, given, reason)
    if layout is not None:
      skipped[name] = reason

  _kernels.map_layouts(visit, layouts, params,
                       _given_tree(spec, params, layouts))
  return kernels


def _preset_matrix(spec: Spec, size: tuple[int, ...]) -> Any:
  """A preset's (or the learned mode's all-ones) matrix, or why there is
  none."""
  if any(s % 2 == 0 for s in size):
    return f"its kernel size {size} is even"
  if spec.kind == "ones":
    return np.ones(size)
  reason = _branches.PRESETS[spec.scaling].undefined(size)
  if reason is not None:
    return reason
  branches, dilations = _branches.PRESETS[spec.scaling].build(size)
  return _branches.branch_scaling(size, branches, dilations=dilations)


def _starting_matrix(spec: Spec, name: str, kernel: _Kernel,
                     targets: set[str]) -> tuple[Any, bool] | str:
  """A kernel's matrix and whether it is per layer, or why it has none."""
  size = kernel.shape.size
  if spec.kind in ("ones", "preset"):
    matrix = _preset_matrix(spec, size)
    return matrix if isinstance(matrix, str) else (matrix, False)
  if spec.kind == "array":
    if name not in targets:
      return f"no {size} matrix was given"
    return spec.scaling, False
  if kernel.given is None:
    return "the scaling pytree holds None there"
  _check_matrix(f"sgs: the scaling for {name}", kernel.given)
  form = _tree_matrix_form(name, np.shape(kernel.given), kernel.shape)
  return kernel.given, form.per_layer


def state_matrix(name: str, matrix: Any, ks: KernelShape, per_layer: bool,
                 dtype: Any, normalize: bool) -> jax.Array:
  """The matrix in the state's dtype, normalised, one per stacked layer."""
  matrix = jnp.asarray(matrix, dtype)
  lead = int(per_layer)
  if normalize:
    spatial = tuple(range(lead, lead + len(ks.size)))
    mean = jnp.mean(matrix, axis=spatial, keepdims=True)
    if _is_concrete(mean) and np.any(np.asarray(mean) == 0):
      raise error(f"sgs: the scaling for {name}",
                  "has mean 0, which normalize=True cannot divide by")
    matrix = matrix / mean
  if ks.layers is not None and not lead:
    matrix = jnp.broadcast_to(matrix, (ks.layers, *matrix.shape))
  return matrix


class KernelMatrices(NamedTuple):
  """What a spec gives the kernels of some params."""

  matrices: dict[str, jax.Array]  # the state matrix per scaled kernel.
  shapes: dict[str, KernelShape]  # per scaled kernel.
  skipped: dict[str, str]  # why a selected leaf got no matrix.


def _skip(spec: Spec, name: str, reason: str,
          skipped: dict[str, str]) -> None:
  if spec.strict:
    raise error("sgs(strict=True)", f"{name} is not scaled: {reason}")
  skipped[name] = reason


def _check_learnable(name: str, ks: KernelShape) -> None:
  if any(s % 2 == 0 for s in ks.size):
    raise error(
        "Learned SGS", f"{name} has the even kernel size {ks.size}, which the "
        "dependence matrix (centred on a tap) cannot fit",
        "Leave it out with kernel_layout or mask, or use learn=False")


def kernel_matrices(spec: Spec, learned: bool, params: Any,
                    layouts: Any) -> KernelMatrices:
  """Reads ``spec`` for the kernels of ``params``: once per kernel."""
  skipped = {}
  kernels = _eligible_kernels(spec, params, layouts, skipped)
  targets = set()
  if spec.kind == "array":
    targets = _array_targets(np.shape(spec.scaling),
                             {n: k.shape for n, k in kernels.items()})
  matrices, shapes = {}, {}
  for name, kernel in kernels.items():
    start = _starting_matrix(spec, name, kernel, targets)
    if isinstance(start, str):
      _skip(spec, name, start, skipped)
      continue
    if learned:
      _check_learnable(name, kernel.shape)
    shapes[name] = kernel.shape
    dtype = jnp.promote_types(jnp.float32, kernel.leaf.dtype)
    matrices[name] = state_matrix(name, start[0], kernel.shape, start[1],
                                  dtype, spec.normalize)
  return KernelMatrices(matrices, shapes, skipped)


def check_something_scaled(spec: Spec, read: KernelMatrices, params: Any,
                           layouts: Any, kernel_layout: Any) -> None:
  """A preset or the learned mode that scales no kernel at all raises."""
  if read.matrices or spec.kind not in ("ones", "preset"):
    return
  _kernels.check_selects_a_leaf(f"sgs({spec.scaling!r})", params, layouts,
                                kernel_layout)
  if not read.skipped:
    return
  by_reason = {}
  for name, why in read.skipped.items():
    by_reason.setdefault(why, []).append(name)
  reasons = "; ".join(f"{', '.join(names)}: {why}"
                      for why, names in by_reason.items())
  raise error(
      f"sgs({spec.scaling!r})", f"scales none of the conv kernels it "
      f"selected ({reasons})", "Pass matrices (e.g. from branch_scaling) or "
      "another preset, or leave these kernels out with kernel_layout or "
      "mask. If they are not laid out as kernel_layout says, pass their "
      "layout (Equinox and PyTorch-style weights are 'OIHW')")


def digest(scaling: Scaling) -> str | None:
  """A digest of a constant array ``scaling`` (None for a preset or None)."""
  if scaling is None or isinstance(scaling, str):
    return None
  hashed = hashlib.sha256()
  for leaf in jax.tree.leaves(scaling):
    leaf = np.asarray(leaf)
    hashed.update(f"{leaf.shape}{leaf.dtype}".encode())
    hashed.update(leaf.tobytes())
  return hashed.hexdigest()


def rereads(spec: Spec, learned: bool, table: Any) -> bool:
  """Whether this update reads constant matrices from the spec again.

  ``optax.inject_hyperparams`` calls the factory with the state's current
  hyperparameters at every update, so an array ``scaling`` changed there
  reaches the spec: eagerly it must apply. The table records a digest of the
  scaling it was read from, so an unchanged scaling leaves the state's
  matrices as they are (edited ones included). Under ``jit`` the injected
  array is traced and :func:`read_spec` raises, and a closed-over one is the
  one the table was built from. Learned matrices belong to the refresh;
  presets and ``None`` cannot change.
  """
  return (not learned and isinstance(table, ScalingTable)
          and spec.kind in ("array", "tree")
          and all(_is_concrete(m) for m in table.values())
          and digest(spec.scaling) != table.source)


def reread(spec: Spec, table: ScalingTable, updates: Any,
           layouts: Any) -> ScalingTable:
  """The table holding the spec's matrices now, in the table's dtypes and
  shardings."""
  matrices = kernel_matrices(spec, False, updates, layouts).matrices
  if set(matrices) != set(table):
    raise error(
        "sgs", f"the scaling now gives matrices for {sorted(matrices)}, the "
        f"state was initialised with matrices for {sorted(table)}",
        "A new scaling must fit the same kernels: re-initialise the optimizer")

  def like(new, old):
    new = jnp.asarray(new, old.dtype)
    sharding = getattr(old, "sharding", None)
    return new if sharding is None else jax.device_put(new, sharding)

  return table.replace({name: like(m, table[name])
                        for name, m in matrices.items()},
                       source=digest(spec.scaling))
