"""The warning policy: our code's warnings fail a test, dependencies' are shown.

The policy (pyproject `filterwarnings` plus the conftest hook) runs in a
separate pytest session on a stand-in dependency, `fakedep`, and a module
named like one of ours, `sgs_optax._warning_probe`; the outcome of each of its
tests says which warnings are errors.
"""

import pathlib
import shutil
import textwrap
import tomllib

TESTS = pathlib.Path(__file__).resolve().parent
FILTERS = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())[
    "tool"]["pytest"]["ini_options"]["filterwarnings"]

FAKEDEP = '''
import warnings

def old_api():
  warnings.warn("old_api is deprecated", DeprecationWarning, stacklevel=2)

def uses_old_api():  # The dependency's own use: attributed to fakedep.
  return old_api()

def call(fn):  # Like optax.chain calling a transform's update.
  return fn()
'''

PROBE = '''
import types

SOURCE = """
import warnings
import fakedep

def calls_old_api():
  return fakedep.old_api()

def deprecates_itself():
  warnings.warn("ours is deprecated", DeprecationWarning, stacklevel=2)
"""
module = types.ModuleType("sgs_optax._warning_probe")
exec(compile(SOURCE, "sgs_optax/_warning_probe.py", "exec"), module.__dict__)
'''

POLICY_TEST = '''
import pytest

import fakedep
from probe import module as ours

def test_ours_calls_a_deprecated_api():
  ours.calls_old_api()

def test_ours_deprecates_through_a_dependency_frame():
  fakedep.call(ours.deprecates_itself)

def test_test_code_calls_a_deprecated_api():
  fakedep.old_api()

def test_dependency_uses_its_own_deprecated_api():
  fakedep.uses_old_api()

def test_pytest_warns_still_records_ours_where_stacklevel_points():
  with pytest.warns(DeprecationWarning, match="ours is deprecated") as record:
    fakedep.call(ours.deprecates_itself)
  assert record[0].filename == fakedep.__file__
'''


def test_own_warnings_fail_and_dependency_deprecations_are_reported(
    pytester, monkeypatch):
  monkeypatch.setenv("COLUMNS", "300")  # Whole lines in the short summary.
  assert not any("'" in f for f in FILTERS)
  pytester.makepyprojecttoml(textwrap.dedent(f"""
      [tool.pytest.ini_options]
      python_files = ["*_test.py"]
      filterwarnings = [{", ".join(f"'{f}'" for f in FILTERS)}]
  """))
  shutil.copy(TESTS / "conftest.py", pytester.path / "conftest.py")
  pytester.makepyfile(fakedep=FAKEDEP, probe=PROBE, policy_test=POLICY_TEST)
  result = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider")
  result.stdout.fnmatch_lines_random([
      "FAILED policy_test.py::test_ours_calls_a_deprecated_api"
      " - DeprecationWarning: old_api is deprecated",
      "FAILED policy_test.py::test_ours_deprecates_through_a_dependency_frame"
      " - DeprecationWarning: ours is deprecated",
      "FAILED policy_test.py::test_test_code_calls_a_deprecated_api"
      " - DeprecationWarning: old_api is deprecated",
      "PASSED policy_test.py::test_dependency_uses_its_own_deprecated_api",
      "PASSED policy_test.py::"
      "test_pytest_warns_still_records_ours_where_stacklevel_points",
      # The dependency's deprecation is reported in the warnings summary.
      "*fakedep.py:*: DeprecationWarning: old_api is deprecated",
  ])
  result.assert_outcomes(passed=2, failed=3, warnings=1)
