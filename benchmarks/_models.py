"""Flax linen models for the benchmarks (NHWC, BatchNorm, conv without bias).

Every model takes a ``conv`` factory, called as
``conv(features, kernel_size, strides=..., name=...)``, and gives every conv an
explicit name (``conv0``, ``block1_0/conv1`` ...). The default factory
(:func:`plain_conv`) builds a bias-free ``nn.Conv`` (a bias before BatchNorm is
redundant); :func:`branched_conv` builds a :class:`sgs_optax.BranchedConv`
with the ACB or RepVGG branches for every odd KxK conv (K > 1) and the plain
conv otherwise (1x1 shortcuts). So a branched model has exactly the plain
model's param tree, except that each branched layer holds ``kernel_0 ..
kernel_{N-1}`` where the plain layer holds ``kernel``, and
:func:`merge_branched_params` maps one onto the other with
:func:`sgs_optax.merge_branches` per layer. ``batch_stats`` are shared as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ConvFactory = Callable[..., nn.Module]

# The branch presets of the issue, for a KxK kernel.
BRANCH_PRESETS = {
    "acb": lambda kh, kw: [(kh, kw), (1, kw), (kh, 1)],
    "repvgg": lambda kh, kw: [(kh, kw), (1, 1)],
}

_BN = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def plain_conv(
    features: int,
    kernel_size: Sequence[int] = (3, 3),
    *,
    strides: int = 1,
    name: str | None = None,
) -> nn.Module:
  """The default conv factory: a bias-free, SAME-padded ``nn.Conv``."""
  return nn.Conv(
      features,
      tuple(kernel_size),
      strides=strides,
      padding="SAME",
      use_bias=False,
      name=name,
  )


@dataclasses.dataclass(frozen=True)
class _BranchedFactory:
  """A conv factory compared by value, so equal models share compilations."""

  preset: str
  branch_scales: tuple[Any, ...] | None = None

  def __call__(
      self,
      features: int,
      kernel_size: Sequence[int] = (3, 3),
      *,
      strides: int = 1,
      name: str | None = None,
  ) -> nn.Module:
    import sgs_optax  # pylint: disable=g-import-not-at-top

    kh, kw = (int(k) for k in kernel_size)
    if kh == 1 or kw == 1 or kh % 2 == 0 or kw % 2 == 0:
      return plain_conv(features, kernel_size, strides=strides, name=name)
    return sgs_optax.BranchedConv(
        features,
        (kh, kw),
        BRANCH_PRESETS[self.preset](kh, kw),
        branch_scales=self.branch_scales,
        strides=strides,
        padding="SAME",
        use_bias=False,
        name=name,
    )


def branched_conv(
    preset: str, branch_scales: Sequence[Any] | None = None
) -> ConvFactory:
  """A conv factory with ``preset`` ("acb" or "repvgg") branches.

  Args:
    preset: "acb" (KxK + 1xK + Kx1) or "repvgg" (KxK + 1x1).
    branch_scales: optional constant scale per branch (default 1).

  Returns:
    A factory building :class:`sgs_optax.BranchedConv` for odd KxK kernels
    with K > 1 and :func:`plain_conv` for every other kernel.
  """
  if preset not in BRANCH_PRESETS:
    raise ValueError(
        f"Unknown branch preset {preset!r}; expected {tuple(BRANCH_PRESETS)}.")
  if branch_scales is not None:
    branch_scales = tuple(branch_scales)
  return _BranchedFactory(preset, branch_scales)


def _maybe_pool(x):
  """2x2 max pooling while the map is at least 2x2 (8x8, 28x28, 32x32 ...)."""
  if min(x.shape[1:3]) >= 2:
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
  return x


class SmallVGG(nn.Module):
  """A small VGG for 8x8 (digits) to 32x32 inputs.

  conv-BN-ReLU stages with 2x2 max pooling after each stage while the map is
  at least 2x2 (8x8 -> 4 -> 2 -> 1; 28x28 -> 14 -> 7 -> 3), then global average
  pooling and a dense head. The default widths 16-32-64(x2) run a digits
  epoch in a fraction of a second on a CPU.
  """

  num_classes: int = 10
  stages: Sequence[Sequence[int]] = ((16,), (32,), (64, 64))
  conv: ConvFactory = plain_conv

  @nn.compact
  def __call__(self, x, train: bool = False):
    index = 0
    for stage in self.stages:
      for features in stage:
        x = self.conv(features, (3, 3), name=f"conv{index}")(x)
        x = _BN(use_running_average=not train, name=f"bn{index}")(x)
        x = nn.relu(x)
        index += 1
      x = _maybe_pool(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


VGG_CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512,
              "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512,
              "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
  """VGG with BatchNorm for 32x32 inputs (CIFAR), as in the SGS paper.

  ``config`` lists conv widths at ``width`` 64 and ``"M"`` for 2x2 max
  pooling (:data:`VGG_CONFIGS`); every width scales with ``width``
  (64-128-256-512-512 at 64). Global average pooling and one dense layer
  replace ImageNet VGG's three dense layers.
  """

  num_classes: int = 10
  width: int = 64
  conv: ConvFactory = plain_conv
  config: Sequence[Any] = VGG_CONFIGS["vgg11"]

  @nn.compact
  def __call__(self, x, train: bool = False):
    index = 0
    for item in self.config:
      if item == "M":
        x = _maybe_pool(x)
        continue
      features = max(1, item * self.width // 64)
      x = self.conv(features, (3, 3), name=f"conv{index}")(x)
      x = _BN(use_running_average=not train, name=f"bn{index}")(x)
      x = nn.relu(x)
      index += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


class BasicBlock(nn.Module):
  """The ResNet-18/34 basic block; 1x1 projection shortcut when needed."""

  features: int
  strides: int = 1
  conv: ConvFactory = plain_conv

  @nn.compact
  def __call__(self, x, train: bool = False):
    residual = x
    y = self.conv(self.features, (3, 3), strides=self.strides, name="conv1")(x)
    y = _BN(use_running_average=not train, name="bn1")(y)
    y = nn.relu(y)
    y = self.conv(self.features, (3, 3), name="conv2")(y)
    y = _BN(use_running_average=not train, name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = self.conv(
          self.features, (1, 1), strides=self.strides, name="shortcut_conv"
      )(x)
      residual = _BN(use_running_average=not train, name="shortcut_bn")(
          residual)
    return nn.relu(y + residual)


class ResNet18(nn.Module):
  """The CIFAR ResNet-18: 3x3 stem, no max pool, 4 stages of 2 blocks."""

  num_classes: int = 10
  width: int = 64
  conv: ConvFactory = plain_conv

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.conv(self.width, (3, 3), name="stem_conv")(x)
    x = _BN(use_running_average=not train, name="stem_bn")(x)
    x = nn.relu(x)
    for stage in range(4):
      features = self.width * 2**stage
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(
            features, strides, conv=self.conv, name=f"block{stage}_{block}"
        )(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


MODELS = ("small_vgg", "vgg11", "vgg16", "resnet18")


DEFAULT_WIDTH = {"small_vgg": 16, "vgg11": 64, "vgg16": 64, "resnet18": 64}
TINY_WIDTH = 4


def make_model(
    name: str,
    num_classes: int,
    *,
    conv: ConvFactory = plain_conv,
    width: int | None = None,
    tiny: bool = False,
) -> nn.Module:
  """Builds a benchmark model by name.

  Args:
    name: one of :data:`MODELS`.
    num_classes: outputs of the dense head.
    conv: the conv factory (:func:`plain_conv` or :func:`branched_conv`).
    width: the first conv's width, the others scale with it (default
      :data:`DEFAULT_WIDTH`): small_vgg w-2w-4w-4w, vgg11 and vgg16 w..8w,
      resnet18 stages w-2w-4w-8w.
    tiny: width :data:`TINY_WIDTH` (smoke tests), unless ``width`` is given.

  Returns:
    The linen module.
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}.")
  if width is None:
    width = TINY_WIDTH if tiny else DEFAULT_WIDTH[name]
  if name == "small_vgg":
    stages = ((width,), (2 * width,), (4 * width, 4 * width))
    return SmallVGG(num_classes, stages=stages, conv=conv)
  if name in VGG_CONFIGS:
    return VGG(num_classes, width=width, conv=conv, config=VGG_CONFIGS[name])
  return ResNet18(num_classes, width=width, conv=conv)


def _is_branched_layer(tree: Mapping[str, Any]) -> bool:
  return "kernel_0" in tree


def merge_branched_params(
    branched_params: Mapping[str, Any],
    *,
    branch_scales: Sequence[Any] | None = None,
) -> dict[str, Any]:
  """Converts a branched model's params into the plain model's params.

  Every sub-dict holding ``kernel_0 .. kernel_{N-1}`` (a
  :class:`sgs_optax.BranchedConv`) is folded with
  :func:`sgs_optax.merge_branches`; its branches are read from the kernel
  shapes (``kernel_0`` first, as the module builds them) and its kernel size is
  the largest branch. Every other leaf is copied as is.

  Args:
    branched_params: the ``params`` collection of a model built with
      :func:`branched_conv`.
    branch_scales: the scales the branched layers were built with.

  Returns:
    A params tree for the same model built with :func:`plain_conv`.
  """
  import sgs_optax  # pylint: disable=g-import-not-at-top

  def merge(tree):
    if not isinstance(tree, Mapping):
      return tree
    if _is_branched_layer(tree):
      count = sum(1 for k in tree if k.startswith("kernel_"))
      branches = [tuple(tree[f"kernel_{i}"].shape[:2]) for i in range(count)]
      kernel_size = (max(a for a, _ in branches), max(b for _, b in branches))
      return sgs_optax.merge_branches(
          dict(tree), kernel_size, branches, branch_scales)
    return {key: merge(value) for key, value in tree.items()}

  return merge(branched_params)


def _is_branch_target(leaf: Any) -> bool:
  """An odd KxK HWIO conv kernel, K > 1: what :func:`branched_conv` splits."""
  if getattr(leaf, "ndim", 0) != 4:
    return False
  kh, kw = leaf.shape[:2]
  return kh > 1 and kw > 1 and kh % 2 == 1 and kw % 2 == 1


def branched_params_from_plain(
    plain_params: Mapping[str, Any],
    preset: str,
    *,
    branch_scales: Sequence[Any] | None = None,
) -> dict[str, Any]:
  """The branched model's params whose merged network is ``plain_params``.

  Each branched layer's full KxK branch gets the plain kernel (divided by its
  scale) and every other branch is zero, so :func:`merge_branched_params`
  gives ``plain_params`` back exactly. Started from these, the branched
  network follows the trajectory of the plain network trained with
  ``sgs(branch_scaling(...))`` under SGD (Detkov et al., 2023); the two
  coincide only when both start from the same merged weight. This is the
  paired initialisation of the branched baselines.

  Args:
    plain_params: the ``params`` collection of a model built with
      :func:`plain_conv`.
    preset: "acb" or "repvgg", as given to :func:`branched_conv`.
    branch_scales: the scales the branched layers are built with.

  Returns:
    A params tree for the same model built with ``branched_conv(preset,
    branch_scales)``.
  """
  if preset not in BRANCH_PRESETS:
    raise ValueError(
        f"Unknown branch preset {preset!r}; expected {tuple(BRANCH_PRESETS)}.")
  first_scale = 1.0 if branch_scales is None else branch_scales[0]

  def split(tree):
    if not isinstance(tree, Mapping):
      return tree
    kernel = tree.get("kernel")
    if kernel is None or not _is_branch_target(kernel):
      return {key: split(value) for key, value in tree.items()}
    kh, kw, cin, cout = kernel.shape
    out = {key: value for key, value in tree.items() if key != "kernel"}
    for i, (bh, bw) in enumerate(BRANCH_PRESETS[preset](kh, kw)):
      out[f"kernel_{i}"] = (
          kernel / jnp.asarray(first_scale, kernel.dtype) if i == 0 else
          jnp.zeros((bh, bw, cin, cout), kernel.dtype))
    return out

  return split(plain_params)
