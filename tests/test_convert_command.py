"""`python -m se_resnet_jax.convert` (issue 11): PyTorch weights become a run that
`se_resnet_jax.evaluate` reports on, and a run's best weights become a PyTorch file.

The network is SE-ResNet18 four channels wide with a ReLU before each SE block (the option a
converted PyTorch model needs, recorded in the checkpoint's architecture) on generated data. The
report's test loss and accuracy must be those of the PyTorch model on the same images.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CONFIGS_DIR, REPO, load_config_file
from safetensors.torch import load_file

from se_resnet_jax import convert, input_pipeline, torch_models
from se_resnet_jax.checkpoints import CheckpointError, DamagedCheckpointError
from se_resnet_jax.config import architecture
from se_resnet_jax.evaluate import evaluate_checkpoint

pytestmark = pytest.mark.slow  # the convert and evaluate commands run in subprocesses
torch.set_num_threads(2)
OVERRIDES = {'synthetic.num_train': 256, 'synthetic.num_test': 64, 'validation_size': 64,
             'eval_batch_size': 64, 'measure_inference': False, 'model.num_filters': 4,
             'model.se_reduction': 2, 'model.dropout_rate': 0.0, 'model.relu_before_se': True}
OPTIONS = dict(num_classes=10, num_filters=4, se_reduction=2, relu_before_se=True)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # what the PyTorch model used
NORMALISATION = ('--mean=' + ','.join(map(str, MEAN)), '--std=' + ','.join(map(str, STD)))


def small_config(**changes):
  config = load_config_file(os.path.join(CONFIGS_DIR, 'smoke.py'))
  for dotted, value in {**OVERRIDES, **changes}.items():
    *groups, key = dotted.split('.')
    target = config
    for group in groups:
      target = target[group]
    target[key] = value
  return config


def run_convert(*flags) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-m', 'se_resnet_jax.convert', *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


def config_flags(**changes) -> list:
  return ['--config=configs/smoke.py'] + [f'--config.{k}={v}'
                                          for k, v in {**OVERRIDES, **changes}.items()]


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """(PyTorch model, its file, the run directory the command wrote)."""
  tmp = tmp_path_factory.mktemp('convert')
  torch.manual_seed(0)
  model = torch_models.create_model('SEResNet18', **OPTIONS)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():  # random BatchNorm statistics and scales, as a trained network has
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=generator)
        m.running_mean.normal_(0.0, 0.2, generator=generator)
        m.running_var.uniform_(0.5, 2.0, generator=generator)
  path = str(tmp / 'weights.pth')
  torch.save({'model': model.state_dict(), 'epoch': 7}, path)
  workdir = str(tmp / 'run')
  result = run_convert(f'--from_torch={path}', f'--workdir={workdir}', *NORMALISATION,
                       *config_flags())
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'python -m se_resnet_jax.evaluate --workdir={workdir}' in result.stdout
  return model.eval(), path, workdir


def test_evaluate_reports_the_pytorch_model(converted):
  model, _, workdir = converted
  result = evaluate_checkpoint(workdir, split='test')
  data = input_pipeline.load_dataset(small_config())
  x = (data.test.images / np.float32(255) - np.asarray(MEAN, np.float32)) / np.asarray(
      STD, np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(x.astype(np.float32).transpose(0, 3, 1, 2)))
  labels = torch.from_numpy(data.test.labels.astype(np.int64))
  assert result['test']['accuracy'] == pytest.approx(
      float((logits.argmax(1) == labels).float().mean()), abs=1e-9)
  assert result['test']['loss'] == pytest.approx(
      float(torch.nn.functional.cross_entropy(logits, labels)), abs=1e-5)
  assert os.path.exists(os.path.join(workdir, 'evaluation', 'best-0', 'report.json'))


def test_a_run_records_relu_before_se_and_refuses_the_other_layout(converted):
  _, path, workdir = converted
  with_relu, without = small_config(), small_config(**{'model.relu_before_se': False})
  assert architecture(with_relu, 10)['relu_before_se'] is True
  assert architecture(without, 10) == {**architecture(with_relu, 10), 'relu_before_se': False}
  with pytest.raises(CheckpointError) as error:  # another network: refused, not called damaged
    evaluate_checkpoint(workdir, config=without)
  assert not isinstance(error.value, DamagedCheckpointError)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  with pytest.raises(CheckpointError):
    convert.import_torch_weights(path, with_relu, workdir, MEAN, STD)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_to_torch_writes_the_run_weights(converted, tmp_path):
  model, _, workdir = converted
  out = str(tmp_path / 'back.pth')
  result = run_convert(f'--to_torch={out}', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "create_model('SEResNet18', num_classes=10, num_filters=4, se_reduction=2, " \
         'relu_before_se=True)' in result.stdout
  safetensors_path = str(tmp_path / 'back.safetensors')
  convert.export_torch_weights(workdir, safetensors_path)
  for state_dict in (torch.load(out), load_file(safetensors_path)):
    twin = torch_models.create_model('SEResNet18', **OPTIONS)
    twin.load_state_dict(state_dict)
    for name, tensor in model.state_dict().items():
      if not name.endswith('num_batches_tracked'):
        assert torch.equal(twin.state_dict()[name], tensor), name


def test_command_errors_are_one_line(converted, tmp_path):
  _, path, _ = converted
  result = run_convert(f'--from_torch={path}', f'--workdir={tmp_path / "run"}', *NORMALISATION,
                       *config_flags(**{'synthetic.num_classes': 100}))
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert 'linear.weight: expected shape (100, 32), found (10, 32)' in result.stderr
  assert 'fit: num_classes=10.' in result.stderr
  assert not os.path.exists(tmp_path / 'run')  # nothing written
  result = run_convert(f'--from_torch={path}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 1 and 'error: --from_torch needs --config' in result.stderr
