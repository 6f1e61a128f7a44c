"""Tests of benchmarks/compare.py (--tiny, in-process) and _models.py."""

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import _methods
from benchmarks import _models
from benchmarks import _train
from benchmarks import compare
import sgs_optax


@pytest.mark.slow
def test_tiny_run_of_every_method(tmp_path):
  """One run checked from every side (one test: the run is the cost)."""
  out, png = tmp_path / "results.json", tmp_path / "results.png"
  results = compare.main(["--tiny", "--seeds", "2", "--methods", "all",
                          "--out", str(out), "--plot", str(png)])
  _check_written(results, out, png)
  _check_every_method(results)
  _check_lr_and_paired_differences(results)
  _check_merged_equals_branched(results)
  _check_branched_baseline_starts_where_sgs_starts(results)


def _check_written(results, out, png):
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  written = json.loads(out.read_text())
  assert written["settings"]["tiny"] is True
  assert written["settings"]["tune"] is False  # --tiny never tunes unasked.
  assert written["settings"]["seeds"] == 2
  assert written["settings"]["dataset"] == "digits"
  assert [m["method"] for m in written["methods"]] == [
      m["method"] for m in results["methods"]]
  assert "paired diff" in written["table"]
  assert written["verdict"].startswith("Verdict")
  assert written["throughput"]["accelerator_throughput"].startswith(
      "unmeasured")


def _check_every_method(results):
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


def _check_lr_and_paired_differences(results):
  by_name = {m["method"]: m for m in results["methods"]}
  settings = results["settings"]
  for record in results["methods"]:
    family_lr = (settings["adamw_lr"] if record["method"].startswith("adamw")
                 else settings["lr"])
    assert record["lr"] == family_lr and record["tuning"] is None
    if record["method"] in ("sgd", "adamw"):
      assert "paired_difference" not in record
      continue
    diff = record["paired_difference"]
    assert diff["baseline"] == (
        "adamw" if record["method"].startswith("adamw+sgs") else "sgd")
    base = by_name[diff["baseline"]]
    # Recomputed here from the runs: seed by seed, in percentage points.
    expected = [100 * (a["final_test_accuracy"] - b["final_test_accuracy"])
                for a, b in zip(record["runs"], base["runs"])]
    np.testing.assert_allclose(diff["per_seed"], expected, atol=1e-9)
    assert diff["mean"] == pytest.approx(np.mean(expected))
    lo, hi = diff["ci95"]
    assert lo <= diff["mean"] <= hi


def _check_merged_equals_branched(results):
  branched = [m for m in results["methods"] if m["model_conv"] != "plain"]
  assert {m["method"] for m in branched} == {"acb-branched", "repvgg-branched"}
  for record in branched:
    assert record["merge_ok"], record["method"]
    for run in record["runs"]:
      assert run["merge_prediction_agreement"] == 1.0
      assert run["merged_final_test_accuracy"] == (
          run["branched_final_test_accuracy"])


def _check_branched_baseline_starts_where_sgs_starts(results):
  """Same merged initial weights: ACB branches follow sgs("acb") (SGD)."""
  by_name = {m["method"]: m for m in results["methods"]}
  for preset in ("acb", "repvgg"):
    for sgs_run, branched_run in zip(by_name[f"sgs-{preset}"]["runs"],
                                     by_name[f"{preset}-branched"]["runs"]):
      # Equal up to float32 rounding (an independent branched init differs
      # from the first epoch by far more).
      np.testing.assert_allclose(branched_run["train_loss"],
                                 sgs_run["train_loss"], rtol=1e-3)


@pytest.mark.slow
def test_runs_are_reproducible():
  argv = ["--tiny", "--seeds", "2", "--methods", "sgd", "--no-progress",
          "--out", ""]
  first, again = compare.main(argv), compare.main(argv)
  for key in ("test_accuracy", "train_loss"):
    np.testing.assert_array_equal(
        [r[key] for r in first["methods"][0]["runs"]],
        [r[key] for r in again["methods"][0]["runs"]])


@pytest.mark.slow
def test_identical_methods_differ_by_exactly_zero(monkeypatch):
  """Pairing: the same transform, seeds, batches and augmentation."""
  monkeypatch.setitem(compare.METHODS, "sgd-twin",
                      compare.Method("sgd-twin", compare.sgd_chain))
  results = compare.main(["--tiny", "--seeds", "2", "--methods", "sgd-twin",
                          "--augment", "on", "--no-progress", "--out", ""])
  twin, sgd = results["methods"][::-1]
  assert sgd["method"] == "sgd"  # the baseline was added automatically.
  assert twin["paired_difference"]["per_seed"] == [0.0, 0.0]
  assert twin["paired_difference"]["mean"] == 0.0
  assert twin["paired_difference"]["ci95"] == [0.0, 0.0]
  # Not a trivial zero: the seeds themselves differ.
  runs = sgd["runs"]
  assert runs[0]["train_loss"] != runs[1]["train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("tolerance", [0.15, 0.0])
def test_tuning_picks_the_best_validation_lr(tmp_path, tolerance):
  results = compare.main([
      "--tiny", "--tune", "--tune-grid", "3", "--tune-factor", "2",
      "--tune-tolerance", str(tolerance), "--methods", "sgd",
      "--no-progress", "--out", str(tmp_path / "tuned.json"), "--plot", ""])
  (record,) = results["methods"]
  tuning = record["tuning"]
  default = results["settings"]["lr"]
  assert tuning["grid"] == pytest.approx([default / 2, default, default * 2])
  assert [t["lr"] for t in tuning["trials"]] == tuning["grid"]
  for trial in tuning["trials"]:
    assert len(trial["val_loss"]) == len(trial["val_accuracy"]) == 1
    assert len(trial["val_curves"][0]) == results["settings"]["epochs"]
    assert trial["val_loss"][0] == trial["val_loss_curves"][0][-1]
  scores = [t["val_loss_mean"] for t in tuning["trials"]]
  assert len(set(scores)) == 3  # continuous: no exact ties on a tiny split.
  best = [lr for lr, s in zip(tuning["grid"], scores)
          if s <= (1 + tolerance) * min(scores)]
  nearest = min(best, key=lambda lr: (abs(math.log(lr / default)), lr))
  np.testing.assert_allclose(tuning["loss_over_lowest"],
                             np.array(scores) / min(scores))
  assert tuning["chosen_lr"] == nearest == record["lr"]
  assert tuning["method"] == "sgd" and record["tuned_as"] is None
  assert "validation loss" in tuning["rule"]
  assert tuning["tie_tolerance"] == tolerance
  # The validation split is carved from the training split (20% on digits).
  train = results["settings"]["train_examples"]
  assert tuning["val_examples"] == math.ceil(0.2 * train)
  assert tuning["train_examples"] + tuning["val_examples"] == train
  written = json.loads((tmp_path / "tuned.json").read_text())
  assert written["methods"][0]["tuning"]["chosen_lr"] == record["lr"]


@pytest.mark.slow
def test_exact_equivalents_train_at_one_searched_lr(tmp_path):
  """acb-branched takes sgs-acb's search, with or without sgs-acb."""
  log = tmp_path / "epochs.jsonl"
  common = ["--tiny", "--tune", "--tune-grid", "3", "--tune-factor", "3",
            "--no-progress", "--out", "", "--plot", ""]
  both = compare.main(common + ["--methods", "sgs-acb,acb-branched",
                                "--epoch-log", str(log)])
  by_name = {r["method"]: r for r in both["methods"]}
  sgs, branched = by_name["sgs-acb"], by_name["acb-branched"]
  assert branched["tuning"] == sgs["tuning"]
  assert branched["tuning"]["method"] == "sgs-acb"
  assert branched["tuned_as"] == "sgs-acb" and sgs["tuned_as"] is None
  assert branched["lr"] == sgs["lr"] == sgs["tuning"]["chosen_lr"]
  # Searched once: no tuning run of the branched network itself.
  records = [json.loads(line) for line in log.read_text().splitlines()]
  tuned = {(r["method"], r["lr"]) for r in records if r["phase"] == "tune"}
  assert {m for m, _ in tuned} == {"sgd", "sgs-acb"}
  assert len(tuned) == 2 * 3
  assert "lr of sgs-acb" in both["table"]
  alone = compare.main(common + ["--methods", "acb-branched"])
  (branched_alone,) = [r for r in alone["methods"]
                       if r["method"] == "acb-branched"]
  assert branched_alone["tuning"]["method"] == "sgs-acb"
  assert branched_alone["lr"] == sgs["lr"]
  assert branched_alone["tuning"]["trials"] == sgs["tuning"]["trials"]


@pytest.mark.slow
def test_progress_bars_stay_off_a_redirected_stream(capsys):
  """tqdm writes only to a terminal: a log file has no carriage returns."""
  compare.main(["--tiny", "--methods", "sgd", "--out", ""])
  captured = capsys.readouterr()
  assert "\r" not in captured.err and "\r" not in captured.out
  assert "final test acc" in captured.out
  # The throughput line names the device once ("cpu: 812 images/s").
  measured = captured.out.splitlines()[1]
  assert measured.startswith(compare.device_name(jax.devices()[0]) + ": ")
  assert "images/s" in measured and "cpu:cpu" not in captured.out


@pytest.mark.slow
def test_tiny_run_on_mock_cifar10_with_augmentation(tfds):
  """The tfds path end to end (offline: mock_data, download=False)."""
  with tfds.testing.mock_data(num_examples=8):
    results = compare.main(["--tiny", "--dataset", "cifar10", "--methods",
                            "sgd", "--batch-size", "4", "--no-progress",
                            "--out", ""])
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


@pytest.mark.parametrize("name", ["small_vgg", "vgg11", "vgg16", "resnet18"])
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
  n_convs = {"small_vgg": 4, "vgg11": 8, "vgg16": 13, "resnet18": 17}[name]
  assert n_branched == n_convs  # every 3x3 conv, none of the 1x1 shortcuts.


def test_parse_args_defaults():
  args = compare.parse_args([])
  assert args.dataset == "digits" and args.model == "small_vgg"
  assert args.seeds == 3 and args.methods == _methods.DEFAULT_METHODS
  # The learned matrices after Adam are measured on request only.
  assert "adamw+sgs-learned" in compare.METHODS
  assert "adamw+sgs-learned" not in args.methods
  assert compare.parse_args(["--methods", "all"]).methods == list(
      compare.METHODS)
  assert args.epochs == compare.DEFAULT_EPOCHS["digits"]
  assert args.lr == pytest.approx(0.1 * args.batch_size / 128)
  assert args.tune is True and args.augment is False  # tuned on digits.
  assert compare.parse_args(["--no-tune"]).tune is False
  assert args.tune_tolerance == 0.15
  assert compare.parse_args(["--tune-tolerance", "0"]).tune_tolerance == 0
  with pytest.raises(SystemExit):
    compare.parse_args(["--tune-tolerance", "-0.1"])
  assert compare.parse_args(["--dataset", "mnist"]).tune is False
  assert args.out == "results/compare.json"
  assert args.plot == "results/compare.png"
  assert args.checkpoint_dir == "" and args.epoch_log == ""
  tiny = compare.parse_args(["--tiny", "--methods", "sgd, sgs-acb"])
  assert tiny.seeds == 1 and tiny.epochs == compare.TINY["epochs"]
  assert tiny.methods == ["sgd", "sgs-acb"] and tiny.tune is False
  assert compare.parse_args(["--tiny", "--tune"]).tune is True
  with pytest.raises(SystemExit):
    compare.parse_args(["--methods", "sgd,nope"])


def test_baselines_are_added_when_left_out():
  assert compare.parse_args(["--methods", "cdg"]).methods == ["sgd", "cdg"]
  assert compare.parse_args(["--methods", "adamw+sgs,sgs-acb"]).methods == [
      "sgd", "adamw", "adamw+sgs", "sgs-acb"]
  assert compare.parse_args(["--methods", "adamw"]).methods == ["adamw"]


def test_branched_params_from_plain_merge_back_exactly():
  rng = np.random.default_rng(0)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  plain = {"stem": {"kernel": normal(3, 3, 1, 4)},
           "bn": {"scale": normal(4), "bias": normal(4)},
           "block": {"conv": {"kernel": normal(5, 3, 4, 4)},
                     "shortcut": {"kernel": normal(1, 1, 4, 4)}},
           "head": {"kernel": normal(4, 10), "bias": normal(10)}}
  for preset, count in (("acb", 3), ("repvgg", 2)):
    branched = _models.branched_params_from_plain(plain, preset)
    assert set(branched["stem"]) == {f"kernel_{i}" for i in range(count)}
    assert set(branched["block"]["shortcut"]) == {"kernel"}  # 1x1 stays.
    merged = _models.merge_branched_params(branched)
    jax.tree.map(np.testing.assert_array_equal, merged, plain)


def test_cosine_lr_matches_optax_schedule():
  schedule = optax.cosine_decay_schedule(0.1, 10)
  for step in (0, 1, 5, 9, 10, 13):
    got = _train.cosine_lr(jnp.float32(0.1), jnp.int32(10), jnp.int32(step))
    assert float(got) == pytest.approx(float(schedule(step)), abs=1e-7)


def _reference_chain(name, lr, total, hyper):
  """The method built the usual optax way, at learning rate ``lr``."""
  cosine = optax.cosine_decay_schedule(lr, total)
  sgd = [optax.add_decayed_weights(hyper.weight_decay),
         optax.sgd(cosine, momentum=hyper.momentum)]
  adamw = optax.adamw(cosine, weight_decay=hyper.adamw_weight_decay)
  adamw_sgs = optax.chain(  # docs/placement.md's AdamW line.
      optax.scale_by_adam(), sgs_optax.sgs("acb"),
      optax.add_decayed_weights(hyper.adamw_weight_decay),
      optax.scale_by_learning_rate(cosine))
  return {"sgd": optax.chain(*sgd),
          "sgs-acb": optax.chain(sgs_optax.sgs("acb"), *sgd),
          "cdg": optax.chain(sgs_optax.cdg(), *sgd),
          "adamw": adamw,
          "adamw+sgs": adamw_sgs}[name]


@pytest.mark.parametrize("name", ["sgd", "sgs-acb", "cdg", "adamw",
                                  "adamw+sgs"])
def test_unit_lr_update_times_schedule_is_the_optax_update(name):
  """Why one compiled step serves every lr: updates are linear in it."""
  hyper = compare.Hyper()
  lr, total = 0.3, 5
  params = {"conv": {"kernel": jnp.linspace(-1, 1, 3 * 3 * 2 * 4).reshape(
      3, 3, 2, 4)}, "bias": jnp.arange(4.0)}
  reference = _reference_chain(name, lr, total, hyper)
  unit = compare.METHODS[name].build(hyper)
  ref_state, unit_state = reference.init(params), unit.init(params)
  for step in range(total + 1):
    grads = jax.tree.map(lambda p, s=step: jnp.cos(p * (s + 1)), params)
    want, ref_state = reference.update(grads, ref_state, params)
    got, unit_state = unit.update(grads, unit_state, params)
    scale = _train.cosine_lr(jnp.float32(lr), jnp.int32(total),
                             jnp.int32(step))
    jax.tree.map(lambda g, w, c=scale: np.testing.assert_allclose(
        c * g, w, rtol=2e-5, atol=1e-7), got, want)


def test_square_root_reading_scales_by_sqrt_and_keeps_the_matrix():
  matrix = np.array([[0.25, 1.0, 0.25], [1.0, 4.0, 1.0], [0.25, 1.0, 0.25]])
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)}}
  grads = jax.tree.map(lambda p: p * 3.0, params)
  tx = _methods.square_root_of(sgs_optax.sgs(matrix))
  state = tx.init(params)
  updates, new_state = tx.update(grads, state, params)
  np.testing.assert_allclose(  # sqrt by hand: 0.5, 1, 2.
      updates["conv"]["kernel"][:, :, 0, 0],
      3.0 * np.array([[0.5, 1, 0.5], [1, 2, 1], [0.5, 1, 0.5]]), rtol=1e-6)
  np.testing.assert_array_equal(updates["conv"]["bias"], grads["conv"]["bias"])
  # The state is sgs's own, matrix unrooted: refresh_scalings writes there.
  np.testing.assert_allclose(
      sgs_optax.get_scalings(new_state)["conv"]["kernel"], matrix)


def test_batches_are_gathered_augmented_and_normalised_on_device():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
  labels = np.arange(10, dtype=np.int32)
  split = _train.preload(images, labels)
  assert isinstance(split.images, jax.Array)
  assert split.images.dtype == jnp.uint8  # stored as is: 4x less than f32.
  norm = _train.normalization(images)
  index = np.array([7, 2, 2, 9])
  got, got_labels = jax.jit(_train.batch_inputs)(split, jnp.asarray(index),
                                                 norm)
  mean, std = images.reshape(-1, 3).mean(0), images.reshape(-1, 3).std(0)
  np.testing.assert_allclose(got, (images[index] - mean) / std, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(got_labels, index)
  key = jax.random.key(3)
  augmented, _ = jax.jit(_train.batch_inputs)(split, jnp.asarray(index),
                                              norm, key)
  raw = _train.random_crop_flip(key, jnp.asarray(images[index], jnp.float32))
  np.testing.assert_allclose(augmented, (np.asarray(raw) - mean) / std,
                             rtol=1e-5, atol=1e-5)


def test_train_step_takes_the_whole_split_and_an_index():
  """The step's inputs are the preloaded uint8 split and int32 indices."""
  args = compare.parse_args(["--tiny", "--methods", "sgd", "--augment", "on"])
  job = compare._setup(args)
  trainer = compare._trainer(compare.METHODS["sgd"], job)
  phase = job.phases["final"]
  state = jax.eval_shape(lambda: trainer.init(  # abstract: nothing compiles.
      trainer.init_variables(0, phase.train.images), lr=0.1, total_steps=9))
  lowered = trainer.train_step.lower(
      state, phase.train, jnp.arange(32), phase.norm, trainer.run_key(0),
      jnp.int32(0))
  text = lowered.as_text()
  assert f"tensor<{phase.num_train}x8x8x1xui8>" in text
  assert "tensor<32xi32>" in text


def _loop_cross_entropy(logits, labels):
  """The mean cross-entropy one example at a time, with the math module."""
  total = 0.0
  for row, label in zip(np.asarray(logits, np.float64).tolist(), labels):
    top = max(row)
    total += top + math.log(sum(math.exp(v - top) for v in row)) - row[label]
  return total / len(labels)


def test_mean_cross_entropy_by_hand():
  ln2 = math.log(2.0)
  # [ln 2, 0, 0]: log(2 + 1 + 1) - ln 2 = ln 2; two equal logits: ln 2; a
  # confident wrong answer costs its margin (and must not overflow).
  logits = np.array([[ln2, 0.0, 0.0], [0.0, 0.0, -np.inf], [1000.0, 0.0, 0.0]])
  got = _train.mean_cross_entropy(logits, np.array([0, 1, 1]))
  assert got == pytest.approx((ln2 + ln2 + 1000.0) / 3, rel=1e-12)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(37, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 37)
  assert _train.mean_cross_entropy(logits, labels) == pytest.approx(
      _loop_cross_entropy(logits, labels), rel=1e-12)


def test_evaluate_loss_is_the_whole_split_mean_whatever_the_chunks(
    monkeypatch):
  """23 examples in chunks of 500, then of 5 (4 full + one of 3)."""
  model = _models.make_model("small_vgg", 10, tiny=True)
  trainer = _train.Trainer(model, optax.identity(), prng_impl="rbg")
  rng = np.random.default_rng(1)
  images = rng.integers(0, 17, (23, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 23).astype(np.int32)
  split = _train.preload(images, labels)
  norm = _train.normalization(images)
  phase = _train.Phase(split, np.arange(23), norm,
                       {"val": (split, np.arange(23))})
  state = trainer.init(trainer.init_variables(0, images), lr=0.1,
                       total_steps=1)
  whole = trainer.evaluate(state, phase)["val"]
  monkeypatch.setattr(_train, "EVAL_CHUNK", 5)
  chunked = trainer.evaluate(state, phase)["val"]
  # The reference: the model applied to all 23 at once, scored by the loop.
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = model.apply(variables, (images.astype(np.float32) - norm.mean)
                       / norm.std, train=False)
  want = _loop_cross_entropy(logits, labels)
  for scores in (whole, chunked):
    assert scores["loss"] == pytest.approx(want, rel=1e-5)
    assert scores["accuracy"] == np.mean(np.argmax(logits, -1) == labels)


def test_device_name_says_cpu_once():
  cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
  gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
  assert compare.device_name(cpu) == "cpu"
  assert compare.device_name(gpu) == "gpu: NVIDIA H200"
  assert "cpu:cpu" not in compare.device_name(jax.devices()[0])


def test_branched_networks_share_their_exact_equivalents_search():
  methods = compare.METHODS
  assert methods["acb-branched"].tuned_as == "sgs-acb"
  assert methods["repvgg-branched"].tuned_as == "sgs-repvgg"
  for method in methods.values():
    source = _methods.tuning_source(method)
    assert source.family == method.family
    assert (source is method) == (method.tuned_as is None)
  for bad in ("nope", "adamw", "acb-branched"):  # unknown, family, chained.
    with pytest.raises(ValueError, match="tuned_as"):
      _methods.tuning_source(compare.Method("x", compare.sgd_chain,
                                            tuned_as=bad))


def test_projected_steps_count_a_shared_search_once():
  args = compare.parse_args(["--tiny", "--tune", "--methods",
                             "sgs-acb,acb-branched"])
  job = compare._setup(args)
  methods = [compare.METHODS[m] for m in args.methods]
  steps, words = compare._projected_steps(methods, job)
  # By hand: 192 train images, 20% (39) held out, batch 32: 6 steps per
  # final epoch, 4 per tuning epoch; 2 epochs; sgd, sgs-acb, acb-branched
  # train 1 final seed each; 2 searches (sgd, sgs-acb) of 5 runs.
  assert steps == 2 * (3 * 1 * 6 + 2 * 5 * 4)
  assert "2 searches" in words
