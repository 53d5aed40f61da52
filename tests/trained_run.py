"""One tiny trained run for the export, predict and NNX tests, and a runner for the commands.

Training even a tiny run costs most of these tests' time, so it is made once per session: the
fixture trains into a fixed directory under pytest's session temp dir and any later user (another
test module importing this fixture) finds it there. Test modules import `tiny_run` by name.
"""

import os
import subprocess
import sys

import pytest
from conftest import subprocess_env

from se_resnet_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, make_tiny_config) -> str:
  """A finished run (SEResNet18 at width 4, generated data, 4 steps) with best/ and report.json."""
  workdir = tmp_path_factory.getbasetemp() / 'tiny_trained_run'
  if not (workdir / 'report.json').exists():
    config = make_tiny_config(**{'model.num_filters': 4, 'num_epochs': 1, 'max_steps': 4})
    train.train_and_evaluate(config, str(workdir))
  return str(workdir)


def command_env() -> dict:
  """The commands' subprocesses (conftest's environment) import the library from this checkout."""
  path = os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
  return subprocess_env(PYTHONPATH=path)


def run_command(module: str, *args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
  """`python -m se_resnet_jax.<module> args...`, its output captured."""
  return subprocess.run([sys.executable, '-m', f'se_resnet_jax.{module}', *args], cwd=cwd,
                        env=command_env(), capture_output=True, text=True, timeout=600)


def one_line_error(result: subprocess.CompletedProcess) -> str:
  """The command's `error:` line; fails unless it exited non-zero with no traceback."""
  assert result.returncode != 0, result.stdout + result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1, result.stderr
  return lines[0]
