"""Tests of benchmarks/_stats.py against hand computations.

The t quantiles are typed in from a printed table of Student's t
distribution (two-sided 95%: df 1 12.706, df 2 4.303, df 4 2.776), not taken
from scipy, so the interval code is checked against an independent source.
"""

import math

import pytest

from benchmarks import _stats

T_TABLE_95 = {1: 12.706, 2: 4.303, 4: 2.776}


def test_t_interval_by_hand_three_values():
  # mean 7/3; deviations -4/3, -1/3, 5/3: s^2 = (16 + 1 + 25) / 9 / 2 = 7/3.
  lo, hi = _stats.t_interval([1.0, 2.0, 4.0])
  half = T_TABLE_95[2] * math.sqrt(7 / 3) / math.sqrt(3)
  assert lo == pytest.approx(7 / 3 - half, abs=2e-3)
  assert hi == pytest.approx(7 / 3 + half, abs=2e-3)
  assert (lo + hi) / 2 == pytest.approx(7 / 3, rel=1e-12)


def test_t_interval_by_hand_five_values():
  values = [0.5, -0.25, 1.0, 0.75, 0.0]
  # mean 0.4; squared deviations 0.01, 0.4225, 0.36, 0.1225, 0.16 -> 1.075.
  s = math.sqrt(1.075 / 4)
  lo, hi = _stats.t_interval(values)
  half = T_TABLE_95[4] * s / math.sqrt(5)
  assert lo == pytest.approx(0.4 - half, abs=1e-3)
  assert hi == pytest.approx(0.4 + half, abs=1e-3)


def test_t_interval_two_values_uses_one_degree_of_freedom():
  lo, hi = _stats.t_interval([0.0, 2.0])  # mean 1, s = sqrt(2).
  half = T_TABLE_95[1] * math.sqrt(2) / math.sqrt(2)
  assert (lo, hi) == pytest.approx((1 - half, 1 + half), abs=2e-3)


def test_t_interval_needs_two_values():
  assert _stats.t_interval([0.3]) is None
  assert _stats.t_interval([]) is None


def test_paired_difference_in_percentage_points():
  diff = _stats.paired_difference([0.90, 0.80, 0.75], [0.85, 0.80, 0.70],
                                  "sgd")
  assert diff.baseline == "sgd"
  assert diff.differences == pytest.approx((5.0, 0.0, 5.0))
  assert diff.mean == pytest.approx(10 / 3)
  # s^2 = (25/9 + 100/9 + 25/9) / 2 = 25/3.
  half = T_TABLE_95[2] * math.sqrt(25 / 3) / math.sqrt(3)
  assert diff.ci95 == pytest.approx((10 / 3 - half, 10 / 3 + half), abs=1e-2)
  assert diff.verdict() == "inconclusive"


def test_identical_runs_differ_by_exactly_zero():
  diff = _stats.paired_difference([0.9, 0.8], [0.9, 0.8], "sgd")
  assert diff.mean == 0.0 and diff.ci95 == (0.0, 0.0)
  assert diff.verdict() == "inconclusive"


def test_one_seed_has_no_interval():
  diff = _stats.paired_difference([0.9], [0.8], "adamw")
  assert diff.mean == pytest.approx(10.0)
  assert diff.ci95 is None
  assert diff.verdict() == "n/a (1 seed)"
  record = diff.to_json()
  assert record["ci95"] is None and record["baseline"] == "adamw"


@pytest.mark.parametrize("method, verdict", [
    ([0.91, 0.81, 0.78], "better"),  # +1 pp every seed: interval ~(1, 1).
    ([0.89, 0.79, 0.76], "worse"),
    ([0.95, 0.75, 0.80], "inconclusive"),
])
def test_verdict_only_when_the_interval_excludes_zero(method, verdict):
  diff = _stats.paired_difference(method, [0.90, 0.80, 0.77], "sgd")
  assert diff.verdict() == verdict


def test_paired_difference_needs_the_same_seeds():
  with pytest.raises(ValueError, match="same seeds"):
    _stats.paired_difference([0.9, 0.8], [0.9], "sgd")


def test_lr_grid_is_log_spaced_around_the_default():
  assert _stats.lr_grid(0.05, 5, 2.0) == pytest.approx(
      [0.0125, 0.025, 0.05, 0.1, 0.2])
  assert _stats.lr_grid(1e-3, 3, 10.0) == pytest.approx([1e-4, 1e-3, 1e-2])


def test_pick_lr_exact_rule_lowest_loss_then_nearest_default_then_smaller():
  grid = [0.0125, 0.025, 0.05, 0.1, 0.2]
  exact = {"tolerance": 0.0}
  # Lower is better: 0.1 has the lowest loss (0.05 the highest).
  assert _stats.pick_lr(grid, [0.30, 0.20, 0.40, 0.07, 0.09], 0.05,
                        **exact) == 0.1
  # A tie between 0.025 and 0.2: 0.025 is nearer 0.05 (log distance 1
  # doubling against 2).
  assert _stats.pick_lr(grid, [0.30, 0.05, 0.20, 0.10, 0.05], 0.05,
                        **exact) == 0.025
  # A tie at equal log distance (0.025 and 0.1): the smaller.
  assert _stats.pick_lr(grid, [0.30, 0.05, 0.20, 0.05, 0.10], 0.05,
                        **exact) == 0.025
  # The default wins every tie it is in.
  assert _stats.pick_lr(grid, [0.05] * 5, 0.05, **exact) == 0.05
  # Without a tolerance the smallest difference decides.
  assert _stats.pick_lr([0.05, 0.15], [0.0410, 0.0409], 0.05, **exact) == 0.15


def test_pick_lr_ties_losses_within_15_percent_of_the_lowest():
  grid = [0.0125, 0.025, 0.05, 0.1, 0.2]
  # Lowest 0.100 at 0.2; 0.1 is 14% above it (tied), 0.05 is 16% (not): of
  # 0.1 and 0.2, 0.1 is nearer the default 0.05.
  assert _stats.pick_lr(grid, [0.30, 0.20, 0.116, 0.114, 0.100], 0.05) == 0.1
  # 0.05 now 14% above the lowest: the default is tied, so it wins.
  assert _stats.pick_lr(grid, [0.30, 0.20, 0.114, 0.116, 0.100], 0.05) == 0.05
  # Nothing within 15%: the lowest wins, far from the default as it is.
  assert _stats.pick_lr(grid, [0.30, 0.20, 0.17, 0.16, 0.100], 0.05) == 0.2
  # Tied at equal log distance on both sides of the default: the smaller.
  assert _stats.pick_lr(grid, [0.30, 0.101, 0.20, 0.100, 0.30], 0.05) == 0.025
  # Lower is better, whatever the tolerance: the highest loss never wins.
  assert _stats.pick_lr(grid, [0.10, 0.30, 0.90, 0.30, 0.30], 0.05) == 0.0125


def test_pick_lr_reads_losses_by_position_not_by_order():
  # The grid need not be sorted: each loss belongs to the rate beside it.
  assert _stats.pick_lr([0.2, 0.0125, 0.05], [0.20, 0.10, 0.30], 0.05) == (
      0.0125)
  assert _stats.pick_lr([0.2, 0.0125, 0.05], [0.10, 0.20, 0.13], 0.05) == 0.2
  assert _stats.pick_lr([0.2, 0.0125, 0.05], [0.10, 0.20, 0.114], 0.05) == (
      0.05)


def test_pick_lr_a_diverged_trial_loses_to_any_number():
  grid = [0.05, 0.15, 0.45]
  nan = float("nan")
  assert _stats.pick_lr(grid, [2.5, 3.0, nan], 0.15) == 0.05
  assert _stats.pick_lr(grid, [nan, 9.0, nan], 0.05) == 0.15
  for losses in ([nan] * 3, [nan, math.inf, nan]):
    with pytest.raises(ValueError, match="diverged"):
      _stats.pick_lr(grid, losses, 0.15)


def test_pick_lr_refuses_what_it_cannot_read():
  with pytest.raises(ValueError, match="one loss per learning rate"):
    _stats.pick_lr([0.05, 0.15], [0.1], 0.05)
  with pytest.raises(ValueError, match="one loss per learning rate"):
    _stats.pick_lr([], [], 0.05)
  with pytest.raises(ValueError, match="tolerance"):
    _stats.pick_lr([0.05], [0.1], 0.05, tolerance=-0.1)


def test_pick_rule_says_what_pick_lr_does():
  rule = _stats.PICK_RULE
  assert _stats.TIE_TOLERANCE == 0.15 and rule == _stats.pick_rule(0.15)
  assert "lowest" in rule and "validation loss" in rule
  assert "within 15% of the lowest" in rule
  assert "nearest the default" in rule and "smaller" in rule
  assert "within 2.5% of" in _stats.pick_rule(0.025)
  assert "only equal losses tie" in _stats.pick_rule(0.0)
