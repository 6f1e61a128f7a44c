"""Tests of benchmarks/overhead.py (--tiny, in-process). No timing asserts."""

import json
import math

import pytest

from benchmarks import overhead


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("overhead") / "overhead.json"
  results = overhead.main(["--tiny", "--out", str(out)])
  return results, out


@pytest.mark.slow
def test_tiny_run_writes_finite_positive_times_and_memory(tiny_run):
  results, out = tiny_run
  written = json.loads(out.read_text())
  assert written["settings"]["tiny"] is True
  assert written["table"] == results["table"]
  assert [m["model"] for m in written["models"]] == list(overhead.MODELS)
  for model in written["models"]:
    names = [r["method"] for r in model["methods"]]
    expected = [m.name for m in overhead.METHODS
                if not m.learned or model["model"] == "vgg11"]
    assert names == expected, model["model"]
    for r in model["methods"]:
      where = (model["model"], r["method"])
      assert len(r["step_s"]) == written["settings"]["rounds"], where
      assert all(_positive(t) for t in r["step_s"]), where
      assert _positive(r["step_s_median"]), where
      assert _positive(r["time_ratio"]), where
      assert _positive(r["compile_s"]), where
      for key in ("argument", "output", "total"):
        assert _positive(r["memory"][key]), (where, key)
      assert _positive(r["memory_ratio"]), where
      assert r["train_step_compilations"] == 1, where
      if r["conv"] == "plain":
        assert all(_positive(t) for t in r["update_s"]), where
      if r["method"] == "sgs-learned":
        assert all(_positive(t) for t in r["refresh_s"]), where
        assert _positive(r["refresh_compile_s"]), where
        assert r["refresh_compilations"] == 1, where
    sgd = model["methods"][0]
    assert sgd["method"] == "sgd" and sgd["time_ratio"] == 1.0


@pytest.mark.slow
def test_tiny_run_projection_and_real_run(tiny_run):
  _, out = tiny_run
  written = json.loads(out.read_text())
  projection = written["projection"]
  assert projection["model"] == "vgg11"
  assert projection["refreshes"] == 40
  assert projection["steps"] == 200 * math.ceil(
      50000 / written["settings"]["batch_size"])
  for key in ("sgd_step_s", "learned_step_s", "refresh_s",
              "refresh_compile_s", "ratio", "ratio_refresh_only"):
    assert _positive(projection[key]), key
  real = written["real_run"]
  for name in ("sgd", "sgs-learned"):
    run = real["methods"][name]
    assert len(run["epoch_s"]) == written["settings"]["real_epochs"]
    assert all(_positive(t) for t in run["epoch_s"])
    assert _positive(run["total_s"])
    assert run["train_step_compilations"] == 1
  learned = real["methods"]["sgs-learned"]
  assert len(learned["refresh_s"]) == written["settings"]["real_epochs"]
  assert all(_positive(t) for t in learned["refresh_s"])
  assert learned["refresh_compilations"] == 1
  assert _positive(real["total_ratio"])


def test_parse_args():
  args = overhead.parse_args([])
  assert args.models == ["vgg11", "resnet18"] and args.batch_size == 32
  assert args.width is None and args.projection_model == "vgg11"
  tiny = overhead.parse_args(["--tiny", "--models", "resnet18"])
  assert tiny.rounds == overhead.TINY["rounds"] and tiny.width == 4
  assert tiny.projection_model == "resnet18"
  with pytest.raises(SystemExit):
    overhead.parse_args(["--models", "vgg11,nope"])
