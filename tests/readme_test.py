"""The README's usage example runs as written, and its commands are the CI's."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_usage_example_runs(capsys):
  usage = README.split("## Usage", 1)[1]
  code = re.search(r"```python\n(.*?)```", usage, re.DOTALL).group(1)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  numbers = [float(v) for v in re.findall(r"\d+\.?\d*", printed)]
  np.testing.assert_array_equal(numbers, [1, 2, 1, 2, 3, 2, 1, 2, 1])


def test_usage_non_flax_example_reads_layouts_from_the_model(capsys):
  usage = README.split("## Usage", 1)[1].split("\n## ", 1)[0]
  code = re.findall(r"```python\n(.*?)```", usage, re.DOTALL)[1]
  exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.split() == ["OIHW", "None"]


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "<!-- test-command -->" in ci
  block = README.split("<!-- test-command -->", 1)[1]
  command = re.search(r"```bash\n(.*?)\n```", block, re.DOTALL).group(1)
  assert "pytest" in command and "pip install" in command


def test_ci_runs_the_readme_docs_command_in_its_own_venv():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "<!-- docs-command -->" in ci
  block = README.split("<!-- docs-command -->", 1)[1]
  command = re.search(r"```bash\n(.*?)\n```", block, re.DOTALL).group(1)
  assert command.startswith("python3 -m venv .venv-docs && . .venv-docs/")
  assert 'pip install -e ".[docs]"' in command and "sphinx -W" in command


def test_readme_is_a_front_page():
  assert len(README.splitlines()) <= 200


def test_nd_example_runs(capsys):
  page = (ROOT / "docs" / "sgs.md").read_text()
  section = page.split("## 1-D, 3-D and dilated kernels", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
  exec(compile(code, "docs/sgs.md", "exec"), {})  # pylint: disable=exec-used
  lines = capsys.readouterr().out.splitlines()
  numbers = lambda line: [float(v) for v in re.findall(r"\d+\.?\d*", line)]
  assert numbers(lines[0]) == [2, 2, 1, 3, 1, 2, 2, 2, 1, 1, 2, 1, 1, 2]
  assert numbers(lines[1]) == [1] * 6 + [2] + [1] * 6 + [1, 2, 1]
  assert numbers(lines[2]) == [13, 5, 7, 3, 3, 3, 1, 1, 2, 3, 4, 5]
