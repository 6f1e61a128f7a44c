"""Paired differences with t-intervals, and the learning-rate choice.

Every method is run with the same seeds as its baseline, and a seed fixes the
initial weights, the batch order and the augmentation for every method
(``benchmarks._train``). So the per-seed difference of final test accuracy,
method minus baseline, removes the seed-to-seed noise that both share, and
its mean gets a Student t confidence interval over the seeds (the paired
t-interval). A method is called better or worse only where the 95% interval
excludes 0; with 3 seeds the t quantile is 4.30, so only differences that
are consistent across seeds separate.

Tuning (Schmidt et al. 2021, "Descending through a crowded valley"; the
AlgoPerf external-tuning ruleset) gives every method the same number of
trials on a log-spaced learning-rate grid around its default, scored on a
validation split. :func:`pick_lr` scores each rate by its final-epoch
validation loss (mean cross-entropy, averaged over the tuning seeds); rates
within :data:`TIE_TOLERANCE` of the lowest loss count as tied, and the tie
goes to the rate nearest the default (:data:`PICK_RULE`).

Why the loss: on a validation split of a few hundred images near 99%
accuracy, accuracies are counts of a handful of errors, so neighbouring
rates tie or differ by one image, and a run on another CPU (other float
rounding, so another trajectory) flips such a choice. Why a tolerance: the
loss is continuous but not free of that noise either; two exactly
equivalent runs (``sgs-acb`` and ``acb-branched``), which differ only by
rounding, ended about 10% apart in validation loss at the largest rates of
the digits grid. A rate must beat the one nearer the default by more than
that to be chosen, like the one-standard-error rule of model selection.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any, NamedTuple

import numpy as np
from scipy import stats


class PairedDifference(NamedTuple):
  """Method minus baseline, per seed and summarised (percentage points).

  Attributes:
    baseline: the baseline method's name.
    differences: per-seed differences.
    mean: their mean.
    ci95: the 95% t-interval ``(lo, hi)`` of the mean; None with one seed.
  """

  baseline: str
  differences: tuple[float, ...]
  mean: float
  ci95: tuple[float, float] | None

  def verdict(self) -> str:
    """"better"/"worse" when the interval excludes 0, else undecided."""
    if self.ci95 is None:
      return "n/a (1 seed)"
    lo, hi = self.ci95
    if lo > 0:
      return "better"
    if hi < 0:
      return "worse"
    return "inconclusive"

  def to_json(self) -> dict[str, Any]:
    return {"baseline": self.baseline, "mean": self.mean,
            "ci95": None if self.ci95 is None else list(self.ci95),
            "per_seed": list(self.differences), "interval": "student-t",
            "verdict": self.verdict()}


def t_interval(values: Sequence[float], confidence: float = 0.95
               ) -> tuple[float, float] | None:
  """Two-sided Student t confidence interval of the mean of ``values``.

  ``mean +- t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)`` with the sample
  standard deviation ``s`` (``ddof=1``); the quantile is
  ``scipy.stats.t.ppf``.

  Args:
    values: the sample (at least 2 values for an interval).
    confidence: the interval's coverage.

  Returns:
    ``(lo, hi)``, or None for fewer than 2 values.
  """
  values = np.asarray(values, np.float64)
  n = len(values)
  if n < 2:
    return None
  mean = float(values.mean())
  half = float(stats.t.ppf((1 + confidence) / 2, n - 1)
               * values.std(ddof=1) / math.sqrt(n))
  return mean - half, mean + half


def paired_difference(method: Sequence[float], baseline: Sequence[float],
                      baseline_name: str) -> PairedDifference:
  """Per-seed ``100 * (method - baseline)`` and its t-interval.

  Args:
    method: the method's accuracies (fractions), one per seed.
    baseline: the baseline's accuracies for the same seeds, same order.
    baseline_name: the baseline's name.

  Returns:
    The :class:`PairedDifference` in percentage points.

  Raises:
    ValueError: if the two have different numbers of seeds.
  """
  if len(method) != len(baseline):
    raise ValueError(f"Paired runs need the same seeds: {len(method)} vs "
                     f"{len(baseline)}.")
  diffs = 100.0 * (np.asarray(method, np.float64)
                   - np.asarray(baseline, np.float64))
  return PairedDifference(baseline_name, tuple(float(d) for d in diffs),
                          float(diffs.mean()), t_interval(diffs))


def lr_grid(default: float, points: int, factor: float) -> list[float]:
  """``points`` log-spaced values ``default * factor**k`` centred on it.

  Args:
    default: the centre.
    points: number of values (odd puts the default in the grid).
    factor: ratio of neighbours (> 1).

  Returns:
    The grid, ascending.
  """
  offsets = np.arange(points) - (points - 1) / 2
  return [float(default * factor**k) for k in offsets]


# Losses within this factor of the lowest count as tied (15%: above the
# spread that rounding alone produced between exactly equivalent runs).
TIE_TOLERANCE = 0.15

def pick_rule(tolerance: float = TIE_TOLERANCE) -> str:
  """:func:`pick_lr`'s rule in words, for the results' JSON."""
  tie = (f"losses within {100 * tolerance:g}% of the lowest count as tied"
         if tolerance else "only equal losses tie")
  return ("lowest final-epoch validation loss (mean cross-entropy, mean over "
          f"tuning seeds); {tie}; ties go to the rate nearest the default in "
          "log scale, then to the smaller")


PICK_RULE = pick_rule()


def pick_lr(grid: Sequence[float], losses: Sequence[float], default: float,
            tolerance: float = TIE_TOLERANCE) -> float:
  """The rate nearest ``default`` among those with (nearly) the lowest loss.

  The tied rates are those whose loss is at most ``(1 + tolerance)`` times
  the lowest; among them the nearest to ``default`` in log distance wins,
  and a tie in distance too goes to the smaller rate. A NaN loss (a
  diverged trial) counts as worse than any finite loss. The default rule is
  :data:`PICK_RULE`.

  Args:
    grid: learning rates.
    losses: final-epoch validation loss of each (mean over tuning seeds).
    default: the default learning rate.
    tolerance: relative width of a tie; 0 ties equal losses only.

  Returns:
    The chosen learning rate.

  Raises:
    ValueError: if ``grid`` and ``losses`` differ in length or are empty, if
      no loss is finite (every trial diverged), or if ``tolerance`` is
      negative.
  """
  if len(grid) != len(losses) or not grid:
    raise ValueError(f"pick_lr needs one loss per learning rate: "
                     f"{len(grid)} rates, {len(losses)} losses.")
  if tolerance < 0:
    raise ValueError(f"pick_lr needs tolerance >= 0, got {tolerance}.")
  scored = [math.inf if math.isnan(v) else v for v in losses]
  if not math.isfinite(min(scored)):
    raise ValueError(f"Every tuning trial diverged (loss {list(losses)}) at "
                     f"{list(grid)}.")
  bound = min(scored) * (1 + tolerance)
  tied = [lr for lr, v in zip(grid, scored) if v <= bound]
  return min(tied, key=lambda lr: (abs(math.log(lr / default)), lr))
