"""Benchmark scripts run in their tiny mode, so that none can rot."""

import math

from benchmarks import cdg_overhead


def test_cdg_overhead_tiny():
  results = cdg_overhead.main(["--tiny"])
  assert results and all(math.isfinite(v) and v > 0 for v in results.values())
