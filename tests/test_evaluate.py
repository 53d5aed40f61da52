"""The evaluate command refuses, before any work, what would report on the wrong thing.

The run under evaluation is made without training: a zero state of the right shapes saved the way
the training loop saves it, with its config.json. Every refusal here comes before data is read or
anything is compiled; a stand-in `load_dataset` stops the command where the work would begin.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from se_resnet_jax import evaluate, files, input_pipeline, rundir
from se_resnet_jax.checkpoints import CheckpointNotFoundError, RunCheckpoints
from se_resnet_jax.errors import ConfigError, WorkdirError
from se_resnet_jax.input_pipeline import DataSettingsChangedError
from se_resnet_jax.plan import plan_run
from se_resnet_jax.progress import Progress
from se_resnet_jax.sharding import data_mesh
from se_resnet_jax.workdir import WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkBegan(Exception):
  """Raised by the stand-in data loader: the command got past every check."""


@pytest.fixture
def no_work(monkeypatch):
  def load_dataset(config, test_only=False):
    raise WorkBegan

  monkeypatch.setattr(input_pipeline, 'load_dataset', load_dataset)


@pytest.fixture
def run_dir(tmp_path, make_tiny_config) -> str:
  """A workdir as training leaves it: config.json and a checkpoint at step 16 (zero weights)."""
  config = make_tiny_config(**{'model.num_filters': 4, 'model.se_reduction': 2})
  workdir = str(tmp_path / 'run')
  plan = plan_run(config)
  target = plan.abstract_state(NamedSharding(data_mesh(), P()))
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target)
  state = state.replace(step=jnp.array(16, state.step.dtype))
  progress = Progress(plan.architecture, epoch=1, best_val_accuracy=0.5, best_epoch=1)
  record = rundir.RunRecord('run0', rundir.now(), plan.architecture, plan.data,
                            [f'class_{i}' for i in range(10)], [0.5] * 3, [0.25] * 3)
  os.makedirs(workdir)
  rundir.write_record(workdir, record, config)
  ckpts = RunCheckpoints(workdir, run_id=record.run_id)
  ckpts.save(16, state, progress.to_meta(), best=True)
  ckpts.close()
  return workdir


def _edit_config_json(workdir: str, **changes) -> None:
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  saved.update(changes)
  with open(path, 'w') as f:
    json.dump(saved, f)


def test_the_run_itself_passes_every_check(run_dir, no_work):
  with pytest.raises(WorkBegan):
    evaluate.evaluate_checkpoint(run_dir)


def test_an_edited_config_json_does_not_evaluate_another_split(run_dir, no_work):
  """It used to report on the other split under the run's name."""
  _edit_config_json(run_dir, validation_seed=7)
  with pytest.raises(DataSettingsChangedError) as error:
    evaluate.evaluate_checkpoint(run_dir)
  assert error.value.differences == {'validation_seed': (0, 7)}
  with pytest.raises(WorkBegan):  # said explicitly, it goes on
    evaluate.evaluate_checkpoint(run_dir, allow_changed_data=True)


def test_another_config_with_another_batch_size_is_refused(run_dir, no_work, make_tiny_config):
  config = make_tiny_config(**{'model.num_filters': 4, 'model.se_reduction': 2, 'batch_size': 16})
  with pytest.raises(DataSettingsChangedError) as error:
    evaluate.evaluate_checkpoint(run_dir, config=config)
  assert error.value.differences == {'batch_size': (32, 16)}


@pytest.mark.parametrize('content, expected', [
    ('{"learning_rate": 0.1,', r'config.json is not valid JSON \(Expecting'),
    ('[1, 2]', r'config.json does not hold a config'),
    ('{"learning_rate": "fast"}', r"config.json: field 'learning_rate' = 'fast' does not fit"),
    ('{"no_such_field": 1}', r"config.json: Unknown config key 'no_such_field'"),
    ('{"model": {"dropout_rate": 1.5}}', r'config.json: model.dropout_rate must be in \[0, 1\)'),
])
def test_a_broken_config_json_is_named(run_dir, no_work, content, expected):
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    f.write(content)
  with pytest.raises(ConfigError, match=expected) as error:
    evaluate.evaluate_checkpoint(run_dir)
  assert str(error.value).startswith(os.path.join(run_dir, 'config.json'))


def test_an_unwritable_report_directory_fails_before_any_work(run_dir, monkeypatch):
  """A file where the reports go stands in for a read-only run (root ignores permissions)."""
  def no_restore(*args, **kwargs):
    raise AssertionError('restored before checking the report can be written')

  monkeypatch.setattr(evaluate, 'restore_run', no_restore)
  with open(os.path.join(run_dir, 'evaluation'), 'w') as f:
    f.write('not a directory')
  with pytest.raises(WorkdirError, match=r"Cannot write the report to '.*evaluation' \(Not a "
                     r'directory in .*\): pass --output_dir='):
    evaluate.evaluate_checkpoint(run_dir)


def test_a_workdir_without_checkpoints_fails_fast_and_stays_empty(tmp_path, run_dir, no_work):
  workdir = tmp_path / 'empty'
  os.makedirs(workdir)
  for name in ('config.json', 'run.json'):
    os.replace(os.path.join(run_dir, name), workdir / name)
  with pytest.raises(CheckpointNotFoundError) as error:
    evaluate.evaluate_checkpoint(str(workdir))
  assert (error.value.which, error.value.available) == ('best', [])
  with pytest.raises(CheckpointNotFoundError) as error:
    evaluate.evaluate_checkpoint(str(workdir), checkpoint='99')
  assert (error.value.which, error.value.step) == ('99', 99)
  assert 'latest' not in str(error.value)
  assert sorted(os.listdir(workdir)) == ['config.json', 'run.json', 'run.lock']


@pytest.mark.slow  # a second Python process holds the lock
def test_a_training_run_holding_the_workdir_is_waited_for_unless_the_report_goes_elsewhere(
    run_dir, no_work, tmp_path):
  hold = ('import sys, time\nfrom se_resnet_jax.workdir import workdir_lock\n'
          'with workdir_lock(sys.argv[1]):\n  print("locked", flush=True)\n  time.sleep(600)\n')
  proc = subprocess.Popen([sys.executable, '-c', hold, run_dir], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == 'locked'
    with pytest.raises(WorkdirLockedError, match=rf'in use by PID {proc.pid} .*Or pass '
                       '--output_dir outside it'):
      evaluate.evaluate_checkpoint(run_dir)
    with pytest.raises(WorkBegan):  # reading only: no lock needed
      evaluate.evaluate_checkpoint(run_dir, output_dir=str(tmp_path / 'elsewhere'))
  finally:
    proc.kill()
    proc.wait()


def test_an_output_dir_holding_a_report_is_kept_unless_overwrite(run_dir, no_work, tmp_path):
  """One writer for every path a user names (issue 20): an --output_dir's report is replaced only
  with --overwrite; a file named as --output_dir is refused; both before any work."""
  out = tmp_path / 'out'
  os.makedirs(out)
  (out / 'report.json').write_text('{"kept": true}')
  with pytest.raises(files.OutputPathError) as error:
    evaluate.evaluate_checkpoint(run_dir, output_dir=str(out))
  assert error.value.reason == 'exists' and error.value.flag == '--output_dir'
  with pytest.raises(WorkBegan):
    evaluate.evaluate_checkpoint(run_dir, output_dir=str(out), overwrite=True)
  with pytest.raises(files.OutputPathError):
    evaluate.evaluate_checkpoint(run_dir, output_dir=str(out / 'report.json'))
  assert (out / 'report.json').read_text() == '{"kept": true}'
