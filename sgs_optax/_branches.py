"""Parallel conv branches: their exact SGS matrix, presets, merging.

A branched conv sums parallel branches inside one kernel window of any
number of spatial axes. Branch ``k`` is a kernel ``V_k`` of size ``b_k`` with
dilation ``d_k``, centred in the window (its taps cover ``(b - 1) * d + 1``
positions per axis, every ``d``-th one), times a constant scalar ``alpha_k``
(a frozen BatchNorm scale counts, per output channel if need be). The network
only ever sees the merged kernel ``W = sum_k alpha_k * P_k(V_k)``, where
``P_k`` places the taps, and SGD on the branches moves ``W`` exactly as SGD on
``W`` with its gradient multiplied by

    S = sum_k alpha_k**2 * M_k,

``M_k`` being the 0/1 mask of the positions branch ``k`` covers (SPEC 1.2:
``P_k P_k^T = M_k`` for any injective placement). A scale-invariant
elementwise optimizer (Adam, AdamW, RMSProp, Adagrad from zero, Lion, sign
descent) on the branches moves ``W`` exactly as the same optimizer on ``W``
with its direction multiplied by ``S1 = sum_k |alpha_k| * M_k``
(``power=1``), placed after the direction and before decoupled weight decay
and the learning rate.

References:
  Detkov et al., `Reparameterization through Spatial Gradient Scaling
  <https://arxiv.org/abs/2303.02733>`_, ICLR 2023.
  Ding et al., `ACNet: Strengthening the Kernel Skeletons for Powerful CNN via
  Asymmetric Convolution Blocks <https://arxiv.org/abs/1908.03930>`_, 2019.
  Ding et al., `RepVGG: Making VGG-style ConvNets Great Again
  <https://arxiv.org/abs/2101.03697>`_, 2021.
  Ding et al., `Scaling Up Your Kernels to 31x31: Revisiting Large Kernel
  Design in CNNs <https://arxiv.org/abs/2203.06717>`_, CVPR 2022.
  Ding et al., `UniRepLKNet: A Universal Perception Large-Kernel ConvNet for
  Audio, Video, Point Cloud, Time-Series and Image Recognition
  <https://arxiv.org/abs/2311.15599>`_, CVPR 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgs_optax import _geometry

Size = tuple[int, ...]
SizeLike = int | Sequence[int]  # an int means the same size on every axis.
Scale = Any  # a scalar or a (C_out,) array.

# RepLKNet-31B/L: every large kernel (31, 29, 27, 13) has a parallel 5x5
# (`small_kernel=5` in DingXiaoH/RepLKNet-pytorch, replknet.py).
_REPLKNET_SMALL = 5
# UniRepLKNet's Dilated Reparam Block: for each large-kernel size, the sizes
# and dilations of its parallel small kernels (`DilatedReparamBlock` in
# AILab-CVC/UniRepLKNet, unireplknet.py).
_UNIREPLKNET = {
    5: ((3, 3), (1, 2)),
    7: ((5, 3, 3), (1, 2, 3)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
}


class Preset(NamedTuple):
  """A named branch set, built for each kernel's own (odd) size."""

  summary: str  # the branches, as messages and docs name them.
  reference: str  # where the branch set is defined.
  # The branches and dilations for a kernel size, the main branch first.
  build: Callable[[Size], tuple[list[Size], list[Size]]]
  # Why the set is not defined for an (odd) kernel size, or None.
  undefined: Callable[[Size], str | None]


def _centred(size: Size, small: Sequence[int],
             dilations: Sequence[int]) -> tuple[list[Size], list[Size]]:
  """The kernel plus centred branches of the same size on every axis."""
  n = len(size)
  return ([size] + [(b,) * n for b in small],
          [(1,) * n] + [(d,) * n for d in dilations])


def _acb_undefined(size: Size) -> str | None:
  if len(size) == 2:
    return None
  return (
      f"the 'acb' preset (KxK + 1xK + Kx1) is defined for 2-D kernels "
      f"only, not {len(size)}-D: in 1-D its asymmetric branches would be "
      "the kernel itself (a uniform factor) or one tap ('repvgg'); in "
      "3-D they could be lines (Kx1x1, 1xKx1, 1x1xK) or planes (KxKx1, "
      "Kx1xK, 1xKxK). Build the set you mean with branch_scaling")


def _replknet_undefined(size: Size) -> str | None:
  if min(size) >= _REPLKNET_SMALL:
    return None
  return (f"the 'replknet' preset adds a centred {_REPLKNET_SMALL}-tap "
          f"branch, which needs every axis of the kernel to be at least "
          f"{_REPLKNET_SMALL}")


def _unireplknet_undefined(size: Size) -> str | None:
  if len(set(size)) == 1 and size[0] in _UNIREPLKNET:
    return None
  return (f"the 'unireplknet' preset is published for kernels of equal "
          f"sizes {tuple(_UNIREPLKNET)} on every axis only")


# Adding a preset is one entry here: `sgs`, `preset_branches` and the skip
# rule all read this table.
PRESETS: dict[str, Preset] = {
    "acb": Preset(
        "KxK + 1xK + Kx1, 2-D only", "ACNet (Ding et al., 2019)",
        lambda s: ([s, (1, s[1]), (s[0], 1)], [(1, 1)] * 3), _acb_undefined),
    "repvgg": Preset(
        "the kernel + its centre tap, any rank", "RepVGG (Ding et al., 2021)",
        lambda s: _centred(s, [1], [1]), lambda s: None),
    "replknet": Preset(
        "the kernel + a centred 5 taps per axis, every axis >= 5",
        "RepLKNet (Ding et al., CVPR 2022)",
        lambda s: _centred(s, [_REPLKNET_SMALL], [1]), _replknet_undefined),
    "unireplknet": Preset(
        "the kernel + the dilated small kernels of the Dilated Reparam "
        "Block, equal sizes 5 to 17", "UniRepLKNet (Ding et al., CVPR 2024)",
        lambda s: _centred(s, *_UNIREPLKNET[s[0]]), _unireplknet_undefined),
}


def preset(name: str) -> Preset:
  """The registry entry of preset ``name``.

  Raises:
    ValueError: for an unknown preset name.

  Examples:
    >>> from sgs_optax import _branches
    >>> _branches.preset("repvgg").reference
    'RepVGG (Ding et al., 2021)'
    >>> _branches.preset("replknet").undefined((3, 3))[:36]
    "the 'replknet' preset adds a centred"
  """
  if isinstance(name, str) and name in PRESETS:
    return PRESETS[name]
  raise ValueError(
      f"Unknown scaling preset {name!r}; expected one of {tuple(PRESETS)}.")


def _kernel_size(kernel_size: Sequence[int]) -> Size:
  if isinstance(kernel_size, (int, np.integer)) or not len(kernel_size):
    raise ValueError(
        f"kernel_size must hold one size per spatial axis, e.g. (3, 3) or "
        f"(7,), got {kernel_size!r}."
    )
  return _geometry.as_sizes(tuple(kernel_size), len(kernel_size),
                            "kernel_size", minimum=1)


def branch_offsets(kernel_size: Sequence[int], branch: SizeLike,
                   dilation: SizeLike = 1) -> Size:
  """The first position, per axis, of a branch centred in the kernel window.

  Args:
    kernel_size: the merged kernel's size, one int per spatial axis.
    branch: the branch's size, an int (every axis) or one int per axis.
    dilation: the branch's dilation, likewise.

  Returns:
    The offset of the branch's first tap along each axis.

  Raises:
    ValueError: for sizes of the wrong length, a branch that spans more than
      the kernel, or one that cannot be centred (the kernel size minus the
      span ``(b - 1) * d + 1`` odd along an axis).

  Examples:
    >>> from sgs_optax import _branches
    >>> _branches.branch_offsets((7, 7), 3, dilation=2)
    (1, 1)
  """
  kernel_size = _kernel_size(kernel_size)
  n = len(kernel_size)
  branch = _geometry.as_sizes(branch, n, "each branch", minimum=1)
  dilation = _geometry.as_sizes(dilation, n, "each dilation", minimum=1)
  span = _geometry.dilated_kernel(branch, dilation)
  if any(s > k for s, k in zip(span, kernel_size)):
    raise ValueError(
        f"Branch {branch} with dilation {dilation} spans {span} positions and "
        f"does not fit in a {kernel_size} kernel."
    )
  if any((k - s) % 2 for s, k in zip(span, kernel_size)):
    raise ValueError(
        f"Branch {branch} with dilation {dilation} (span {span}) cannot be "
        f"centred in a {kernel_size} kernel: the kernel size minus the span "
        "must be even along each axis."
    )
  return tuple((k - s) // 2 for s, k in zip(span, kernel_size))


def branch_taps(kernel_size: Sequence[int], branch: SizeLike,
                dilation: SizeLike = 1) -> tuple[slice, ...]:
  """Index of the window positions a centred (dilated) branch covers.

  Examples:
    >>> from sgs_optax import _branches
    >>> _branches.branch_taps((7,), 3, dilation=2)
    (slice(1, 6, 2),)
  """
  n = len(_kernel_size(kernel_size))
  branch = _geometry.as_sizes(branch, n, "each branch", minimum=1)
  dilation = _geometry.as_sizes(dilation, n, "each dilation", minimum=1)
  offsets = branch_offsets(kernel_size, branch, dilation)
  return tuple(slice(o, o + (b - 1) * d + 1, d)
               for o, b, d in zip(offsets, branch, dilation))


def check_scales(
    branches: Sequence[SizeLike], scales: Sequence[Scale] | None
) -> list[np.ndarray]:
  """One float64 scale array per branch (ones by default), validated.

  Examples:
    >>> from sgs_optax import _branches
    >>> _branches.check_scales([3, 1], [2, [1.0, 0.5]])
    [array(2.), array([1. , 0.5])]
  """
  if not branches:
    raise ValueError(
        "branches is empty: a branch set needs at least one branch (its "
        "matrix would be all zeros and freeze the kernel)."
    )
  if scales is None:
    return [np.ones(()) for _ in branches]
  if len(scales) != len(branches):
    raise ValueError(
        f"Got {len(scales)} branch scales for {len(branches)} branches."
    )
  arrays = [np.asarray(s, dtype=np.float64) for s in scales]
  if any(a.ndim > 1 for a in arrays):
    raise ValueError("Each branch scale must be a scalar or a (C_out,) array.")
  return arrays


def check_dilations(branches: Sequence[SizeLike],
                     dilations: Sequence[SizeLike] | None) -> list[SizeLike]:
  """One dilation per branch (1 by default); each is checked where used.

  Examples:
    >>> from sgs_optax import _branches
    >>> _branches.check_dilations([3, 3], None)
    [1, 1]
  """
  if dilations is None:
    return [1] * len(branches)
  if isinstance(dilations, (int, np.integer)) or len(dilations) != len(
      branches):
    raise ValueError(
        f"dilations must give one dilation (an int or one per axis) per "
        f"branch: got {dilations!r} for {len(branches)} branches."
    )
  return list(dilations)


def branch_scaling(
    kernel_size: Sequence[int],
    branches: Sequence[SizeLike],
    scales: Sequence[Scale] | None = None,
    dilations: Sequence[SizeLike] | None = None,
    *,
    power: int = 2,
) -> np.ndarray:
  """The exact SGS matrix ``sum_k |scales_k|**power * mask_k`` of a branch set.

  Which power depends on the optimizer the merged conv is trained with
  (started from the merged weights, SPEC 1.2; see the placement guide):

  * ``power=2``, ``S = sum_k scales_k**2 * mask_k``, for SGD (momentum,
    Nesterov and coupled L2 weight decay included): the gradient is
    multiplied by ``S`` *before* the optimizer, because branch ``k`` sees the
    merged gradient times ``scales_k`` and moves the merged kernel by its own
    step times ``scales_k`` again.
  * ``power=1``, ``S1 = sum_k |scales_k| * mask_k``, for scale-invariant
    elementwise optimizers (Adam, AdamW, RMSProp, Adagrad from a zero
    accumulator, Lion, sign descent; eps negligible): the *direction* is
    multiplied by ``S1`` after the optimizer's scaling and before decoupled
    weight decay and the learning rate, because such a direction only keeps
    the sign of a branch's gradient scale, and the branch moves the merged
    kernel by that direction times ``scales_k``.

  With unit (or +-1) scales both powers give the same matrix, so the presets
  serve both. Any number of spatial axes works: 1-D, 2-D and 3-D kernels.

  Args:
    kernel_size: the merged kernel's size, one int per spatial axis:
      ``(k,)``, ``(kh, kw)`` or ``(kd, kh, kw)``.
    branches: the size of each parallel branch, centred in the kernel: an int
      (the same size on every axis) or one int per axis. List the main
      full-size branch too if the block has one.
    scales: optional constant scalar per branch (default 1), each a scalar or
      a ``(C_out,)`` array (e.g. a frozen BatchNorm scale).
    dilations: optional dilation per branch (default 1), an int or one per
      axis. A branch of size ``b`` and dilation ``d`` covers every ``d``-th
      of ``(b - 1) * d + 1`` positions per axis, centred.
    power: 2 (the default: SGD's matrix, used before the optimizer) or 1
      (scale-invariant optimizers' matrix, used after their direction).

  Returns:
    A float64 numpy array of shape ``kernel_size``, or ``kernel_size +
    (C_out,)`` when any scale is per output channel.

  Raises:
    ValueError: for an empty branch list, a branch or dilation with the wrong
      number of axes, a branch that spans more than the kernel or cannot be
      centred, scales or dilations that do not match the branches, or a
      ``power`` other than 1 or 2.

  Examples:
    >>> import sgs_optax
    >>> sgs_optax.branch_scaling((3, 3), [(3, 3), (1, 3), (3, 1)])
    array([[1., 2., 1.],
           [2., 3., 2.],
           [1., 2., 1.]])
    >>> sgs_optax.branch_scaling((7,), [7, 3, 3], dilations=[1, 1, 2])
    array([1., 2., 2., 3., 2., 2., 1.])

    A 3x3 + 1x1 pair with scales 1 and -2: SGD's matrix adds ``(-2)**2`` at
    the centre, Adam's adds ``|-2|``.

    >>> sgs_optax.branch_scaling((3, 3), [3, 1], [1.0, -2.0])[1]
    array([1., 5., 1.])
    >>> sgs_optax.branch_scaling((3, 3), [3, 1], [1.0, -2.0], power=1)[1]
    array([1., 3., 1.])
  """
  if isinstance(power, bool) or power not in (1, 2):
    raise ValueError(
        f"power must be 2 (SGD: sum_k scale_k**2 * mask_k, before the "
        f"optimizer) or 1 (scale-invariant optimizers such as Adam: sum_k "
        f"|scale_k| * mask_k, after their direction), got {power!r}."
    )
  kernel_size = _kernel_size(kernel_size)
  scale_arrays = check_scales(branches, scales)
  dilations = check_dilations(branches, dilations)
  try:
    channel_shape = np.broadcast_shapes(*(s.shape for s in scale_arrays))
  except ValueError:
    raise ValueError(
        "Per-channel branch scales must all have the same length C_out."
    ) from None
  total = np.zeros(kernel_size + channel_shape)
  for branch, dilation, scale in zip(branches, dilations, scale_arrays):
    mask = np.zeros(kernel_size + (1,) * len(channel_shape))
    mask[branch_taps(kernel_size, branch, dilation)] = 1.0
    total += mask * np.abs(scale)**power
  return total


def _check_branch_kernels(params: Any, n_branches: int) -> None:
  """Raises unless ``params`` holds exactly ``kernel_0 .. kernel_{N-1}``."""
  present = {k for k in params if str(k).startswith("kernel_")}
  expected = {f"kernel_{i}" for i in range(n_branches)}
  by_index = lambda keys: sorted(keys, key=lambda k: (len(k), k))
  problems = []
  if expected - present:
    problems.append(f"{by_index(expected - present)} missing")
  if present - expected:
    problems.append(
        f"{by_index(present - expected)} not covered by the branches (list "
        "every branch the module was built with, or it is dropped)")
  if not problems:
    return
  hint = ""
  if "params" in params:
    hint = (" This looks like a variables dict: pass the layer's params, "
            "variables['params'][layer_name].")
  raise ValueError(
      f"merge_branches got {n_branches} branches, so the params must hold "
      f"kernel_0 .. kernel_{n_branches - 1}: {'; '.join(problems)}.{hint}"
  )


def merge_branches(
    params: dict[str, Any],
    kernel_size: Sequence[int],
    branches: Sequence[SizeLike],
    branch_scales: Sequence[Scale] | None = None,
    dilations: Sequence[SizeLike] | None = None,
) -> dict[str, jax.Array]:
  """Folds a :class:`BranchedConv`'s params into one conv's params.

  Args:
    params: the module's params: ``kernel_0 .. kernel_{N-1}`` of shapes
      ``(*branch_k, C_in / groups, C_out)`` and optionally ``bias``.
    kernel_size: the merged kernel's size, one int per spatial axis.
    branches: the same branch sizes the module was built with.
    branch_scales: the same constant scales the module was built with.
    dilations: the same branch dilations the module was built with.

  Returns:
    ``{"kernel": W}`` (channels-last layout, e.g. HWIO;
    ``W = sum_k scale_k * P_k(kernel_k)``), plus ``"bias"`` when the module
    has one: the params of a plain ``nn.Conv`` of ``kernel_size``.

  Raises:
    ValueError: as :func:`branch_scaling`; if the params do not hold
      exactly one kernel ``kernel_k`` per branch (a branch left out of
      ``branches`` would be silently dropped from the merge); and for a
      kernel whose shape does not match its branch.

  Examples:
    A 3x3 + 1x1 pair (RepVGG without BatchNorm) folds into one 3x3 kernel;
    the 1x1 branch lands on the centre tap.

    >>> import jax.numpy as jnp, sgs_optax
    >>> params = {"kernel_0": jnp.ones((3, 3, 1, 1)),
    ...           "kernel_1": jnp.full((1, 1, 1, 1), 2.0)}
    >>> merged = sgs_optax.merge_branches(params, (3, 3), [(3, 3), (1, 1)])
    >>> merged["kernel"][:, :, 0, 0]
    Array([[1., 1., 1.],
           [1., 3., 1.],
           [1., 1., 1.]], dtype=float32)
  """
  kernel_size = _kernel_size(kernel_size)
  n = len(kernel_size)
  scale_arrays = check_scales(branches, branch_scales)
  dilations = check_dilations(branches, dilations)
  _check_branch_kernels(params, len(branches))
  merged = None
  for index, (branch, dilation, scale) in enumerate(
      zip(branches, dilations, scale_arrays)):
    kernel = params[f"kernel_{index}"]
    size = _geometry.as_sizes(branch, n, "each branch", minimum=1)
    if tuple(kernel.shape[:n]) != size or kernel.ndim != n + 2:
      raise ValueError(
          f"kernel_{index} has shape {kernel.shape}, expected branch {size} "
          "followed by the input and output channel axes."
      )
    if merged is None:
      merged = jnp.zeros(kernel_size + kernel.shape[n:], kernel.dtype)
    taps = branch_taps(kernel_size, size, dilation)
    merged = merged.at[taps].add(kernel * jnp.asarray(scale, kernel.dtype))
  out = {"kernel": merged}
  if "bias" in params:
    out["bias"] = params["bias"]
  return out


def preset_branches(
    name: str, kernel_size: Sequence[int]
) -> tuple[list[Size], list[Size]]:
  """The branches and dilations of a named preset, built for ``kernel_size``.

  Every preset lists the full-size main branch first and centres every
  branch; the sizes below hold on every spatial axis.

  * ``"acb"`` (2-D only): KxK + 1xK + Kx1 (ACNet).
  * ``"repvgg"``: the kernel + one centre tap (RepVGG's 3x3 + 1x1; in any
    number of spatial axes).
  * ``"replknet"``: the kernel + a 5-tap-per-axis branch (RepLKNet's large
    kernel with a parallel 5x5); every axis at least 5.
  * ``"unireplknet"``: the kernel + UniRepLKNet's dilated small kernels for
    equal sizes K in 5..17, e.g. for K = 13 sizes (5, 7, 3, 3, 3) with
    dilations (1, 2, 3, 4, 5).

  The published blocks put a trained BatchNorm on every branch, so their
  training is this preset's only with frozen unit BN scales: the presets
  are the unit-scale analogues.

  Args:
    name: a preset: ``"acb"``, ``"repvgg"``, ``"replknet"`` or
      ``"unireplknet"``.
    kernel_size: the merged kernel's size, one int per spatial axis.

  Returns:
    ``(branches, dilations)``: one size tuple and one dilation tuple per
    branch, for :func:`branch_scaling` or :class:`BranchedConv`.

  Raises:
    ValueError: for an unknown preset, or a kernel size it is not defined for.

  Examples:
    >>> import sgs_optax
    >>> sgs_optax.preset_branches("unireplknet", (7, 7))
    ([(7, 7), (5, 5), (3, 3), (3, 3)], [(1, 1), (1, 1), (2, 2), (3, 3)])
  """
  size = _kernel_size(kernel_size)
  entry = preset(name)
  reason = entry.undefined(size)
  if reason is not None:
    raise ValueError(f"Kernel size {size}: {reason}.")
  return entry.build(size)
