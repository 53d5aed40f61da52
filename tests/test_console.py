"""What a person sees from the commands (issue 16): the console, the closing summary, a finished
run answered from its report, --help, and the core install without matplotlib or TensorFlow.

The runs drive the real command in subprocesses (the console is process-level: stdout, stderr,
exit status) on configs/smoke.py shrunk to a few hundred images, sharing this session's compilation
cache, so the later runs load the programs the first one compiled.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import TINY_RUN, subprocess_env

from se_resnet_jax import summary, usage
from se_resnet_jax.config import base_config
from se_resnet_jax.console import Console, TrainingProgress, format_duration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = TINY_RUN['num_epochs']
STEPS_PER_EPOCH = 8  # (384 - 128 validation) / 32
SMALL = {k: v for k, v in TINY_RUN.items() if k != 'dataset'}  # on generated images
TIMEOUT_S = 900  # a guard against hangs only
# What the data extra adds to the core install; hidden from the "core install" runs.
NOT_IN_CORE = ('matplotlib', 'PIL', 'tensorflow', 'tensorboard', 'tensorflow_datasets')
HIDE_PACKAGES = f'''
import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec.__func__


def _not_installed(cls, name, path=None, target=None):
  """The path finder finds no such package, as if it were not installed."""
  if name.split('.')[0] in {NOT_IN_CORE!r}:
    return None
  return _find_spec(cls, name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_not_installed)
'''


def _main(workdir, overrides=(), cwd=REPO, env=None):
  flags = {**SMALL, **dict(overrides)}
  command = [sys.executable, '-m', 'se_resnet_jax.main', '--config=configs/smoke.py',
             f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in flags.items()]]
  return subprocess.run(command, cwd=cwd, env=env or subprocess_env(), capture_output=True,
                        text=True, timeout=TIMEOUT_S)


def _report(workdir):
  with open(os.path.join(workdir, 'report.json')) as f:
    return json.load(f)


def _files(workdir):
  """Every file under the workdir with its modification time: what a rerun must leave alone."""
  return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
          for root, _, names in os.walk(workdir) for name in names}


@pytest.fixture
def smoke_run(tiny_run_result):
  """The session's tiny run: the training command's console and the workdir it left."""
  return tiny_run_result.workdir, tiny_run_result.command


@pytest.mark.slow
def test_smoke_run_console_is_one_display_and_ends_with_the_summary(smoke_run):
  workdir, run = smoke_run
  assert run.returncode == 0, run.stderr[-3000:]
  err = run.stderr
  print(f'\nconsole of the smoke run:\n{err}\nstdout:\n{run.stdout}')
  # One line per epoch; no second copy of the epoch's numbers (clu's '[16] train_loss=...').
  for epoch in range(1, EPOCHS + 1):
    assert len(re.findall(rf'^epoch {epoch}/{EPOCHS} ', err, re.M)) == 1, err
  history = _report(workdir)['history']
  for row in history:
    assert err.count(f'{row["train_loss"]:.4f}') == 1, (row, err)
  assert not re.search(r'\[\d+\] \w+=', err), err  # clu's logging writer
  # Progress lines with step, epoch, loss, accuracy, img/s and one ETA; none of clu's periodic ones.
  progress = [line for line in err.splitlines() if line.startswith('step ')]
  assert progress and all(line.count('ETA') == 1 and 'img/s' in line and ' loss ' in line
                          and ' acc ' in line for line in progress), progress
  for clu_words in ('steps_per_sec', 'uptime', 'Setting work unit notes', 'Hyperparameters'):
    assert clu_words not in err
  # No other library's INFO lines at the default verbosity (absl's 'I<date> ... file.py:N]').
  assert not re.search(r'^I\d{4} ', err, re.M), err
  # The closing summary on stdout: the report's numbers and where its files are.
  report = _report(workdir)
  out = run.stdout
  assert os.path.join(workdir, 'report.md') in out
  assert os.path.join(workdir, 'curves.png') in out
  # config.tensorboard=False: no TensorBoard file, and no line pointing at one
  assert not glob.glob(os.path.join(workdir, 'events.out.tfevents*')) and '--logdir' not in out
  for split in ('validation', 'test'):
    row = next(line.split() for line in out.splitlines() if line.strip().startswith(split))
    assert row == [split, f'{100 * report[split]["accuracy"]:.2f}%', f'{report[split]["loss"]:.4f}',
                   str(report['best_epoch'])], row


@pytest.mark.slow
def test_rerun_of_a_finished_run_answers_from_its_report(tiny_run_result, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run_result.workdir, workdir)
  data = {k: tiny_run_result.config[k] for k in ('dataset', 'npz_path')}
  before = _files(workdir)
  start = time.perf_counter()
  rerun = _main(workdir, data, cwd=str(tmp_path))  # from another folder, too
  seconds = time.perf_counter() - start
  print(f'\nrerun of a finished run: {seconds:.1f} s')
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  # the same summary
  assert rerun.stdout == tiny_run_result.command.stdout.replace(tiny_run_result.workdir, workdir)
  assert _files(workdir) == before  # nothing trained, evaluated or written
  assert '--config.num_epochs' in rerun.stderr  # how to train it further

  # A larger num_epochs trains it further: it resumes from the last checkpoint.
  longer = _main(workdir, {**data, 'num_epochs': EPOCHS + 1})
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert f'at step {EPOCHS * STEPS_PER_EPOCH} ' in longer.stderr
  assert _report(workdir)['epochs_completed'] == EPOCHS + 1


@pytest.mark.slow
def test_core_install_runs_to_the_end_without_matplotlib_and_tensorflow(tmp_path,
                                                                      tiny_run_result):
  """The smoke config and an npz run, with what the data extra adds hidden: exit 0 and a report."""
  hide = tmp_path / 'hide'
  hide.mkdir()
  (hide / 'sitecustomize.py').write_text(HIDE_PACKAGES)
  env = subprocess_env(PYTHONPATH=os.pathsep.join([str(hide), os.environ.get('PYTHONPATH', REPO)]))
  check = subprocess.run([sys.executable, '-c', 'import matplotlib'], env=env,
                         capture_output=True, text=True)
  assert 'ModuleNotFoundError' in check.stderr  # the packages are hidden indeed

  smoke = str(tmp_path / 'smoke')
  run = _main(smoke, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  written = os.listdir(smoke)
  assert {'report.json', 'report.md'} <= set(written)
  assert not [name for name in written if name.endswith('.png') or 'tfevents' in name], written
  assert run.stderr.count('matplotlib is not installed') == 1, run.stderr
  assert 'pictures     none' in run.stdout

  # Arrays from an .npz with a relative path; evaluate, run from another folder without any
  # flag, finds them through the run's config.json, and --npz_path points at them once moved.
  # (The session run's arrays: the same programs as that run, from the compilation cache.)
  shutil.copy(tiny_run_result.config.npz_path, tmp_path / 'arrays.npz')
  npz = str(tmp_path / 'npz')
  run = _main(npz, {'dataset': 'cifar10', 'npz_path': 'arrays.npz'}, cwd=str(tmp_path), env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  report = _report(npz)
  assert report['dataset'] == 'cifar10' and report['test']['num_examples'] == 64
  assert os.path.exists(os.path.join(npz, 'report.md'))

  evaluate = [sys.executable, '-m', 'se_resnet_jax.evaluate', f'--workdir={npz}', '--split=test']
  run = subprocess.run(evaluate, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT_S)
  assert run.returncode == 0, run.stderr[-3000:]
  os.rename(tmp_path / 'arrays.npz', tmp_path / 'moved.npz')
  run = subprocess.run(evaluate + ['--output_dir=' + str(tmp_path / 'moved')], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT_S)
  assert run.returncode == 1 and 'arrays.npz' in run.stderr.splitlines()[-1]
  run = subprocess.run(evaluate + [f'--npz_path={tmp_path / "moved.npz"}', '--allow_changed_data',
                                   '--output_dir=' + str(tmp_path / 'moved')],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(tmp_path / 'moved' / 'report.json') as f:
    assert json.load(f)['test']['accuracy'] == pytest.approx(
        _report(os.path.join(npz, 'evaluation', f'best-{report["step"]}'))['test']['accuracy'],
        abs=0)


def test_help_lists_every_config_field_with_default_and_meaning(tmp_path):
  # From another folder, with the README's relative --config path.
  run = subprocess.run([sys.executable, '-m', 'se_resnet_jax.main', '--help',
                        '--config=configs/smoke.py'], cwd=tmp_path, env=subprocess_env(),
                       capture_output=True, text=True, timeout=TIMEOUT_S)
  assert run.returncode == 0, run.stderr
  assert '--workdir' in run.stdout and 'configs/smoke.py' in run.stdout
  lines = [line.split(None, 1) for line in run.stdout.splitlines()
           if line.startswith('  --config.')]
  assert len(lines) == len(_flat_fields(base_config()))
  assert all(len(line) == 2 for line in lines), [line for line in lines if len(line) < 2]
  fields = [line[0] for line in lines]
  assert '--config.dataset=synthetic' in fields  # the file's value, not base_config's
  assert '--config.num_epochs=6' in fields


def _flat_fields(config):
  from flax import traverse_util
  return traverse_util.flatten_dict(config.to_dict(), sep='.')


def test_every_config_field_has_a_meaning():
  # A field added to base_config (or default_augment_config) without a comment fails here.
  meanings = usage.all_field_meanings()
  assert [name for name in _flat_fields(base_config()) if not meanings.get(name)] == []


def test_a_field_means_its_comment_first_sentence():
  import ml_collections

  def config():
    c = ml_collections.ConfigDict()
    c.own = 1  # on its line, e.g. this. Not this sentence
    # The block above
    # it. Not this sentence.
    c.above = 2
    c.group = ml_collections.ConfigDict(dict(
        # labelled: one of several fields on a line
        labelled=1, unlabelled=2))
    c.bare = 3
    return c

  assert usage.field_meanings(config, prefix='p.') == {
      'p.own': 'on its line, e.g. this', 'p.above': 'The block above it',
      'p.group.labelled': 'one of several fields on a line', 'p.group.unlabelled': '',
      'p.bare': ''}


def test_finished_run_is_recognised_by_its_config_only(tmp_path):
  from se_resnet_jax.input_pipeline import data_identity

  config = base_config()
  (tmp_path / 'checkpoints' / '8').mkdir(parents=True)
  (tmp_path / 'report.json').write_text(json.dumps({
      'config': config.to_dict(), 'data': data_identity(config), 'weights': {'step': 8}}))
  assert summary.finished_report(str(tmp_path), config) is not None
  moved = config.copy_and_resolve_references()
  moved.data_dir, moved.log_every_steps = '/elsewhere', 7  # where the data is, how often to print
  assert summary.finished_report(str(tmp_path), moved) is not None
  longer = config.copy_and_resolve_references()
  longer.num_epochs += 10
  assert summary.finished_report(str(tmp_path), longer) is None
  assert summary.config_differences(config.to_dict(), longer) == ['num_epochs']


def test_progress_lines_and_epoch_lines(capsys):
  import io
  stream = io.StringIO()
  display = TrainingProgress(Console(stream, enabled=True), total_steps=20, steps_per_epoch=10,
                             num_epochs=2, batch_size=8, start_step=0)
  display.step(5, {'loss': 2.5, 'accuracy': 0.25})
  display.epoch({'epoch': 1, 'step': 10, 'train_loss': 2.0, 'train_accuracy': 0.3,
                 'learning_rate': 0.1, 'epoch_time_s': 65.0, 'train_images_per_s': 80.0}, False)
  lines = stream.getvalue().splitlines()
  assert lines[0].startswith('step 5/20  epoch 1/2  loss 2.5000  acc 0.2500') and 'ETA' in lines[0]
  assert lines[1] == ('epoch 1/2  train loss 2.0000 acc 0.3000  |  1m05s, 80 img/s, lr 0.1')
  assert [format_duration(s) for s in (4.4, 65, 3725)] == ['4s', '1m05s', '1h02m05s']
  quiet = io.StringIO()
  Console(quiet, enabled=False).say('not process 0')
  assert quiet.getvalue() == ''


def test_on_a_terminal_the_progress_line_is_a_bar_redrawn_in_place():
  import io

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  stream = Terminal()
  console = Console(stream, enabled=True)
  display = TrainingProgress(console, total_steps=20, steps_per_epoch=10, num_epochs=2,
                             batch_size=8, start_step=0)
  display.step(5, {'loss': 2.5, 'accuracy': 0.25})
  display.step(8, {'loss': 2.4, 'accuracy': 0.3})
  console.say('epoch 1/2 ...')
  text = stream.getvalue()
  assert text.count('\r\033[K') == 2 and '[######..................]  25%' in text
  live, permanent = text.split('\n', 1)  # the live line ends only when a line that stays comes
  assert 'step 8/20' in live and permanent == 'epoch 1/2 ...\n'
