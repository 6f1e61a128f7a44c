"""A Flax linen conv made of parallel branches, each run as its own conv.

This is the structural-reparameterization baseline (ACB, RepVGG-style) that SGS
reproduces without branches. Each branch really pays its convolution, so that
benchmarks measure the structural cost honestly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgs_optax import _branches


class BranchedConv(nn.Module):
  """Parallel ``(a, b)`` conv branches centred in a ``kernel_size`` window.

  The output is ``sum_k branch_scales[k] * conv(x, kernel_k) + bias``, with the
  same geometry (strides, padding, output size) as one ``nn.Conv`` of
  ``kernel_size``: every branch reads the window that the merged kernel would
  read, cropped to its own footprint. Params: ``kernel_0 .. kernel_{N-1}``
  (HWIO, ``(a_k, b_k, C_in, features)``) and one shared ``bias``. Fold them
  into a plain conv with :func:`sgs_optax.merge_branches`.

  Attributes:
    features: number of output channels.
    kernel_size: ``(kh, kw)`` of the merged kernel.
    branches: ``(a, b)`` size of every branch, the main ``(kh, kw)`` included.
    branch_scales: optional constant per branch, a scalar or ``(features,)``
      array (e.g. a frozen BatchNorm scale); default 1.
    strides: conv strides, an int or a pair.
    padding: ``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left,
      right))`` pads of the merged kernel.
    use_bias: whether to add one shared bias.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the params.
    kernel_init: initializer of every branch kernel.
    bias_init: initializer of the bias.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, numpy as np
    >>> import sgs_optax
    >>> branches = [(3, 3), (1, 3), (3, 1)]  # ACB
    >>> conv = sgs_optax.BranchedConv(4, (3, 3), branches)
    >>> x = jax.random.normal(jax.random.key(0), (1, 5, 5, 2))
    >>> params = conv.init(jax.random.key(1), x)["params"]
    >>> sorted(params)
    ['bias', 'kernel_0', 'kernel_1', 'kernel_2']
    >>> merged = sgs_optax.merge_branches(params, (3, 3), branches)
    >>> y = nn.Conv(4, (3, 3)).apply({"params": merged}, x)
    >>> bool(np.allclose(conv.apply({"params": params}, x), y, atol=1e-5))
    True
  """

  features: int
  kernel_size: Sequence[int]
  branches: Sequence[tuple[int, int]]
  branch_scales: Sequence[Any] | None = None
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel_size = tuple(self.kernel_size)
    strides = (
        (self.strides,) * 2 if isinstance(self.strides, int) else
        tuple(self.strides)
    )
    if isinstance(self.padding, str):
      pads = jax.lax.padtype_to_pads(
          inputs.shape[1:3], kernel_size, strides, self.padding
      )
    else:
      pads = tuple(tuple(p) for p in self.padding)
    padded = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
    scales = self.branch_scales or [1.0] * len(self.branches)
    if len(scales) != len(self.branches):
      raise ValueError(
          f"Got {len(scales)} branch scales for {len(self.branches)} branches."
      )
    height, width = padded.shape[1:3]
    outputs = None
    for index, (branch, scale) in enumerate(zip(self.branches, scales)):
      top, left = _branches.branch_offsets(kernel_size, branch)
      kernel = self.param(
          f"kernel_{index}",
          self.kernel_init,
          (*branch, inputs.shape[-1], self.features),
          self.param_dtype,
      )
      window = padded[
          :,
          top : height - (kernel_size[0] - branch[0] - top),
          left : width - (kernel_size[1] - branch[1] - left),
      ]
      window, kernel = nn.dtypes.promote_dtype(window, kernel, dtype=self.dtype)
      branch_out = jax.lax.conv_general_dilated(
          window, kernel, strides, "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
      ) * jnp.asarray(scale, window.dtype)
      outputs = branch_out if outputs is None else outputs + branch_out
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
      outputs = outputs + bias.astype(outputs.dtype)
    return outputs
