"""The documentation builds with no warning (Sphinx -W), so it cannot rot."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
       "html", "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"),
       str(tmp_path / "html")],
      capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  api = (tmp_path / "html" / "_autosummary" / "sgs_optax.sgs.html").read_text()
  assert "Returns" in api and "kernel_layout" in api
  assert "Results" in (tmp_path / "html" / "results.html").read_text()
