"""The SGS paper's recipes (compare.py --recipe), offline.

The tiny runs read ``tfds.testing.mock_data`` (random images of the real
shapes) through the normal tfds path; nothing is downloaded. The kill test
runs the command line in subprocesses that share a JAX compilation cache, so
only the first one compiles.
"""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import _checkpoint
from benchmarks import _recipes
from benchmarks import compare

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(_recipes.RECIPES))
def test_recipe_is_the_papers_protocol(name):
  args = compare.parse_args(["--recipe", name])
  dataset, model = name.split("-")
  assert (args.dataset, args.model) == (dataset, model)
  assert (args.epochs, args.batch_size, args.lr) == (200, 128, 0.1)
  assert (args.momentum, args.weight_decay) == (0.9, 5e-4)
  assert args.augment is True and args.tune is False
  assert args.methods == ["sgd", "sgs-learned"]
  assert (args.refresh_every, args.refresh_batches) == (
      (5, 2) if dataset == "cifar100" else (30, 20))
  assert args.out == f"results/{name}.json"
  assert args.epoch_log == f"results/{name}.epochs.jsonl"
  assert args.checkpoint_dir == f"results/{name}.ckpt"
  published = _recipes.RECIPES[name].published()
  if dataset == "cifar100":
    assert published["top1_percent"] == {
        "vgg11": {"sgd": 70.8, "sgs-learned": 73.2},
        "vgg16": {"sgd": 74.9, "sgs-learned": 76.2},
        "resnet18": {"sgd": 77.8, "sgs-learned": 78.8}}[model]
    assert "Detkov" in published["source"]
  else:
    assert published is None
  tiny = compare.parse_args(["--recipe", name, "--tiny", "--epochs", "3"])
  assert (tiny.epochs, tiny.batch_size, tiny.seeds) == (3, 32, 1)
  assert tiny.refresh_every == args.refresh_every and not tiny.tune
  assert tiny.out == f"results/{name}.tiny.json"


def test_recipe_fixes_its_dataset_and_model():
  with pytest.raises(SystemExit):
    compare.parse_args(["--recipe", "cifar10-vgg11", "--model", "resnet18"])


# Every recipe runs in tiny mode: these five here, cifar100-vgg11 in the kill
# test. The learned method (its refresh is the costliest compile) runs on
# cifar10-resnet18 here and cifar100-vgg11 there: both refresh schedules, a
# VGG and a ResNet.
TINY_RUNS = {"cifar10-resnet18": ("sgd", "sgs-learned"),
             "cifar100-resnet18": ("sgd",), "cifar10-vgg16": ("sgd",),
             "cifar100-vgg16": ("sgd",), "cifar10-vgg11": ("sgd",)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY_RUNS))
def test_recipe_tiny_mode(name, tfds, tmp_path):
  methods = TINY_RUNS[name]
  log = tmp_path / "epochs.jsonl"
  results = compare.main([
      "--recipe", name, "--tiny", "--mock-data", "48", "--no-progress",
      "--methods", ",".join(methods), "--out", str(tmp_path / "r.json"),
      "--plot", "", "--epoch-log", str(log),
      "--checkpoint-dir", str(tmp_path / "ckpt")])
  settings = results["settings"]
  assert settings["input_shape"] == [32, 32, 3]
  assert settings["num_classes"] == (100 if "cifar100" in name else 10)
  assert settings["augment"] is True
  assert [m["method"] for m in results["methods"]] == list(methods)
  lines = [json.loads(line) for line in log.read_text().splitlines()]
  assert [(r["method"], r["epoch"]) for r in lines] == [
      (m, e) for m in methods for e in range(2)]
  assert all(math.isfinite(r["images_per_s"]) for r in lines)
  # One checkpoint per run, at its last epoch.
  assert sorted(p.name for p in (tmp_path / "ckpt" / "final").iterdir()) == (
      sorted(methods))
  if "sgs-learned" in methods:
    learned = results["methods"][1]
    assert learned["refresh_count"] == 1  # epoch 0 of 2 (every 5 or 30).
    assert learned["train_step_compilations"] == 1
    assert learned["paired_difference"]["ci95"] is None  # one seed.
    assert lines[2]["refreshed"] and not lines[3]["refreshed"]
  assert results["published"] == _recipes.RECIPES[name].published()
  throughput = results["throughput"]
  assert throughput["accelerator_throughput"].startswith("unmeasured")
  assert math.isfinite(throughput["outside_jit_share"])


def test_checkpoint_round_trip_and_refusal(tmp_path):
  state = ({"w": jnp.arange(6.0).reshape(2, 3)}, jnp.int32(7))
  settings = {"epochs": 8, "lr": 0.1, "methods": ("sgd",)}
  checkpoint = _checkpoint.RunCheckpoint(str(tmp_path), settings, every=2)
  checkpoint.save(1, state, {"train_loss": [1.0]})  # not due (every 2).
  checkpoint.save(2, state, {"train_loss": [1.0, 0.5]})
  checkpoint.close()
  again = _checkpoint.RunCheckpoint(str(tmp_path), settings)
  assert again.latest_epoch() == 2
  template = ({"w": jnp.zeros((2, 3))}, jnp.int32(0))
  restored, history = again.restore(template)
  np.testing.assert_array_equal(restored[0]["w"], state[0]["w"])
  assert int(restored[1]) == 7 and history == {"train_loss": [1.0, 0.5]}
  again.close()
  other = _checkpoint.RunCheckpoint(str(tmp_path), {**settings, "lr": 0.2})
  with pytest.raises(_checkpoint.SettingsMismatchError, match="lr differ"):
    other.restore(template)
  other.close()


def _command(out, log, checkpoint_dir):
  return [sys.executable, "-m", "benchmarks.compare",
          "--recipe", "cifar100-vgg11", "--tiny", "--mock-data", "64",
          "--epochs", "8", "--no-progress", "--plot", "", "--out", str(out),
          "--epoch-log", str(log), "--checkpoint-dir", str(checkpoint_dir)]


@pytest.mark.slow
def test_recipe_resumes_after_a_kill(tmp_path):
  """SIGKILL mid-run, rerun the same command: the same numbers as no kill."""
  env = {**os.environ, "PYTHONPATH": str(ROOT),
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}

  def run(command):
    subprocess.run(command, env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=900)

  reference = tmp_path / "reference.json"
  run(_command(reference, "", ""))
  out, log, ckpt = (tmp_path / "r.json", tmp_path / "epochs.jsonl",
                    tmp_path / "ckpt")
  proc = subprocess.Popen(_command(out, log, ckpt), env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 600
  while proc.poll() is None and time.monotonic() < deadline:
    if log.exists() and log.read_text().count("\n") >= 2:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL  # killed before the end.
  assert not out.exists()
  epochs_before = log.read_text().count("\n")
  run(_command(out, log, ckpt))
  resumed, want = json.loads(out.read_text()), json.loads(
      reference.read_text())
  for got_method, want_method in zip(resumed["methods"], want["methods"]):
    for got_run, want_run in zip(got_method["runs"], want_method["runs"]):
      for key in ("test_accuracy", "train_loss", "refresh_epochs"):
        np.testing.assert_array_equal(got_run[key], want_run[key])
  assert resumed["methods"][0]["runs"][0]["resumed_at_epoch"] is not None
  assert want["published"]["top1_percent"] == {"sgd": 70.8,
                                               "sgs-learned": 73.2}
  lines = [json.loads(line) for line in log.read_text().splitlines()]
  assert len(lines) >= 16 > epochs_before  # every epoch logged at least once.
  assert {(r["method"], r["epoch"]) for r in lines} == {
      (m, e) for m in ("sgd", "sgs-learned") for e in range(8)}
