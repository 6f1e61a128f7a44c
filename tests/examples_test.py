"""Every example runs in its tiny mode."""

from examples import quickstart


def test_quickstart_tiny():
  results = quickstart.main(["--tiny"])
  assert set(results) == {"sgd", "sgd+sgs(acb)"}
  assert all(0.0 <= acc <= 1.0 for acc in results.values())
