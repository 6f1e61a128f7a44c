"""Tests of benchmarks/compare.py (--tiny, in-process) and _models.py."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import _models
from benchmarks import _train
from benchmarks import compare


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("compare")
  out, png = out_dir / "results.json", out_dir / "results.png"
  results = compare.main(
      ["--tiny", "--seeds", "2", "--out", str(out), "--plot", str(png)])
  return results, out, png


@pytest.mark.slow
def test_tiny_run_writes_json_and_png(tiny_run):
  results, out, png = tiny_run
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  written = json.loads(out.read_text())
  assert written["settings"]["tiny"] is True
  assert written["settings"]["seeds"] == 2
  assert written["settings"]["dataset"] == "digits"
  assert [m["method"] for m in written["methods"]] == [
      m["method"] for m in results["methods"]]
  assert "final test acc" in written["table"]


@pytest.mark.slow
def test_tiny_run_covers_every_method(tiny_run):
  results, _, _ = tiny_run
  ran = [m["method"] for m in results["methods"]]
  assert ran == list(compare.METHODS)
  epochs = results["settings"]["epochs"]
  for record in results["methods"]:
    assert len(record["runs"]) == 2
    assert math.isfinite(record["final_test_accuracy_mean"])
    assert math.isfinite(record["final_test_accuracy_std"])
    for run in record["runs"]:
      assert len(run["test_accuracy"]) == epochs
      assert all(0.0 <= a <= 1.0 for a in run["test_accuracy"])
      assert all(math.isfinite(v) for v in run["train_loss"])
      assert run["final_test_accuracy"] == (
          run.get("merged_final_test_accuracy", run["test_accuracy"][-1]))
    # The train step is compiled once per method, refreshes included.
    assert record["train_step_compilations"] == 1, record["method"]
    if record["learned_refresh"]:
      assert record["refresh_count"] == epochs  # refresh_every == 1 here.
      assert record["refresh_compilations"] <= 1


@pytest.mark.slow
def test_tiny_run_seeds_are_paired_and_reproducible(tiny_run):
  results, _, _ = tiny_run
  sgd = next(m for m in results["methods"] if m["method"] == "sgd")
  again = compare.main(["--tiny", "--seeds", "2", "--methods", "sgd",
                        "--no-progress"])
  np.testing.assert_array_equal(
      [r["test_accuracy"] for r in sgd["runs"]],
      [r["test_accuracy"] for r in again["methods"][0]["runs"]])
  np.testing.assert_array_equal(
      [r["train_loss"] for r in sgd["runs"]],
      [r["train_loss"] for r in again["methods"][0]["runs"]])


@pytest.mark.slow
def test_tiny_run_merged_model_equals_branched_model(tiny_run):
  results, _, _ = tiny_run
  branched = [m for m in results["methods"] if m["model_conv"] != "plain"]
  assert {m["method"] for m in branched} == {"acb-branched", "repvgg-branched"}
  for record in branched:
    assert record["merge_ok"], record["method"]
    for run in record["runs"]:
      assert run["merge_prediction_agreement"] == 1.0
      assert run["merged_final_test_accuracy"] == (
          run["branched_final_test_accuracy"])


@pytest.mark.slow
def test_tiny_run_on_mock_cifar10_with_augmentation(tfds):
  """The tfds path end to end (offline: mock_data, download=False)."""
  with tfds.testing.mock_data(num_examples=8):
    results = compare.main(["--tiny", "--dataset", "cifar10", "--methods",
                            "sgd", "--batch-size", "4", "--no-progress"])
  assert results["settings"]["input_shape"] == [32, 32, 3]
  assert results["settings"]["steps_per_epoch"] == 2
  (record,) = results["methods"]
  assert all(math.isfinite(v) for v in record["runs"][0]["train_loss"])


def test_random_crop_flip_keeps_pixels():
  images = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1)
  out = _train.random_crop_flip(jax.random.key(0), images, pad=2)
  assert out.shape == images.shape
  for original, augmented in zip(np.asarray(images), np.asarray(out)):
    kept = set(augmented.ravel().tolist()) - {0.0}
    assert kept <= set(original.ravel().tolist())


def _block(conv):
  # A ResNet block with a stride-2 3x3 conv and a 1x1 projection shortcut:
  # the parts of ResNet-18 that small_vgg lacks, at a fraction of the compile.
  return _models.BasicBlock(8, strides=2, conv=conv)


@pytest.mark.parametrize("preset, size", [
    ("acb", 8),  # stride 2, SAME pads (0, 1).
    ("repvgg", 7),  # stride 2, SAME pads (1, 1).
])
def test_merged_resnet_block_equals_branched_block(preset, size):
  """Stride-2 convs, 1x1 shortcuts and non-trivial BN statistics included.

  (The --tiny run checks the same on small_vgg for both presets.)
  """
  factory = _models.branched_conv(preset)
  plain, branched = _block(_models.plain_conv), _block(factory)
  # rbg keys: the same test, much faster to compile than threefry on CPU.
  key = jax.random.key(0, impl="rbg")
  x = jax.random.normal(jax.random.fold_in(key, 1), (2, size, size, 3))
  variables = jax.jit(lambda k: branched.init(k, x))(key)
  assert set(variables["params"]["conv1"]) == {
      f"kernel_{i}" for i in range(3 if preset == "acb" else 2)}
  # The 1x1 shortcut stays a plain conv.
  assert set(variables["params"]["shortcut_conv"]) == {"kernel"}
  batch_stats = jax.tree.map(
      lambda a: a + jax.random.uniform(jax.random.fold_in(key, 2), a.shape),
      variables["batch_stats"])
  merged = _models.merge_branched_params(variables["params"])
  plain_params = jax.eval_shape(lambda: plain.init(key, x))["params"]
  assert jax.tree.map(lambda a: a.shape, merged) == jax.tree.map(
      lambda a: a.shape, plain_params)
  y_branched = jax.jit(branched.apply)(
      {"params": variables["params"], "batch_stats": batch_stats}, x)
  y_plain = jax.jit(plain.apply)(
      {"params": merged, "batch_stats": batch_stats}, x)
  np.testing.assert_allclose(y_plain, y_branched, rtol=1e-4,
                             atol=1e-4 * float(jnp.abs(y_branched).max()))


@pytest.mark.parametrize("name", ["small_vgg", "vgg11", "resnet18"])
@pytest.mark.parametrize("preset", ["acb", "repvgg"])
def test_merged_param_tree_is_the_plain_models(name, preset):
  """Full-size models, abstractly (no compilation): same tree, same shapes."""
  channels = 1 if name == "small_vgg" else 3
  x = jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)
  key = jax.random.key(0)
  plain = _models.make_model(name, 100)
  branched = _models.make_model(name, 100,
                                conv=_models.branched_conv(preset))
  plain_vars = jax.eval_shape(lambda x: plain.init(key, x), x)
  branched_vars = jax.eval_shape(lambda x: branched.init(key, x), x)
  merged = jax.eval_shape(_models.merge_branched_params,
                          branched_vars["params"])
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  assert shapes(merged) == shapes(plain_vars["params"])
  assert shapes(branched_vars["batch_stats"]) == shapes(
      plain_vars["batch_stats"])
  n_branched = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(
      branched_vars["params"]) if path[-1].key == "kernel_1")
  n_convs = {"small_vgg": 4, "vgg11": 8, "resnet18": 17}[name]
  assert n_branched == n_convs  # every 3x3 conv, none of the 1x1 shortcuts.


def test_parse_args_defaults():
  args = compare.parse_args([])
  assert args.dataset == "digits" and args.model == "small_vgg"
  assert args.seeds == 3 and args.methods == list(compare.METHODS)
  assert args.epochs == compare.DEFAULT_EPOCHS["digits"]
  assert args.lr == pytest.approx(0.1 * args.batch_size / 128)
  tiny = compare.parse_args(["--tiny", "--methods", "sgd, sgs-acb"])
  assert tiny.seeds == 1 and tiny.epochs == compare.TINY["epochs"]
  assert tiny.methods == ["sgd", "sgs-acb"]
  with pytest.raises(SystemExit):
    compare.parse_args(["--methods", "sgd,nope"])
