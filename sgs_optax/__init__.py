"""sgs_optax: gradient reshaping for conv networks, as optax transforms.

Spatial Gradient Scaling (:func:`sgs`) and Channel-Directed Gradients
(:func:`cdg`) are pure ``optax.GradientTransformation``\\ s; chain them with
any optimizer. Names that need Flax (:class:`BranchedConv`) are imported on
first use, so the core only depends on jax, optax, chex and numpy.
"""

import importlib

from sgs_optax._branches import branch_scaling
from sgs_optax._branches import merge_branches
from sgs_optax._branches import preset_branches
from sgs_optax._capture import capture_conv_inputs
from sgs_optax._capture import conv_layouts
from sgs_optax._cdg import cdg
from sgs_optax._cdg import channel_directed_gradients
from sgs_optax._dependence import dependence_to_scaling
from sgs_optax._dependence import spatial_dependence
from sgs_optax._frameworks import flax_installed as _flax_installed
from sgs_optax._geometry import ConvInput
from sgs_optax._kernels import KernelAxes
from sgs_optax._kernels import parse_layout
from sgs_optax._kernels import resolve_layouts
from sgs_optax._refresh import refresh_scalings
from sgs_optax._scaling import ScalingTable
from sgs_optax._sgs import get_scalings
from sgs_optax._sgs import sgs
from sgs_optax._sgs import spatial_gradient_scaling
from sgs_optax._sgs import SpatialScalingState

__version__ = "0.1.0"

__all__ = [
    "ConvInput",
    "KernelAxes",
    "ScalingTable",
    "SpatialScalingState",
    "branch_scaling",
    "capture_conv_inputs",
    "cdg",
    "channel_directed_gradients",
    "conv_layouts",
    "dependence_to_scaling",
    "get_scalings",
    "merge_branches",
    "parse_layout",
    "preset_branches",
    "refresh_scalings",
    "resolve_layouts",
    "sgs",
    "spatial_dependence",
    "spatial_gradient_scaling",
]
if _flax_installed():
  # `from sgs_optax import *` must work without Flax, which BranchedConv needs.
  __all__.append("BranchedConv")

# Public names whose modules import Flax.
_FLAX_NAMES = {
    "BranchedConv": "sgs_optax._branched_conv",
}


def __getattr__(name: str):
  if name in _FLAX_NAMES:
    try:
      module = importlib.import_module(_FLAX_NAMES[name])
    except ImportError as e:
      raise ImportError(
          f"sgs_optax.{name} needs Flax: pip install 'sgs-optax[flax]'."
      ) from e
    return getattr(module, name)
  raise AttributeError(f"module 'sgs_optax' has no attribute {name!r}")


def __dir__():
  return sorted({*__all__, *_FLAX_NAMES, "__version__"})
