"""The device check runs in its tiny mode on CPU, as the accelerator would run
it, and imports nothing the accelerator machine lacks."""

import json
import subprocess
import sys

import pytest

import _devices

# Installed here but not on the accelerator machine (jax, flax, optax, chex,
# numpy, equinox and orbax are there).
ABSENT_THERE = ("sklearn", "matplotlib", "tqdm", "tensorflow",
                "tensorflow_datasets", "grain", "fast_histogram",
                "hypothesis")


def test_imports_only_what_the_accelerator_machine_has():
  code = ("import sys, benchmarks.device_check; "
          "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
  out = subprocess.run([sys.executable, "-c", code], cwd=_devices.ROOT,
                       capture_output=True, text=True, check=True).stdout
  imported = set(out.split())
  assert "sgs_optax" in imported
  assert not imported & set(ABSENT_THERE), imported & set(ABSENT_THERE)


@pytest.mark.slow  # a few minutes: every part compiles its models.
def test_tiny_run_writes_every_key_with_every_check_true(tmp_path):
  out = tmp_path / "device.json"
  _devices.run_on_devices("-m", "benchmarks.device_check", "--tiny", "--out",
                          str(out), devices=1)
  result = json.loads(out.read_text())
  for key in ("backend", "device_kind", "jax_version", "step_ratios", "cdg",
              "estimator", "refresh", "checks"):
    assert result[key] is not None, key
  assert result["backend"] == "cpu"
  assert {name: c["ok"] for name, c in result["checks"].items()} == {
      "sgs_equals_branched": True, "dense_cdg_equals_fft": True,
      "matmul_counts_equal_scatter": True}
  ratios = result["step_ratios"]["ratios"]
  assert set(ratios) == {"vgg11/float32", "vgg11/bfloat16"}
  for by_method in ratios.values():
    assert set(by_method) == {"sgs", "cdg-fft", "cdg-dense", "sgs+cdg",
                              "acb-branched"}
    assert all(v > 0 for v in by_method.values())
  assert set(result["estimator"]["run_s"]) == {"scatter", "matmul"}
  for where in ("device", "host"):
    assert 0 < result["refresh"][where]["share_of_training"] < 1
