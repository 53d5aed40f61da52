"""validate_config stops impossible runs with a message that names the field, before any compute."""

import glob
import os
import subprocess
import sys

import ml_collections
import pytest
from conftest import CONFIGS_DIR, REPO, load_config_file

from se_resnet_jax import config as config_lib
from se_resnet_jax import input_pipeline, train
from se_resnet_jax.config import ConfigError, validate_config

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIGS_DIR, '*.py'))
                      if not os.path.basename(p).startswith('_'))


def _config(**changes):
  """base_config() with dotted-name changes, built from a dict so that unknown keys and values of
  the wrong type get through to validate_config (a ConfigDict refuses them on assignment)."""
  tree = config_lib.base_config().to_dict()
  for dotted, value in changes.items():
    *groups, key = dotted.split('.')
    target = tree
    for group in groups:
      target = target[group]
    target[key] = value
  return ml_collections.ConfigDict(tree)


def test_base_config_is_valid():
  validate_config(config_lib.base_config(), device_count=8)


@pytest.mark.parametrize('changes, device_count, message', [
  (dict(dropout_rate=0.5), 1, r"Unknown config key 'dropout_rate'.*learning_rate"),
  ({'model.depth': 18}, 1, r"Unknown config key 'model.depth'.*dropout_rate"),
  ({'augment.blur': 1.0}, 1, r"Unknown config key 'augment.blur'"),
  (dict(batch_size='128'), 1, r"'batch_size' should be a int.*got '128'"),
  (dict(learning_rate='fast'), 1, r"'learning_rate' should be a float"),
  (dict(nesterov=1), 1, r"'nesterov' should be a bool"),
  (dict(num_epochs=True), 1, r"'num_epochs' should be a int"),
  (dict(model=3), 1, r"'model' must be a group of fields"),
  ({'model.dropout_rate': 1.0}, 1, r'model.dropout_rate must be in \[0, 1\), got 1.0'),
  ({'model.dropout_rate': -0.1}, 1, r'model.dropout_rate must be in \[0, 1\), got -0.1'),
  ({'model.num_filters': 8, 'model.se_reduction': 16}, 1,
   r'model.se_reduction: .*r=16 exceeds the 8 channels'),
  ({'model.se_reduction': 24}, 1, r'model.se_reduction: .*r=24 does not divide the 64'),
  ({'model.se_reductions': (16, 16)}, 1, r'model.se_reduction: .*one ratio \(or None\) per stage'),
  (dict(batch_size=100), 8, r'batch_size=100 is not divisible by the 8 devices.*\(e.g. 96\)'),
  (dict(eval_batch_size=1001), 8, r'eval_batch_size=1001 is not divisible by the 8 devices'),
  (dict(dataset='imagenet'), 1, r"Unknown dataset 'imagenet'; choose one of cifar10, cifar100"),
  ({'model.name': 'SEResNet19'}, 1, r"Unknown model.name 'SEResNet19'; choose one of SEResNet18"),
  (dict(learning_rate=-0.1), 1, r'learning_rate must be >= 0, got -0.1'),
  (dict(weight_decay=-1e-4), 1, r'weight_decay must be >= 0'),
  (dict(momentum=1.0), 1, r'momentum must be in \[0, 1\)'),
  (dict(weight_decay_mask='bn'), 1, r'weight_decay_mask'),
  ({'model.kernel_init': 'xavier'}, 1, r'model.kernel_init'),
  (dict(schedule='linear'), 1, r"Unknown schedule 'linear'"),
  (dict(num_epochs=0), 1, r'num_epochs must be >= 1'),
  (dict(validation_size=-5), 1, r'validation_size must be >= 0'),
  ({'augment.hue': 0.9}, 1, r'augment: augment.hue must be in \[0, 0.5\]'),
  ({'early_stopping.enabled': True, 'validation_size': 0}, 1,
   r'early_stopping needs a validation split'),
  # Values that used to pass and train to chance with exit 0, or meet the NaN guard a minute later.
  ({'augment.cutout_size': 100}, 1,
   r'augment.cutout_size=100 is larger than the 32x32 images: .*Use at most 32'),
  (dict(schedule='onecycle', warmup_epochs=150.0, num_epochs=100), 1,
   r'schedule=onecycle warms up for warmup_epochs=150.0 of num_epochs=100; .*\(warmup_epochs < '
   r'num_epochs; 30% of the run is usual: 30\)'),
  (dict(schedule='onecycle', warmup_epochs=100.0, num_epochs=100), 1, r'schedule=onecycle warms'),
  (dict(warmup_epochs=11.0, num_epochs=10), 1,
   r'warmup_epochs=11.0 is longer than the run \(num_epochs=10\)'),
  (dict(learning_rate=float('inf')), 1, r'^learning_rate must be a finite number, got inf\.$'),
  (dict(weight_decay=float('inf')), 1, r'^weight_decay must be a finite number, got inf\.$'),
  (dict(momentum=float('nan')), 1, r'^momentum must be a finite number, got nan\.$'),
  ({'early_stopping.min_delta': float('-inf')}, 1, r'early_stopping.min_delta must be a finite'),
  (dict(lr_decay_epochs=(50, float('inf'))), 1, r'lr_decay_epochs must be a finite number'),
  ({'dataset': 'synthetic', 'synthetic.noise': -1.0}, 1,
   r'synthetic.noise must be >= 0 \(the standard deviation of the noise added to the generated '
   r'images\), got -1.0'),
  ({'dataset': 'synthetic', 'synthetic.num_test': 0}, 1, r'synthetic needs .* 0\.$'),
  (dict(dataset='synthetic', npz_path='missing.npz'), 1,
   r"npz_path='missing.npz' is set, but dataset=synthetic generates its images and would ignore "
   r'it'),
])
def test_impossible_values_are_refused(changes, device_count, message):
  with pytest.raises(ConfigError, match=message):
    validate_config(_config(**changes), device_count=device_count)


def test_config_error_is_a_value_error():
  """Callers catching ValueError (as for the models' own checks) also catch config errors."""
  assert issubclass(ConfigError, ValueError)


def test_divisible_batch_passes_on_eight_devices():
  validate_config(_config(batch_size=256, eval_batch_size=1000), device_count=8)


def test_resnet_baselines_ignore_se_reduction():
  """ResNet* has no SE, so an r that would not fit its channels is not an error."""
  validate_config(_config(**{'model.name': 'ResNet18', 'model.num_filters': 4,
                             'model.se_reduction': 16}))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_and_validates(path):
  config = load_config_file(path)
  validate_config(config, device_count=1)
  validate_config(config, device_count=8)  # every shipped recipe runs on 8 TPU cores as is


def test_config_files_include_the_issue_recipes():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {'cifar10.py', 'cifar100.py', 'study_cifar10.py', 'study_cifar100.py',
          'smoke.py'} <= names


def test_bad_config_stops_train_and_evaluate_before_any_work(tmp_path, monkeypatch):
  """No workdir is created and no data is read for a config that cannot run."""
  def no_loading(config):
    raise AssertionError('load_dataset called for an invalid config')

  monkeypatch.setattr(input_pipeline, 'load_dataset', no_loading)
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match='dropout_rate'):
    train.train_and_evaluate(_config(**{'model.dropout_rate': 1.5}), str(workdir))
  assert not workdir.exists()


@pytest.mark.slow
def test_command_line_reports_impossible_value_in_one_line(tmp_path):
  workdir = tmp_path / 'run'
  out = subprocess.run(
      [sys.executable, '-m', 'se_resnet_jax.main', f'--config={CONFIGS_DIR}/smoke.py',
       f'--workdir={workdir}', '--config.model.dropout_rate=1.5'],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode != 0
  assert 'error: model.dropout_rate must be in [0, 1), got 1.5' in out.stderr
  assert 'Traceback' not in out.stderr
  assert not workdir.exists()
