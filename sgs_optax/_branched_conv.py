"""A Flax linen conv made of parallel branches, each run as its own conv.

This is the structural-reparameterization baseline (ACB, RepVGG, RepLKNet,
UniRepLKNet style) that SGS reproduces without branches, for 1-D, 2-D and
3-D convs. Each branch really pays its convolution, so that benchmarks
measure the structural cost honestly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgs_optax import _branches
from sgs_optax import _geometry


class BranchedConv(nn.Module):
  """Parallel conv branches centred in a ``kernel_size`` window.

  The output is ``sum_k branch_scales[k] * conv_k(x) + bias``, with the same
  geometry (strides, padding, output size) as one ``nn.Conv`` of
  ``kernel_size``: the input is padded once as that conv pads it, and every
  branch, with its own size and dilation, reads the taps of the window that
  it covers in the merged kernel. Inputs are channels last with one batch
  axis, ``(N, *spatial, C)``, with as many spatial axes as ``kernel_size``.
  Params: ``kernel_0 .. kernel_{N-1}`` (``(*branch_k, C / groups,
  features)``, e.g. HWIO) and one shared ``bias``. Fold them into a plain
  conv with :func:`sgs_optax.merge_branches`.

  Attributes:
    features: number of output channels.
    kernel_size: the merged kernel's size, one int per spatial axis.
    branches: size of every branch (an int or one per axis), the main
      full-size one included; e.g. from :func:`sgs_optax.preset_branches`.
    branch_scales: optional constant per branch, a scalar or ``(features,)``
      array (e.g. a frozen BatchNorm scale); default 1.
    dilations: optional dilation per branch (an int or one per axis);
      default 1.
    strides: conv strides, an int or one per axis.
    padding: the merged conv's padding, as ``nn.Conv`` takes it:
      ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"``
      (1-D), an int, or an int or ``(low, high)`` pair per axis.
    feature_group_count: feature groups (``C`` for a depthwise conv).
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
    >>> # A 1-D UniRepLKNet-style block: 7 taps + dilated small kernels.
    >>> branches, dilations = sgs_optax.preset_branches("unireplknet", (7,))
    >>> conv = sgs_optax.BranchedConv(4, (7,), branches, dilations=dilations)
    >>> x = jnp.ones((2, 16, 3))
    >>> params = conv.init(jax.random.key(0), x)["params"]
    >>> conv.apply({"params": params}, x).shape, params["kernel_2"].shape
    ((2, 16, 4), (3, 3, 4))
  """

  features: int
  kernel_size: Sequence[int]
  branches: Sequence[Any]
  branch_scales: Sequence[Any] | None = None
  dilations: Sequence[Any] | None = None
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  def _padded(self, inputs: jax.Array) -> jax.Array:
    """The input padded once, as the merged conv pads it."""
    n = len(self.kernel_size)
    if inputs.ndim != n + 2:
      raise ValueError(
          f"BranchedConv with a {n}-D kernel_size {tuple(self.kernel_size)} "
          f"expects inputs (N, *{n} spatial, C), got shape {inputs.shape}."
      )
    pads, mode = _geometry.explicit_pads(
        self.padding, spatial_shape=inputs.shape[1:-1],
        kernel_size=self.kernel_size, strides=self.strides)
    return jnp.pad(inputs, ((0, 0), *pads, (0, 0)),
                   mode=_geometry.JNP_PAD_MODES[mode])

  def _branch(self, index: int, padded: jax.Array, branch: Any,
              dilation: Any) -> jax.Array:
    """One branch: a VALID conv on the part of the window it covers."""
    size = tuple(_geometry.as_sizes(self.kernel_size, len(self.kernel_size),
                                    "kernel_size", minimum=1))
    n = len(size)
    branch = _geometry.as_sizes(branch, n, "each branch", minimum=1)
    dilation = _geometry.as_sizes(dilation, n, "each dilation", minimum=1)
    taps = _branches.branch_taps(size, branch, dilation)
    # Crop so that the branch's first tap sits where the window starts and
    # its window ends where the merged kernel's ends: same output size.
    crop = tuple(slice(t.start, p - (k - t.stop))
                 for t, p, k in zip(taps, padded.shape[1:-1], size))
    window = padded[(slice(None), *crop)]
    kernel = self.param(
        f"kernel_{index}", self.kernel_init,
        (*branch, padded.shape[-1] // self.feature_group_count, self.features),
        self.param_dtype)
    window, kernel = nn.dtypes.promote_dtype(window, kernel, dtype=self.dtype)
    letters = "DHW"[-n:]
    return jax.lax.conv_general_dilated(
        window, kernel, _geometry.as_sizes(self.strides, n, "strides"),
        "VALID", rhs_dilation=dilation,
        dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
        feature_group_count=self.feature_group_count)

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    scales = _branches.check_scales(self.branches, self.branch_scales)
    dilations = _branches.check_dilations(self.branches, self.dilations)
    padded = self._padded(inputs)
    outputs = None
    for index, (branch, dilation, scale) in enumerate(
        zip(self.branches, dilations, scales)):
      out = self._branch(index, padded, branch, dilation)
      out = out * jnp.asarray(scale, out.dtype)
      outputs = out if outputs is None else outputs + out
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
      outputs = outputs + bias.astype(outputs.dtype)
    return outputs
