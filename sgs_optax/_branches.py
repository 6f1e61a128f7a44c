"""Parallel conv branches: their exact SGS matrix, a branched module, merging.

A branched conv sums N parallel branches, each an ``(a, b)`` kernel centred in
the ``(kh, kw)`` window and multiplied by a constant scalar ``alpha_k`` (a
frozen BatchNorm scale counts, per output channel if need be). The network only
ever sees the merged kernel ``W = sum_k alpha_k * pad(V_k)``, and SGD on the
branches moves ``W`` exactly as SGD on ``W`` with its gradient multiplied by

    S = sum_k alpha_k**2 * M_k,

where ``M_k`` is the branch's binary footprint in the window. The module here
trains the branches for real (each as its own convolution) so that the
equivalence can be tested and the structural cost measured.

References:
  Detkov et al., `Reparameterization through Spatial Gradient Scaling
  <https://arxiv.org/abs/2303.02733>`_, ICLR 2023.
  Ding et al., `ACNet: Strengthening the Kernel Skeletons for Powerful CNN via
  Asymmetric Convolution Blocks <https://arxiv.org/abs/1908.03930>`_, 2019.
  Ding et al., `RepVGG: Making VGG-style ConvNets Great Again
  <https://arxiv.org/abs/2101.03697>`_, 2021.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Branch = tuple[int, int]
Scale = Any  # a scalar or a (C_out,) array.

PRESET_NAMES = ("acb", "repvgg")


def preset_branches(name: str, kernel_size: Sequence[int]) -> list[Branch]:
  """The branches of a named preset, built for ``kernel_size``.

  Args:
    name: ``"acb"`` (KxK + 1xK + Kx1) or ``"repvgg"`` (KxK + 1x1).
    kernel_size: ``(kh, kw)``.

  Returns:
    The list of ``(a, b)`` branch sizes, the main ``(kh, kw)`` one first.

  Raises:
    ValueError: for an unknown preset name.
  """
  kh, kw = kernel_size
  if name == "acb":
    return [(kh, kw), (1, kw), (kh, 1)]
  if name == "repvgg":
    return [(kh, kw), (1, 1)]
  raise ValueError(
      f"Unknown scaling preset {name!r}; expected one of {PRESET_NAMES}, an "
      "array, a pytree of arrays, or None."
  )


def branch_offsets(kernel_size: Sequence[int], branch: Branch) -> Branch:
  """Top-left corner of a branch centred in the kernel window."""
  kh, kw = kernel_size
  a, b = branch
  if a < 1 or b < 1 or a > kh or b > kw:
    raise ValueError(
        f"Branch {branch} does not fit in a {kh}x{kw} kernel: each branch "
        "must be at least 1x1 and at most the kernel size."
    )
  if (kh - a) % 2 or (kw - b) % 2:
    raise ValueError(
        f"Branch {branch} cannot be centred in a {kh}x{kw} kernel: the size "
        "difference must be even along each axis."
    )
  return (kh - a) // 2, (kw - b) // 2


def _check_scales(
    branches: Sequence[Branch], scales: Sequence[Scale] | None
) -> list[np.ndarray]:
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


def branch_scaling(
    kernel_size: Sequence[int],
    branches: Sequence[Branch],
    scales: Sequence[Scale] | None = None,
) -> np.ndarray:
  """The exact SGS matrix ``S = sum_k scales_k**2 * mask_k`` of a branch set.

  Training a conv whose gradient is multiplied by ``S`` with SGD (momentum,
  Nesterov and coupled L2 weight decay included) is exactly equivalent to
  training the branched conv, started from the merged weights (SPEC 1.2).

  Args:
    kernel_size: ``(kh, kw)`` of the merged kernel.
    branches: ``(a, b)`` sizes of the parallel branches, each centred in the
      kernel; list the main ``(kh, kw)`` branch too if the block has one.
    scales: optional constant scalar per branch (default 1), each a scalar or
      a ``(C_out,)`` array (e.g. a frozen BatchNorm scale).

  Returns:
    A float64 numpy array of shape ``(kh, kw)``, or ``(kh, kw, C_out)`` when
    any scale is per output channel.

  Raises:
    ValueError: for a branch larger than the kernel or that cannot be centred,
      or scales that do not match the branches.

  Examples:
    >>> import sgs_optax
    >>> sgs_optax.branch_scaling((3, 3), [(3, 3), (1, 3), (3, 1)])
    array([[1., 2., 1.],
           [2., 3., 2.],
           [1., 2., 1.]])
  """
  kernel_size = tuple(int(k) for k in kernel_size)
  scale_arrays = _check_scales(branches, scales)
  try:
    channel_shape = np.broadcast_shapes(*(s.shape for s in scale_arrays))
  except ValueError:
    raise ValueError(
        "Per-channel branch scales must all have the same length C_out."
    ) from None
  total = np.zeros(kernel_size + channel_shape)
  for branch, scale in zip(branches, scale_arrays):
    top, left = branch_offsets(kernel_size, branch)
    mask = np.zeros(kernel_size + (1,) * len(channel_shape))
    mask[top : top + branch[0], left : left + branch[1]] = 1.0
    total += mask * scale**2
  return total


def merge_branches(
    params: dict[str, Any],
    kernel_size: Sequence[int],
    branches: Sequence[Branch],
    branch_scales: Sequence[Scale] | None = None,
) -> dict[str, jax.Array]:
  """Folds a :class:`BranchedConv`'s params into one conv's params.

  Args:
    params: the module's params: ``kernel_0 .. kernel_{N-1}`` of shapes
      ``(a_k, b_k, C_in, C_out)`` and optionally ``bias``.
    kernel_size: the merged ``(kh, kw)``.
    branches: the same branch sizes the module was built with.
    branch_scales: the same constant scales the module was built with.

  Returns:
    ``{"kernel": W}`` (HWIO, ``W = sum_k scale_k * pad(kernel_k)``), plus
    ``"bias"`` when the module has one: the params of a plain ``nn.Conv``.
  """
  kernel_size = tuple(int(k) for k in kernel_size)
  scale_arrays = _check_scales(branches, branch_scales)
  merged = None
  for index, (branch, scale) in enumerate(zip(branches, scale_arrays)):
    kernel = params[f"kernel_{index}"]
    if tuple(kernel.shape[:2]) != tuple(branch):
      raise ValueError(
          f"kernel_{index} has spatial shape {kernel.shape[:2]}, expected "
          f"branch {branch}."
      )
    top, left = branch_offsets(kernel_size, branch)
    pads = (
        (top, kernel_size[0] - branch[0] - top),
        (left, kernel_size[1] - branch[1] - left),
        (0, 0),
        (0, 0),
    )
    term = jnp.pad(kernel, pads) * jnp.asarray(scale, kernel.dtype)
    merged = term if merged is None else merged + term
  out = {"kernel": merged}
  if "bias" in params:
    out["bias"] = params["bias"]
  return out
