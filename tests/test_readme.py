"""The README's usage example must run exactly as written."""

import os
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def run_snippet(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  """`code` in a new Python process on the CPU, as a reader pastes it.

  The snippets build full-size networks eagerly, so XLA compiles one program per operation and
  shape; without LLVM's backend optimisation these compile in about half the CPU time (the first
  snippet 28 -> 18 CPU-s, the backbone one 22 -> 10), and what they print does not depend on it.
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_backend_optimization_level=0')
  return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True,
                        env=env, timeout=600)


def test_readme_backbone_example_runs(tmp_path):
  """The backbone lines (features, stage maps, SE gates, headless, new head) print what their
  comments say."""
  section = README.read_text().split('## Using the modules in your own Flax code', 1)[1]
  code = re.findall(r'```python\n(.*?)```', section.split('\n## ', 1)[0], re.S)[1]
  run = run_snippet(code, tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  printed = run.stdout.splitlines()
  assert printed[0] == ("(2, 64) {'stem': (32, 32, 16), 'stage1': (32, 32, 16), "
                        "'stage2': (16, 16, 32), 'stage3': (8, 8, 64)}")
  assert printed[1:] == ['9 (2, 64)', '(2, 64)', '(2, 100)']


def test_readme_commands_are_the_ones_ci_runs():
  ci = (README.parent / '.ci' / 'run').read_text()
  text = README.read_text()
  for command in ('pip install -e ".[test]"', 'python -m pytest -q -n auto --maxprocesses=4 tests'):
    assert command in text
    assert command.replace('pip install', 'pip install --quiet') in ci or command in ci


def test_readme_pytorch_example_runs():
  section = README.read_text().split('## Coming from PyTorch', 1)[1]
  code = re.findall(r'```python\n(.*?)```', section.split('\n## ', 1)[0], re.S)[0]
  assert len(code.strip().splitlines()) == 5
  namespace = {}
  exec(compile(code, str(README), 'exec'), namespace)
  assert namespace['report'].folded_biases == ()
  assert set(namespace['variables']) == {'params', 'batch_stats'}


def test_readme_clone_folder_does_not_shadow_the_package_and_the_snippet_runs_anywhere(tmp_path):
  """The README's first snippet prints what its comments say, run as its reader would: in a new
  process, beside a clone folder (one named like the package, in the folder Python starts in,
  would hide it)."""
  clone = re.search(r'git clone \S+ (\S+) && cd (\S+)', README.read_text())
  assert clone and clone.group(1) == clone.group(2) != 'se_resnet_jax'
  section = README.read_text().split('## Using the modules in your own Flax code', 1)[1]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  (tmp_path / clone.group(1)).mkdir()  # run beside the clone, as the README's reader would
  run = run_snippet(code, tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split() == ['(8,', '10)', '(2,', '8,', '8,', '64)']
