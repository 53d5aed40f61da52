"""Shared test helpers: tiny configs, one finished tiny run, a compilation cache, and commands run
in subprocesses.

Training tests compile the same small programs more than once (a run, the same run interrupted,
its resume). JAX's persistent compilation cache, pointed at a directory that lives for one test
session, lets the later runs load those programs instead of compiling them again; the commands
that tests start in subprocesses share it through `subprocess_env`.
"""

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from se_resnet_jax.config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO, 'configs')

# pytest-xdist's workers inherit the variable from the process that made the directory, so the
# whole session, all workers and their subprocesses, shares one cache; its maker removes it.
_CACHE_VARIABLE = 'SE_RESNET_JAX_TEST_JIT_CACHE'
_OWN_CACHE = _CACHE_VARIABLE not in os.environ
if _OWN_CACHE:
  os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix='se_resnet_jax_test_jit_cache_')
if not jax.config.jax_compilation_cache_dir:  # respect a cache the caller already configured
  jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_VARIABLE])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


# Test files by their measured time (most first; 2026-12-08, two pytest-xdist workers on 2 cores).
# Each worker takes whole files (their module fixtures then run once), longest first, so that
# both finish together; files not named here follow in their usual order.
LONGEST_FILES = ('test_reliability', 'test_device_check', 'test_train', 'test_multiprocess',
                 'test_experiments', 'test_export', 'test_multidevice', 'test_console',
                 'test_convert', 'test_notebook', 'test_nnx', 'test_compile_count', 'test_readme',
                 'test_predict', 'test_torch_step_parity', 'test_training_options',
                 'test_convert_command')


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep order


class _WholeFilesLongestFirst:
  """pytest-xdist's scheduler: whole files to each worker, in the order above (its loadscope mode
  would sort them by their number of tests). A plugin object, so that pytest without xdist never
  sees the hook."""

  @staticmethod
  def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False
    return LoadScopeScheduling(config, log)


def pytest_configure(config):
  if config.pluginmanager.hasplugin('xdist'):
    config.pluginmanager.register(_WholeFilesLongestFirst())


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ.pop(_CACHE_VARIABLE), ignore_errors=True)


def subprocess_env(**extra: str) -> dict:
  """Environment of a command under test: one CPU device, quiet TensorFlow, this session's cache."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  env.pop('XLA_FLAGS', None)
  if jax.config.jax_compilation_cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  env.update(extra)
  return env


def checkpoint_steps(workdir: str, which: str = 'checkpoints') -> list:
  """Completed checkpoint steps: orbax renames a step directory into place only when complete."""
  directory = os.path.join(workdir, which)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def wait_until(procs: Sequence[subprocess.Popen], condition: Callable[[], bool], timeout: float,
               interval: float = 0.05) -> None:
  """Waits on the running commands until `condition()` holds, looking every `interval` seconds.

  Each look waits on the first process instead of sleeping, so a command that ends early fails
  the test at once rather than at the timeout.
  """
  deadline = time.monotonic() + timeout
  while not condition():
    ended = [p.returncode for p in procs if p.poll() is not None]
    assert not ended, f'the run ended (exit {ended}) before the moment awaited'
    assert time.monotonic() < deadline, 'timed out waiting for the run'
    try:
      procs[0].wait(timeout=interval)
    except subprocess.TimeoutExpired:
      pass


def random_variables(module, *args, seed=0, **kwargs):
  """Variables of `module` drawn with numpy: the shapes of `module.init`, without compiling it.

  On CPU, compiling an initialiser costs far more than the tests that use it (one threefry
  program per parameter), and the behaviour under test does not depend on how weights were drawn.
  Kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1), BatchNorm scales ~ U(0.5, 1.5), running mean 0
  and variance 1 (as flax starts them).
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rs = np.random.RandomState(seed)

  def draw(path, s):
    name = path[-1]
    if path[0] == 'batch_stats':
      return np.zeros(s.shape, s.dtype) if name == 'mean' else np.ones(s.shape, s.dtype)
    if name == 'kernel':
      fan_in = int(np.prod(s.shape[:-1]))
      return (rs.normal(size=s.shape) / np.sqrt(fan_in)).astype(s.dtype)
    if name == 'scale':
      return rs.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    return (0.1 * rs.normal(size=s.shape)).astype(s.dtype)

  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict({k: jax.numpy.asarray(draw(k, s)) for k, s in flat.items()})


def randomise_batch_stats(variables: dict, seed: int = 0) -> dict:
  """`variables` with BatchNorm running means ~ N(0, 0.2) and variances ~ U(0.5, 2): tests that
  compare two implementations would not notice swapped or ignored statistics at 0 and 1."""
  rs = np.random.RandomState(seed + 1)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, v: jax.numpy.asarray((rs.normal(0.0, 0.2, v.shape) if path[-1].key == 'mean'
                                         else rs.uniform(0.5, 2.0, v.shape)).astype(np.float32)),
      variables['batch_stats'])
  return dict(variables, batch_stats=stats)


@pytest.fixture(scope='session')
def make_tiny_config():
  """Factory of fresh configs: configs/smoke.py shrunk to a few hundred images and steps.

  The smoke recipe (SEResNet18 at base width 8, r=4, generated data) keeps the real code path; the
  sizes are cut so that a whole `train_and_evaluate` is seconds of compute once compiled.
  Keyword overrides use dotted names, e.g. make_tiny_config(**{'model.num_filters': 4}).
  """

  def make(**overrides):
    config = load_config_file(os.path.join(CONFIGS_DIR, 'smoke.py'))
    config.synthetic.num_train = 640
    config.synthetic.num_test = 200
    config.validation_size = 128  # leaves 512 training images: 16 steps of 32 per epoch
    config.num_epochs = 2
    config.batch_size = 32
    config.eval_batch_size = 48  # divides neither 128 nor 200: the last eval batch is padded
    config.log_every_steps = 8
    config.measure_inference = False
    return with_overrides(config, overrides)

  return make


def library_function_names() -> set:
  """Names of every function defined in the library's source, nested ones included: the names JAX
  gives the programs the library compiles (jit(<name>))."""
  package = os.path.join(REPO, 'se_resnet_jax')
  names = set()
  for root, _, filenames in os.walk(package):
    for filename in filenames:
      if filename.endswith('.py'):
        with open(os.path.join(root, filename)) as f:
          tree = ast.parse(f.read())
        names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
  return names


def dumped_programs(directory) -> set:
  """Names of the programs XLA dumped into `directory` (module_NNNN.jit_<name>.*)."""
  if not os.path.isdir(directory):
    return set()
  return {m.group(1) for m in (re.match(r'module_\d+\.jit_(\w+?)\.', n)
                               for n in os.listdir(directory)) if m}


@pytest.fixture
def policy_dump(tmp_path, monkeypatch):
  """The compile policy's options plus an HLO dump into a fresh directory, which is returned.

  XLA dumps a program under `xla_dump_to` only when that option is among the program's own compile
  options, so the directory lists exactly the programs compiled with the policy.
  """
  from se_resnet_jax import compilation
  directory = str(tmp_path / 'xla_dump')
  backend = jax.default_backend()
  monkeypatch.setitem(compilation.BACKEND_OPTIONS, backend,
                      {**compilation.BACKEND_OPTIONS.get(backend, {}), 'xla_dump_to': directory})
  return directory


def abstract_state(config, sharding=None):
  """The config's train state as shapes (a restore target), on the first device by default."""
  from jax.sharding import SingleDeviceSharding

  from se_resnet_jax.plan import plan_run

  return plan_run(config).abstract_state(sharding or SingleDeviceSharding(jax.devices()[0]))


# configs/smoke.py shrunk: SEResNet18 four channels wide, 4 epochs of 8 steps (384 images - 128
# validation, batches of 32), on generated images stored as an .npz (a dataset a test can move),
# without TensorBoard (importing TensorFlow would cost each run seconds). The reliability runs,
# the experiments' real runs and the mock-tfds run train on the same sizes (a 4- or 5-epoch
# schedule), so that they load this run's compiled programs instead of compiling their own.
TINY_RUN = {
    'dataset': 'cifar10', 'synthetic.num_train': 384, 'synthetic.num_test': 64,
    'validation_size': 128, 'model.num_filters': 4, 'model.se_reduction': 2, 'batch_size': 32,
    'eval_batch_size': 64, 'measure_inference': False, 'log_every_steps': 3, 'num_epochs': 4,
    'tensorboard': False,
}


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """`config` with dotted-name `overrides` set, as `--config.a.b=v` sets them."""
  for dotted, value in overrides.items():
    *groups, key = dotted.split('.')
    target = config
    for group in groups:
      target = target[group]
    target[key] = value
  return config


@dataclasses.dataclass
class TinyRun:
  workdir: str
  config: ml_collections.ConfigDict  # what the command trained, as a config object
  command: subprocess.CompletedProcess  # its exit status, stdout and stderr


def session_folder(tmp_path_factory, name: str):
  """Where a session-wide fixture keeps what it makes once: under pytest-xdist, in the session's
  common temporary folder, so that every worker finds it (each takes `<folder>.lock` first)."""
  shared = 'PYTEST_XDIST_WORKER' in os.environ
  base = (tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp())
  return base / name


@pytest.fixture(scope='session')
def tiny_run_result(tmp_path_factory) -> TinyRun:
  """The session's one finished run, trained by the real command (`se_resnet_jax.main`).

  Tests that read a finished run share it, and must not change it: copy it to change it. Under
  pytest-xdist the workers share it too: the first to need it trains it in the session's common
  temporary folder, under a file lock, and the others read what it left.
  """
  from filelock import FileLock

  base = session_folder(tmp_path_factory, 'tiny_run')
  overrides = {**TINY_RUN, 'npz_path': str(base / 'data.npz')}
  config = with_overrides(load_config_file(os.path.join(CONFIGS_DIR, 'smoke.py')), overrides)
  workdir, outcome = str(base / 'run'), base / 'command.json'
  with FileLock(f'{base}.lock'):
    if not outcome.exists():
      from se_resnet_jax import input_pipeline

      base.mkdir(exist_ok=True)  # a worker that failed before its outcome may have made it
      train, test, names = input_pipeline.synthetic_splits(config.synthetic)
      np.savez(config.npz_path, x_train=train.images, y_train=train.labels, x_test=test.images,
               y_test=test.labels, classes=np.array(names))
      command = run_command('main', '--config=configs/smoke.py', f'--workdir={workdir}',
                            *[f'--config.{k}={v}' for k, v in overrides.items()])
      outcome.write_text(json.dumps({'args': command.args, 'returncode': command.returncode,
                                     'stdout': command.stdout, 'stderr': command.stderr}))
  command = subprocess.CompletedProcess(**json.loads(outcome.read_text()))
  assert command.returncode == 0, command.stderr[-3000:]
  return TinyRun(workdir, config, command)


@pytest.fixture(scope='session')
def tiny_run(tiny_run_result) -> str:
  """The workdir of the session's finished run (see `tiny_run_result`)."""
  return tiny_run_result.workdir


EXPORT_FORMATS = ('jax', 'onnx')


@pytest.fixture(scope='session')
def tiny_run_exports(tiny_run, tmp_path_factory):
  """Both exports of the session run, made once for all workers: the folder holding
  `cifar10.<format>` with its model card `cifar10.<format>.json`, and `cards.json`, the cards
  `export.export_run` returned. Tests copy what they use: the folder is shared."""
  from filelock import FileLock

  base = session_folder(tmp_path_factory, 'tiny_run_exports')
  with FileLock(f'{base}.lock'):
    cards_file = base / 'cards.json'
    if not cards_file.exists():
      from se_resnet_jax import export

      shutil.rmtree(base, ignore_errors=True)  # what a worker that failed part-way left
      base.mkdir()
      cards = {fmt: export.export_run(tiny_run, fmt, str(base / f'cifar10.{fmt}'))
               for fmt in EXPORT_FORMATS}
      cards_file.write_text(json.dumps(cards))
  return base


def copy_exports(exports, directory) -> None:
  """The session run's exports and their model cards, copied into `directory`."""
  for fmt in EXPORT_FORMATS:
    for name in (f'cifar10.{fmt}', f'cifar10.{fmt}.json'):
      shutil.copy(exports / name, directory / name)


def command_env() -> dict:
  """The commands' subprocesses (this session's environment) import the library from this
  checkout."""
  path = os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
  return subprocess_env(PYTHONPATH=path)


def run_command(module: str, *args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
  """`python -m se_resnet_jax.<module> args...`, its output captured."""
  return subprocess.run([sys.executable, '-m', f'se_resnet_jax.{module}', *args], cwd=cwd,
                        env=command_env(), capture_output=True, text=True, timeout=600)


# Each command of `run_commands_forked` is a child forked from this process once it has imported
# what the commands import (not the command modules, whose flags the child's run defines).
_FORKING_RUNNER = r"""
import json, os, runpy, sys
from se_resnet_jax import cli, train  # noqa: F401  (jax, flax, optax, orbax: the long part)
jobs, codes = json.load(sys.stdin), []
for job in jobs:
  pid = os.fork()
  if pid == 0:  # the child becomes `python -m module args`; its exit ends it, not this loop
    os.environ.update(job['env'])
    for fd, path in ((1, job['stdout']), (2, job['stderr'])):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [job['module'], *job['args']]
    runpy.run_module(job['module'], run_name='__main__', alter_sys=True)
    sys.exit(0)
  codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


def run_commands_forked(jobs: Sequence[tuple], tmp_dir: str) -> list:
  """Commands `(module, args, env)` run one after another, each as `python -m se_resnet_jax.module
  args` in a process of its own with `env` added, their CompletedProcess in order.

  For commands that stop before compute (bad input): each would spend seconds importing JAX and
  Flax before its one line, so one process imports them once and forks a child per command. The
  child runs the command's real module, exit status and output as from its own process.
  """
  specs = []
  for i, (module, args, env) in enumerate(jobs):
    specs.append({'module': f'se_resnet_jax.{module}', 'args': list(args), 'env': dict(env),
                  'stdout': os.path.join(tmp_dir, f'{i}.out'),
                  'stderr': os.path.join(tmp_dir, f'{i}.err')})
  runner = subprocess.run([sys.executable, '-c', _FORKING_RUNNER], input=json.dumps(specs),
                          cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=600)
  assert runner.returncode == 0, runner.stderr[-3000:]
  codes = json.loads(runner.stdout.strip().splitlines()[-1])
  results = []
  for spec, code in zip(specs, codes):
    with open(spec['stdout']) as out, open(spec['stderr']) as err:
      results.append(subprocess.CompletedProcess([spec['module'], *spec['args']], code,
                                                 out.read(), err.read()))
  return results


def one_line_error(result: subprocess.CompletedProcess) -> str:
  """The command's `error:` line; fails unless it exited non-zero with no traceback."""
  assert result.returncode != 0, result.stdout + result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1, result.stderr
  return lines[0]
