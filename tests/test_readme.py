"""The README's usage example must run exactly as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_flax_example_runs(capsys):
  text = README.read_text()
  section = text.split('## Using the modules in your own Flax code', 1)[1]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  exec(compile(code, str(README), 'exec'), {})
  assert capsys.readouterr().out.split() == ['(8,', '10)', '(2,', '8,', '8,', '64)']


def test_readme_commands_are_the_ones_ci_runs():
  ci = (README.parent / '.ci' / 'run').read_text()
  text = README.read_text()
  for command in ('pip install -e ".[test]"', 'python -m pytest -q tests'):
    assert command in text
    assert command.replace('pip install', 'pip install --quiet') in ci or command in ci
