"""The Flax linen models of the examples, for 8x8 single-channel images.

The ResNet's basic block is the benchmarks' own (``benchmarks/_models.py``),
so the examples train the same block the benchmarks measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from benchmarks._models import BasicBlock


class CNN(nn.Module):
  """Two 3x3 convs (the second strided) and a dense head on the flat map."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class ResNet(nn.Module):
  """A CIFAR-style ResNet: 3x3 stem, stages of basic blocks, global pool.

  Attributes:
    width: channels of the first stage, doubled at each later stage.
    blocks: basic blocks per stage; each stage after the first halves the
      feature map.
    num_classes: outputs of the dense head.
  """

  width: int = 16
  blocks: Sequence[int] = (1, 1, 1)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.width, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             name="stem_bn")(x))
    for stage, count in enumerate(self.blocks):
      for index in range(count):
        x = BasicBlock(self.width * 2**stage,
                       strides=2 if stage > 0 and index == 0 else 1,
                       name=f"stage{stage + 1}_block{index + 1}")(x, train)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))
