"""Running a script on simulated CPU devices, in a fresh process.

XLA_FLAGS must be set before jax starts, so multi-device checks run in a
subprocess; this is the one place that builds its environment.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_devices(*argv: str, devices: int = 8, timeout: int = 600,
                   **env: str) -> subprocess.CompletedProcess:
  """Runs ``python *argv`` on ``devices`` CPU devices; raises if it fails."""
  environ = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  environ["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT), environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  environ["XLA_FLAGS"] = " ".join([
      environ.get("XLA_FLAGS", ""),
      f"--xla_force_host_platform_device_count={devices}"]).strip()
  result = subprocess.run([sys.executable, *argv], env=environ,
                          capture_output=True, text=True, timeout=timeout,
                          check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result
