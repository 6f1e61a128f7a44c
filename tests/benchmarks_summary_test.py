"""Tests of benchmarks/_summary.py: the table's notes and the figure's axes.

The records are made by hand: accuracy curves that climb from about 18% (the
first epoch on digits) to 97-99%, as the main job's do.
"""

import numpy as np
import pytest

from benchmarks import _summary

# Two methods, 3 seeds, 6 epochs (fractions): a steep start, a flat end.
CURVES = {
    "sgd": [[0.18, 0.60, 0.90, 0.960, 0.970, 0.975],
            [0.20, 0.65, 0.92, 0.965, 0.972, 0.980],
            [0.17, 0.55, 0.88, 0.955, 0.968, 0.970]],
    "sgs-acb": [[0.19, 0.70, 0.93, 0.970, 0.985, 0.990],
                [0.21, 0.72, 0.94, 0.975, 0.980, 0.985],
                [0.18, 0.66, 0.91, 0.965, 0.982, 0.988]],
}


def _records():
  sgd = {"method": "sgd", "runs": [{"test_accuracy": c}
                                   for c in CURVES["sgd"]]}
  sgs = {"method": "sgs-acb",
         "runs": [{"test_accuracy": c} for c in CURVES["sgs-acb"]],
         "paired_difference": {"baseline": "sgd", "mean": 1.27,
                               "ci95": [0.2, 2.3],
                               "per_seed": [1.5, 0.5, 1.8]}}
  return [sgd, sgs]


def test_accuracy_axis_fits_the_plotted_curves():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = _summary.figure(_records(), "hand-made")
  try:
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    plotted = [line for line in ax.get_lines() if line.get_label() in CURVES]
    assert [line.get_label() for line in plotted] == ["sgd", "sgs-acb"]
    for line in plotted:
      # The second half of 6 epochs: epochs 4, 5, 6, the means over seeds.
      np.testing.assert_array_equal(line.get_xdata(), [4, 5, 6])
      mean = 100 * np.mean(CURVES[line.get_label()], 0)[3:]
      np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-12)
      assert lo <= min(line.get_ydata()) and max(line.get_ydata()) <= hi
    # Not the 0-100 range nor the ~18-100 one that squeezed the end into a
    # sliver: here about 96-99, a few points wide.
    assert lo > 90 and hi - lo < 5
  finally:
    plt.close(fig)


@pytest.mark.parametrize("values, limits", [
    ([97.0, 98.0], (96.95, 98.05)),  # 5% margins on a 1-point range.
    ([90.0, 100.0], (89.5, 100.0)),  # clipped at 100.
    ([99.9, 100.0], (99.7, 100.0)),  # at least 0.5 wide, clipped at 100.
    ([98.0, 98.0], (97.75, 98.25)),  # one value: 0.5 wide around it.
])
def test_fitted_limits_by_hand(values, limits):
  assert _summary.fitted_limits(np.array(values)) == pytest.approx(limits)


def test_curve_window_is_the_second_half():
  assert [_summary.curve_window(e) for e in (1, 2, 6, 15)] == [0, 1, 3, 7]


def test_table_notes_a_shared_learning_rate():
  record = {"method": "acb-branched", "lr": 0.15,
            "tuning": {"grid": [0.05, 0.15, 0.45]}, "tuned_as": "sgs-acb",
            "learned_refresh": False, "refresh_compilations": 0,
            "train_step_compilations": 1}
  notes = _summary._notes  # pylint: disable=protected-access
  assert "lr of sgs-acb (exact equivalent)" in notes(record)
  record["tuned_as"] = None
  assert "lr of" not in notes(record)
