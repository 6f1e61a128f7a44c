"""Sharded (8 simulated devices, explicit and automatic meshes) and
two-process training match one device.

Each configuration runs `examples.sharded_training` in a subprocess, so that
XLA_FLAGS and jax.distributed are set up before jax is imported.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 420


def run_example(tmp_path, name, *args, devices=1, process_id=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  out = tmp_path / f"{name}.npz"
  command = [sys.executable, "-m", "examples.sharded_training", "--steps",
             "4", "--refresh-every", "2", "--out", str(out), *args]
  return out, subprocess.Popen(command, cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)


def finish(process):
  try:
    stdout, stderr = process.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert process.returncode == 0, stderr[-3000:]
  return stdout


def compare(reference, other):
  a, b = np.load(reference), np.load(other)
  assert sorted(a.files) == sorted(b.files)
  assert any(k.startswith("scalings/") for k in a.files)
  for key in a.files:
    np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-5,
                               err_msg=key)
  # The learned matrices are not the initial ones: a refresh really ran.
  assert not np.allclose(a["scalings/conv1/kernel"], 1.0)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
  out, process = run_example(tmp_path_factory.mktemp("one"), "one")
  finish(process)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["explicit", "auto"])
def test_eight_devices_match_one_and_keep_every_sharding(tmp_path,
                                                         single_device, mesh):
  out, process = run_example(tmp_path, "eight", "--mesh", mesh, devices=8)
  assert f"8 devices, {mesh} mesh" in finish(process)
  compare(single_device, out)
  assert bool(np.load(out)["sharding_kept"])  # params and optimizer state.


def free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, single_device):
  coordinator = f"127.0.0.1:{free_port()}"
  common = ("--num-processes", "2", "--coordinator", coordinator)
  out, first = run_example(tmp_path, "two", *common, "--process-id", "0")
  _, second = run_example(tmp_path, "two_b", *common, "--process-id", "1")
  try:
    assert "process 0/2, 2 devices" in finish(first)
    assert "process 1/2, 2 devices" in finish(second)
  finally:
    for p in (first, second):
      if p.poll() is None:
        p.kill()
  compare(single_device, out)
