"""What every benchmark records next to its numbers, and how it writes them."""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any

import jax
import numpy as np
import optax


def environment() -> dict[str, Any]:
  """Versions, machine and load: the context that timings depend on."""
  import flax  # pylint: disable=g-import-not-at-top

  import sgs_optax  # pylint: disable=g-import-not-at-top
  env = {
      "python": platform.python_version(),
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "sgs_optax": sgs_optax.__version__,
      "devices": [str(d) for d in jax.devices()],
  }
  try:
    env["loadavg"] = list(os.getloadavg())
  except OSError:
    pass
  return env


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, float) and math.isnan(value):
    return None
  raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(path: str, results: dict[str, Any]) -> None:
  """Writes ``results`` to ``path`` (creating its folder) and says so."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1, default=_json_default)
  print(f"wrote {path}")
