"""Benchmark scripts run in their tiny mode, so that none can rot."""

import math

import pytest

from benchmarks import cdg_overhead
from benchmarks import placement


def test_cdg_overhead_tiny():
  results = cdg_overhead.main(["--tiny"])
  assert results and all(math.isfinite(v) and v > 0 for v in results.values())


@pytest.mark.slow  # compiles a dozen chains.
def test_placement_tiny_exact_rows_are_exact_and_others_are_not():
  record = placement.main(["--tiny", "--families", "adamw,muon", "--out", ""])
  for family, by_scales in record["results"].items():
    exact = placement.FAMILIES[family].exact
    for rows in by_scales.values():
      for name, dev in rows.items():
        assert all(math.isfinite(v) for v in dev.values()), (family, name)
        if name == exact:
          assert dev["rel_move"] < 1e-9, (family, name, dev)
        else:  # a misplacement (or no SGS) is off after 3 steps already.
          assert dev["rel_move"] > 1e-3, (family, name, dev)
