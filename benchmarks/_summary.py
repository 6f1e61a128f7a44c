"""The comparison's table and figure, read off the paired intervals."""

from __future__ import annotations

from collections.abc import Sequence
import os
from typing import Any

import numpy as np


def _difference_cell(record: dict[str, Any]) -> tuple[str, str]:
  """``"+0.21 [-0.40, +0.83]"`` and the verdict, or the baseline's marks."""
  diff = record.get("paired_difference")
  if diff is None:
    return "(baseline)", ""
  interval = ("" if diff["ci95"] is None else
              " [{:+.2f}, {:+.2f}]".format(*diff["ci95"]))
  return f"{diff['mean']:+.2f}{interval} vs {diff['baseline']}", \
      diff["verdict"]


def _notes(r: dict[str, Any]) -> str:
  notes = []
  tuning = r.get("tuning")
  if tuning:
    grid = tuning["grid"]
    if r["lr"] in (grid[0], grid[-1]):
      notes.append("lr at grid edge")
    if r.get("tuned_as"):
      notes.append(f"lr of {r['tuned_as']} (exact equivalent)")
  if r["learned_refresh"]:
    notes.append(f"{r['refresh_count']} refreshes/run")
  if "merge_ok" in r:
    notes.append("merged == branched" if r["merge_ok"] else
                 "MERGED != BRANCHED")
  if r["learned_refresh"] and r["refresh_compilations"] > 1:
    notes.append(f"refresh compiled {r['refresh_compilations']}x")
  if r["train_step_compilations"] != 1:
    notes.append(f"train step compiled {r['train_step_compilations']}x")
  return ", ".join(notes)


def format_table(records: Sequence[dict[str, Any]], seeds: int,
                 tuned: bool) -> str:
  """The comparison table: accuracy, paired difference and verdict."""
  width = max([16] + [len(r["method"]) for r in records])
  header = (f"{'method':<{width}} {'lr':>8} {'test acc (%)':>14} "
            f"{'paired diff (pp) [95% CI]':>34} {'verdict':<13} "
            f"{'s/epoch':>7} {'compile s':>9}  notes")
  lines = [header, "-" * len(header)]
  for r in records:
    acc = (f"{100 * r['final_test_accuracy_mean']:6.2f} ± "
           f"{100 * r['final_test_accuracy_std']:4.2f}")
    diff, verdict = _difference_cell(r)
    lines.append(
        f"{r['method']:<{width}} {r['lr']:>8.3g} {acc:>14} {diff:>34} "
        f"{verdict:<13} {r['epoch_time_s_median']:7.3f} "
        f"{r['train_step_compile_s'] + r['refresh_compile_s']:9.1f}  "
        + _notes(r))
  how = ("lr tuned per method on the validation split" if tuned else
         "lr = the family's default (not tuned)")
  lines.append(
      f"(final-epoch test accuracy, mean ± sample std over {seeds} seed(s); "
      "paired diff = mean over seeds of method minus baseline with the same "
      "seed, 95% Student t interval; better/worse only where the interval "
      f"excludes 0; {how}; s/epoch = median train-step time per epoch)")
  return "\n".join(lines)


def verdict_summary(records: Sequence[dict[str, Any]]) -> str:
  """One sentence: which methods the intervals separate from baseline."""
  decided = {"better": [], "worse": []}
  undecided = []
  for r in records:
    diff = r.get("paired_difference")
    if diff is None:
      continue
    decided.get(diff["verdict"], undecided).append(r["method"])
  parts = [f"{k}: {', '.join(v)}" for k, v in decided.items() if v]
  if undecided:
    parts.append(f"not separated from their baseline: {', '.join(undecided)}")
  return "Verdict (95% paired intervals): " + ("; ".join(parts) or "none")


def curve_window(epochs: int) -> int:
  """The first epoch (0-based) of the accuracy panel: the second half.

  The first epochs climb from chance (about 10-20% on digits) while the
  methods differ by tenths of a point at the end; an axis fitted to every
  epoch would squeeze the end into its top sliver.
  """
  return epochs // 2


def fitted_limits(values: np.ndarray, floor: float = 0.5
                  ) -> tuple[float, float]:
  """Axis limits around ``values`` with 5% margins, at least ``floor`` wide.

  Clipped to [0, 100] (percentages) where the margin would cross them.
  """
  lo, hi = float(np.min(values)), float(np.max(values))
  pad = max(0.05 * (hi - lo), (floor - (hi - lo)) / 2, 0.0)
  return max(0.0, lo - pad), min(100.0, hi + pad)


def figure(records: Sequence[dict[str, Any]], title: str):
  """The figure: late-epoch test-accuracy curves, and paired differences.

  Args:
    records: the methods' records (``benchmarks.compare.run_method``).
    title: the figure's title.

  Returns:
    The matplotlib figure (the accuracy axes first).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_curve, ax_diff) = plt.subplots(
      1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
  cmap = plt.get_cmap("tab10")
  epochs = len(records[0]["runs"][0]["test_accuracy"])
  first = curve_window(epochs)
  shown = []
  for i, r in enumerate(records):
    curve = 100 * np.mean([run["test_accuracy"][first:]
                           for run in r["runs"]], 0)
    ax_curve.plot(np.arange(first + 1, epochs + 1), curve, marker=".",
                  color=cmap(i % 10), label=r["method"])
    shown.append(curve)
  ax_curve.set_ylim(*fitted_limits(np.concatenate(shown)))
  ax_curve.set_xlabel("epoch")
  ax_curve.set_ylabel("test accuracy (%)")
  ax_curve.set_title(f"test accuracy, epochs {first + 1}-{epochs} (mean "
                     "over seeds)")
  ax_curve.grid(alpha=0.3)
  ax_curve.legend(fontsize=8)
  _plot_differences(ax_diff, records, cmap)
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot(records: Sequence[dict[str, Any]], path: str, title: str) -> None:
  """Writes :func:`figure` to ``path`` (PNG), creating its folder."""
  fig = figure(records, title)  # Selects the Agg backend first.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_differences(ax, records, cmap) -> None:
  """Mean paired difference per method with its 95% interval, zero line."""
  rows = [(i, r) for i, r in enumerate(records) if r.get("paired_difference")]
  for y, (i, r) in enumerate(rows):
    diff = r["paired_difference"]
    ax.plot(diff["per_seed"], [y + 0.2] * len(diff["per_seed"]), "x",
            color=cmap(i % 10), alpha=0.6, markersize=5)
    if diff["ci95"] is None:
      ax.plot(diff["mean"], y, "o", color=cmap(i % 10))
    else:
      lo, hi = diff["ci95"]
      ax.errorbar(diff["mean"], y, xerr=[[diff["mean"] - lo],
                                         [hi - diff["mean"]]],
                  fmt="o", color=cmap(i % 10), capsize=4)
  ax.axvline(0.0, color="black", linewidth=1)
  ax.set_yticks(range(len(rows)),
                [f"{r['method']} vs {r['paired_difference']['baseline']}"
                 for _, r in rows], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("paired difference in test accuracy (percentage points)")
  ax.set_title("method - baseline: mean, 95% t-interval (x: seeds)")
  ax.grid(axis="x", alpha=0.3)
