"""Exports of a trained run load without this library and compute what the library computes."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import (
  command_env,
  copy_exports,
  one_line_error,
  random_variables,
  randomise_batch_stats,
  run_command,
)
from flax import traverse_util

from se_resnet_jax import export, inference, models, rundir, steps

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def readme_snippet(heading: str) -> str:
  """The first python block under a README heading: the users' code, run as written."""
  section = README.read_text().split(heading, 1)[1]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


@pytest.fixture(scope='module')
def exports(tiny_run_exports, tmp_path_factory):
  """Both formats of the tiny run, named as the README names them, with their model cards, and
  the cards `export.export_run` returned."""
  directory = tmp_path_factory.mktemp('exports')
  copy_exports(tiny_run_exports, directory)
  return directory, json.loads((tiny_run_exports / 'cards.json').read_text())


def library_outputs(workdir: str, images: np.ndarray) -> tuple:
  run = rundir.restore_run(workdir, 'best')
  return inference.reference_outputs(run.model, run.variables, run.record.mean, run.record.std,
                                     images)


def assert_same_outputs(outputs: tuple, reference: tuple) -> None:
  """The export's stated tolerance: 1e-4 of the largest logit, 1e-5 on probabilities."""
  check = export.compare(outputs, reference)
  assert check['passed'], check


def test_model_card_says_what_the_file_holds(exports, tiny_run):
  directory, cards = exports
  with open(os.path.join(tiny_run, 'report.json')) as f:
    report = json.load(f)
  for fmt, card in cards.items():
    with open(directory / f'cifar10.{fmt}.json') as f:
      assert json.load(f) == json.loads(json.dumps(card))
    assert card['class_names'] == report['class_names']
    assert card['test_accuracy'] == report['test']['accuracy']
    assert card['input'] == {'name': 'images', 'dtype': 'uint8', 'shape': [None, 32, 32, 3],
                             'layout': 'NHWC', 'channels': 'RGB', 'range': [0, 255]}
    assert card['model']['name'] == 'SEResNet18' and card['model']['num_filters'] == 4
    assert card['check']['passed'] and card['check']['source'] == 'generated'
    assert card['check']['images'] == export.CHECK_IMAGES  # no dataset needed
  assert {'cpu', 'cuda'} <= set(cards['jax']['platforms'])


@pytest.mark.slow  # a fresh Python process
@pytest.mark.parametrize('fmt, heading, call', [
    ('jax', '### Load it with jax alone', 'model.call(images)'),
    ('onnx', '### ONNX', "session.run(None, {'images': images})")])
def test_export_runs_in_a_process_without_the_library(exports, tiny_run, fmt, heading,
                                                      call):
  """The README's loading code, in a fresh process that never imports se_resnet_jax."""
  directory, _ = exports
  images = np.random.RandomState(0).randint(0, 256, (7, 32, 32, 3), np.uint8)
  np.save(directory / 'images.npy', images)
  script = readme_snippet(heading) + (
      "\nimages = np.load('images.npy')"
      f"\nlogits, probabilities = {call}"
      "\nnp.savez('outputs.npz', logits=np.asarray(logits),"
      " probabilities=np.asarray(probabilities))"
      "\nimport sys"
      "\nassert not [m for m in sys.modules if m.startswith('se_resnet_jax')], 'imported'\n")
  env = command_env()
  env['PYTHONPATH'] = ''  # the library is not even importable from the checkout
  result = subprocess.run([sys.executable, '-c', script], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  with np.load(directory / 'outputs.npz') as out:
    outputs = (out['logits'], out['probabilities'])
  assert outputs[0].shape == (7, 10)
  assert_same_outputs(outputs, library_outputs(tiny_run, images))


def test_a_mismatch_fails_the_export_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
  def wrong(*args, **kwargs):
    logits, probabilities = real(*args, **kwargs)
    return logits + 0.01, probabilities

  real = inference.reference_outputs
  monkeypatch.setattr(inference, 'reference_outputs', wrong)
  with pytest.raises(export.ExportError, match='does not compute what the library does'):
    export.export_run(tiny_run, 'jax', str(tmp_path / 'm.jax'))
  assert os.listdir(tmp_path) == []


def test_folding_batch_norm_keeps_the_function_of_a_bottleneck_network():
  """SE-ResNet50's bottleneck units and projections fold as SE-ResNet18's do (in the run)."""
  model = models.SEResNet50(num_classes=10, num_filters=4, se_reduction=4)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  variables = randomise_batch_stats(random_variables(model, x, train=False))
  folded = inference.fold_batch_norm(model, variables)
  flat = traverse_util.flatten_dict(folded['params'])
  norms = {key[:-1] for key in traverse_util.flatten_dict(variables['batch_stats'])}
  assert len(norms) == 1 + 16 * 3 + 4  # stem, 3 per unit, 4 projections: every one folded
  assert all((*n, 'scale') not in flat and (*n, 'bias') in flat for n in norms)
  assert set(folded) == {'params'}
  expected = model.apply(variables, x, train=False)
  got = jax.jit(lambda v, x: inference.apply_folded(model, v, x))(folded, x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize('tta_flip', [False, True])
def test_the_exported_function_is_what_the_evaluation_step_evaluates(tta_flip):
  """Its logits give the evaluation step's predictions and losses, flip-averaged or not."""
  model = models.SEResNet18(num_classes=10, num_filters=4, se_reduction=4)
  images = np.random.RandomState(1).randint(0, 256, (8, 32, 32, 3), np.uint8)
  labels = np.arange(8, dtype=np.int32) % 10
  variables = randomise_batch_stats(random_variables(model, jnp.zeros((1, 32, 32, 3)),
                                                     train=False))
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  config = ml_collections.ConfigDict({'half_precision': False, 'tta_flip': tta_flip})
  _, predictions, _, losses = steps.make_eval_step(config, model, mean, std)(
      variables, images, labels, np.ones(8, bool))
  logits, probabilities = jax.jit(inference.inference_function(
      model, variables, mean, std, tta_flip=tta_flip))(images)
  np.testing.assert_array_equal(np.argmax(logits, -1), predictions)
  np.testing.assert_allclose(-np.log(probabilities[np.arange(8), labels]), losses, atol=1e-5)


def test_a_batch_norm_without_a_convolution_before_it_stays_an_affine_map():
  class NormFirst(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Conv(2, (1, 1))(nn.BatchNorm(use_running_average=True)(x))

  model = NormFirst()
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 4, 4, 3)), jnp.float32)
  variables = randomise_batch_stats(random_variables(model, x))
  folded = inference.fold_batch_norm(model, variables, (4, 4, 3))
  assert set(folded['params']['BatchNorm_0']) == {'scale', 'bias'}
  np.testing.assert_allclose(inference.apply_folded(model, folded, x), model.apply(variables, x),
                             atol=1e-5)


@pytest.mark.parametrize('name, options', [
    ('SEResNet20', dict(num_filters=4, se_reduction=2)),  # option A shortcuts
    ('SEWRN16_8', dict(num_filters=2, se_reduction=4)),
    ('SEResNet164', dict(num_filters=2, se_reduction=4, stage_sizes=[1, 1, 1])),
    # widen 1: the first unit's shortcut is the stem's output itself, which must not be folded
    ('SEWRN16_8', dict(num_filters=4, se_reduction=4, widen_factor=1)),
])
def test_folding_keeps_the_function_of_the_cifar_networks(name, options):
  """Pre-activation units: the BatchNorm after a unit's inner convolution folds into it; the one
  that starts each unit and the final one normalise sums and stay per-channel affine maps."""
  model = models.create_model(name, num_classes=10, **options)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  variables = randomise_batch_stats(random_variables(model, x, train=False))
  folded = inference.fold_batch_norm(model, variables)
  flat = traverse_util.flatten_dict(folded['params'])
  scales = {k[:-1] for k in flat if k[-1] == 'scale'}
  if isinstance(model, models.PreActResNet):  # unit-input BatchNorms and bn_final stay affine
    assert scales == {(f'{model.block_cls.__name__}_{i}', 'BatchNorm_0')
                      for i in range(sum(model.stage_sizes))} | {('bn_final',)}
  else:
    assert not scales
  expected = model.apply(variables, x, train=False)
  got = jax.jit(lambda v, x: inference.apply_folded(model, v, x))(folded, x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


@pytest.mark.slow  # runs the command in a subprocess
def test_the_command_writes_both_files_and_refuses_to_overwrite(tiny_run, tmp_path):
  out = str(tmp_path / 'model.jax')
  result = run_command('export', f'--workdir={tiny_run}', '--format=jax', f'--out={out}')
  assert result.returncode == 0, result.stderr
  assert 'Wrote' in result.stdout and 'top-1 agreement 100.00%' in result.stdout
  written = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
  assert set(written) == {'model.jax', 'model.jax.json'}
  error = one_line_error(run_command('export', f'--workdir={tiny_run}', '--format=onnx',
                                     f'--out={out}'))
  assert 'already exists; pass --overwrite' in error
  assert {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)} == written


@pytest.mark.slow  # runs the command in a subprocess
def test_a_workdir_without_checkpoints_is_one_line(tmp_path):
  one_line_error(run_command('export', f'--workdir={tmp_path}', '--format=jax',
                             f'--out={tmp_path / "m.jax"}'))
  assert os.listdir(tmp_path) == []  # nothing created in it either


def test_a_card_states_an_accuracy_only_for_the_weights_it_holds(tiny_run, tmp_path):
  """Issue 20 (2): a card of an early step copied the best step's test accuracy from report.json.
  Here the report names another step of the run than the checkpoint exported."""
  with open(os.path.join(tiny_run, 'report.json')) as f:
    report = json.load(f)
  run = rundir.restore_run(tiny_run, 'best')
  assert rundir.report_test_accuracy(tiny_run, run.step, run.run_id) == (
      report['test']['accuracy'], 'report.json')

  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run, workdir)
  report['weights']['step'] = report['step'] = 99  # a report of another step
  with open(workdir / 'report.json', 'w') as f:
    json.dump(report, f)
  run = rundir.restore_run(str(workdir), 'best')
  card = export.model_card(run, str(workdir), 'jax', str(tmp_path / 'm.jax'), {})
  assert card['test_accuracy'] is None
  assert card['checkpoint'] == {'which': 'best', 'step': run.step, 'run_id': run.run_id}


def test_convert_to_torch_refuses_an_existing_file_and_names_the_weights(tiny_run,
                                                                          tmp_path):
  """Issue 20 (3): --to_torch replaced any file (a notes file became a state dict, exit 0)."""
  import torch
  from safetensors import safe_open

  from se_resnet_jax import convert, files

  notes = tmp_path / 'notes.pth'
  notes.write_text('my notes')
  with pytest.raises(files.OutputPathError) as error:
    convert.export_torch_weights(tiny_run, str(notes))
  assert (error.value.reason, error.value.flag) == ('exists', '--to_torch')
  assert notes.read_text() == 'my notes'
  with pytest.raises(files.OutputPathError) as error:
    convert.export_torch_weights(tiny_run, str(tmp_path / 'missing' / 'w.pth'))
  assert error.value.reason == 'no_directory'

  run = rundir.restore_run(tiny_run)
  run_id, step = run.run_id, run.step
  convert.export_torch_weights(tiny_run, str(notes), overwrite=True)
  assert torch.load(notes, weights_only=True).se_resnet_jax == {
      'run_id': run_id, 'step': str(step), 'checkpoint': 'best', 'library': 'se_resnet_jax'}
  convert.export_torch_weights(tiny_run, str(tmp_path / 'w.safetensors'))
  with safe_open(str(tmp_path / 'w.safetensors'), 'pt') as f:
    assert (f.metadata()['run_id'], f.metadata()['step']) == (run_id, str(step))
