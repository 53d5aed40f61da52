"""The training loop end to end (issue 3), on a network 8 channels wide and a few hundred images.

One uninterrupted run (module fixture) serves three checks: it learns, it leaves checkpoints,
TensorBoard events and report.json behind, and it is the reference that an interrupted and resumed
run must reproduce exactly. The resumed run reuses its compiled programs through the compilation
cache that conftest.py sets up.
"""

import io
import json
import os
import shutil
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_RUN, abstract_state, random_variables
from flax import traverse_util

from se_resnet_jax import config as config_lib
from se_resnet_jax import files, input_pipeline, sharding, steps, summary, train
from se_resnet_jax import report as report_lib
from se_resnet_jax.checkpoints import RunCheckpoints
from se_resnet_jax.console import Console
from se_resnet_jax.errors import Preempted
from se_resnet_jax.models import ResidualBlock, SEResNet

EPOCHS = 6
STEPS_PER_EPOCH = 16  # 512 training images (640 generated - 128 validation) in batches of 32
INTERRUPT_AT = 24  # mid-way through the second epoch
# Measured: 0.75 test accuracy on the 200 generated test images (10 classes, chance 0.10).
MIN_TEST_ACCURACY = 0.5


def _learning_config(make_tiny_config):
  # no flip: the generated classes are colour layouts, and a mirrored layout is another class
  return make_tiny_config(num_epochs=EPOCHS, **{'augment.flip': False})


@pytest.fixture(scope='module')
def reference_run(make_tiny_config, tmp_path_factory):
  config = _learning_config(make_tiny_config)
  workdir = str(tmp_path_factory.mktemp('reference'))
  return config, workdir, train.train_and_evaluate(config, workdir)


def _read_report(workdir):
  with open(os.path.join(workdir, 'report.json')) as f:
    return json.load(f)


def _restore_latest(config, workdir):
  """The latest checkpoint's TrainState, restored onto an abstract target (no initialisation)."""
  target = abstract_state(config)
  ckpts = RunCheckpoints(workdir)
  try:
    return ckpts.restore(target)
  finally:
    ckpts.close()


# ---------------------------------------------------------------------------------------------
# End to end on generated data.


def test_tiny_network_learns_generated_data(reference_run):
  _, _, result = reference_run
  print('test accuracy', result['test']['accuracy'])
  assert result['test']['accuracy'] >= MIN_TEST_ACCURACY, result['test']['accuracy']
  assert result['validation']['accuracy'] >= MIN_TEST_ACCURACY
  history = _read_report(reference_run[1])['history']
  assert [row['epoch'] for row in history] == list(range(1, EPOCHS + 1))
  assert history[-1]['train_loss'] < history[0]['train_loss']


def test_run_writes_report_checkpoints_and_tensorboard_events(reference_run):
  config, workdir, result = reference_run
  report = _read_report(workdir)
  for split, n in (('validation', 128), ('test', 200)):
    assert set(report[split]) >= {'accuracy', 'loss'}
    assert report[split]['accuracy'] == pytest.approx(result[split]['accuracy'])
    assert 0.0 < report[split]['loss'] < 10.0
    # eval batches of 48 divide neither split: the padded examples must not be counted
    assert report[split]['num_examples'] == n
    assert np.sum(report[split]['confusion_matrix']) == n
  assert report['config'] == json.loads(json.dumps(config.to_dict()))
  assert report['epochs_completed'] == EPOCHS
  # the report evaluates the best-validation weights, and says which step they are from
  assert report['step'] == report['best_epoch'] * STEPS_PER_EPOCH

  final = EPOCHS * STEPS_PER_EPOCH
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  ckpts = RunCheckpoints(workdir)
  best = ckpts.latest_step('best')
  ckpts.close()
  # one directory: the latest keep_checkpoints steps, and the best one when it is older
  assert steps[-config.keep_checkpoints:] == [final - i * STEPS_PER_EPOCH
                                              for i in reversed(range(config.keep_checkpoints))]
  assert set(steps) == set(steps[-config.keep_checkpoints:]) | {best}
  assert best % STEPS_PER_EPOCH == 0 and best == report['step']

  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert events, os.listdir(workdir)
  content = b''.join(open(os.path.join(workdir, f), 'rb').read() for f in events)
  for tag in (b'train_loss', b'val_accuracy', b'learning_rate'):
    assert tag in content, tag


def test_interrupted_and_resumed_run_matches_uninterrupted(reference_run, tmp_path):
  """SIGTERM mid-epoch: the loop checkpoints and stops; the rerun finishes bit for bit alike."""
  config, reference_dir, reference = reference_run
  workdir = str(tmp_path / 'interrupted')

  def kill(step, state):
    if step == INTERRUPT_AT:
      # only with the loop's handler in place: the default action would end pytest itself
      assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(Preempted) as stopped:
    train.train_and_evaluate(config, workdir, hooks=[kill])
  assert (stopped.value.step, stopped.value.workdir) == (INTERRUPT_AT, workdir)
  assert not os.path.exists(os.path.join(workdir, 'report.json'))
  assert str(INTERRUPT_AT) in os.listdir(os.path.join(workdir, 'checkpoints'))

  resumed = train.train_and_evaluate(config, workdir)
  final_state, meta = _restore_latest(config, workdir)
  reference_state, reference_meta = _restore_latest(config, reference_dir)
  assert int(final_state.step) == EPOCHS * STEPS_PER_EPOCH
  jax.tree.map(np.testing.assert_array_equal,
               (final_state.params, final_state.batch_stats, final_state.opt_state),
               (reference_state.params, reference_state.batch_stats, reference_state.opt_state))
  for split in ('validation', 'test'):
    assert resumed[split]['accuracy'] == reference[split]['accuracy']
    assert resumed[split]['loss'] == reference[split]['loss']
  assert ([row['val_loss'] for row in meta['history']]
          == [row['val_loss'] for row in reference_meta['history']])
  # The interrupted epoch's training metrics and timing cover all of its steps (issue 20: they
  # covered only those after the resume), in the report as in the checkpoints.
  history, reference_history = _read_report(workdir)['history'], _read_report(reference_dir)[
      'history']
  for key in ('train_loss', 'train_accuracy', 'learning_rate'):
    assert [row[key] for row in history] == [row[key] for row in reference_history], key
  for row in history:
    assert row['train_images_per_s'] * row['epoch_time_s'] == pytest.approx(
        STEPS_PER_EPOCH * config.batch_size), row


# ---------------------------------------------------------------------------------------------
# Through tfds (mock data).


def test_few_steps_on_mock_tfds_cifar10(make_tiny_config, tmp_path, monkeypatch):
  """CIFAR-10 through tfds; CIFAR-100 goes through the loop on 8 devices (test_multidevice.py)."""
  tfds = pytest.importorskip('tensorflow_datasets')
  # The session run's network and sizes on the 5-epoch schedule of the runs that train it further
  # (test_console, test_reliability): the normalisation is an argument of the train step, so
  # tfds's other images still load that compiled step.
  config = make_tiny_config(**{**TINY_RUN, 'num_epochs': 5, 'max_steps': 2})
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  with tfds.testing.mock_data(num_examples=TINY_RUN['synthetic.num_train']):
    result = train.train_and_evaluate(config, str(tmp_path))
  report = _read_report(str(tmp_path))
  assert report['step'] == 2
  assert report['config']['dataset'] == 'cifar10'
  assert len(report['class_names']) == 10
  for split, n in (('validation', 128), ('test', 384)):
    assert 0.0 <= report[split]['accuracy'] <= 1.0 and np.isfinite(report[split]['loss'])
    assert report[split]['num_examples'] == n
    assert np.shape(report[split]['confusion_matrix']) == (10, 10)
    assert report[split]['accuracy'] == pytest.approx(result[split]['accuracy'])


# ---------------------------------------------------------------------------------------------
# Evaluation counts each example once.


def test_shard_eval_split_pads_and_masks_the_last_batch():
  rs = np.random.RandomState(0)
  split = input_pipeline.Split(rs.randint(0, 256, (50, 4, 4, 3)).astype(np.uint8),
                               np.arange(50, dtype=np.int32))
  mesh = jax.make_mesh((1,), ('data',))
  images, labels, mask = (np.asarray(a) for a in sharding.shard_eval_split(split, mesh, 16))
  assert images.shape == (4, 16, 4, 4, 3) and labels.shape == mask.shape == (4, 16)
  assert mask.sum() == 50
  np.testing.assert_array_equal(labels.reshape(-1)[mask.reshape(-1)], split.labels)
  np.testing.assert_array_equal(images.reshape(-1, 4, 4, 3)[:50], split.images)
  assert not mask[-1, 2:].any() and mask[-1, :2].all()


class _Linear(nn.Module):
  """A model small enough to compile instantly, with the SEResNet call signature."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    return nn.Dense(5)(x.reshape((x.shape[0], -1)))


def test_evaluate_returns_each_example_once_and_averages_over_real_examples():
  rs = np.random.RandomState(1)
  n = 37
  split = input_pipeline.Split(rs.randint(0, 256, (n, 4, 4, 3)).astype(np.uint8),
                               rs.randint(0, 5, n).astype(np.int32))
  config = config_lib.base_config()
  model, mean, std = _Linear(), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  chunks = sharding.shard_eval_split(split, jax.make_mesh((1,), ('data',)), 16)
  metrics, (pred, in_top5, losses) = steps.evaluate(
      steps.make_eval_step(config, model, mean, std), variables, chunks)

  x = (split.images / 255.0 - np.array(mean)) / np.array(std)
  logits = np.asarray(model.apply(variables, jnp.asarray(x, jnp.float32)))
  expected_losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits), jnp.asarray(split.labels)))
  assert pred.shape == losses.shape == in_top5.shape == (n,)
  np.testing.assert_array_equal(pred, logits.argmax(-1))
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-4, atol=1e-5)
  assert in_top5.all()  # 5 classes: the label is always among the top 5
  assert metrics['accuracy'] == pytest.approx(np.mean(pred == split.labels), abs=1e-6)
  assert metrics['loss'] == pytest.approx(expected_losses.mean(), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Optimizer and schedules.


def _schedule_config(**changes):
  config = config_lib.base_config()
  config.learning_rate, config.num_epochs = 0.1, 10
  for key, value in changes.items():
    config[key] = value
  return config


def test_weight_decay_skips_batchnorm_and_biases():
  """With zero gradients, only the decay moves parameters: exactly the conv and dense kernels."""
  config = _schedule_config(weight_decay=0.01, schedule='constant', warmup_epochs=0.0,
                            nesterov=False)
  model = SEResNet(stage_sizes=(1, 1), block_cls=ResidualBlock, num_classes=3, num_filters=4,
                   se_reduction=2)
  params = random_variables(model, jnp.zeros((1, 8, 8, 3)), train=False)['params']
  tx = steps.create_optimizer(config, steps.create_learning_rate_schedule(config, 10))

  @jax.jit  # one program, not one compile per parameter shape
  def step(params):
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return optax.apply_updates(params, updates)

  new = step(params)
  flat_old, flat_new = traverse_util.flatten_dict(params), traverse_util.flatten_dict(new)
  decayed = {'/'.join(k) for k in flat_old if not np.array_equal(flat_old[k], flat_new[k])}
  kernels = {'/'.join(k) for k in flat_old if k[-1] == 'kernel'}
  assert decayed == kernels
  assert any('SEBlock' in k for k in kernels) and any('conv_proj' in k for k in kernels)
  for k in flat_old:
    if k[-1] == 'kernel':  # SGD step on the L2 term: p - lr * wd * p
      np.testing.assert_allclose(flat_new[k], flat_old[k] * (1 - 0.1 * 0.01), rtol=1e-6)
  assert {k[-1] for k in flat_old} - {'kernel'} == {'scale', 'bias'}


def test_cosine_schedule_with_warmup():
  schedule = steps.create_learning_rate_schedule(
      _schedule_config(schedule='cosine', warmup_epochs=1.0), steps_per_epoch=10)
  # linear warmup over 10 steps, then cosine over the remaining 90
  for step, lr in ((0, 0.0), (5, 0.05), (10, 0.1), (55, 0.05), (100, 0.0)):
    assert float(schedule(step)) == pytest.approx(lr, abs=1e-6), step
  assert float(schedule(30)) == pytest.approx(0.05 * (1 + np.cos(np.pi * 20 / 90)), rel=1e-5)


@pytest.mark.parametrize('warmup_epochs', [0.0, 1.0])
def test_multistep_schedule_decays_at_the_epochs_given(warmup_epochs):
  schedule = steps.create_learning_rate_schedule(
      _schedule_config(schedule='multistep', warmup_epochs=warmup_epochs, lr_decay_epochs=(5, 8),
                       lr_decay_factor=0.1), steps_per_epoch=10)
  expected = {49: 0.1, 50: 0.01, 79: 0.01, 80: 0.001, 99: 0.001}
  if warmup_epochs:
    expected.update({0: 0.0, 5: 0.05, 10: 0.1})  # the boundaries stay at epochs 5 and 8
  else:
    expected[0] = 0.1
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-5, abs=1e-9), step


def test_onecycle_schedule():
  schedule = steps.create_learning_rate_schedule(
      _schedule_config(schedule='onecycle', warmup_epochs=3.0), steps_per_epoch=10)
  # optax's one-cycle: from lr/25 up to lr at 30% of the 100 steps, then down to lr/25/1e4
  assert float(schedule(0)) == pytest.approx(0.1 / 25, rel=1e-5)
  assert float(schedule(30)) == pytest.approx(0.1, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)
  assert float(schedule(15)) < float(schedule(30)) and float(schedule(65)) < float(schedule(30))


def test_ctrl_c_during_the_final_evaluation_ends_at_once(finished_copy, tiny_config, monkeypatch):
  """Issue 20 (10): the handler said it would save, saved nothing, evaluated on and exited 0.
  Training is over by then (every checkpoint saved): the Ctrl-C raises KeyboardInterrupt, which
  the commands turn into exit 130. The run here is finished but for its report."""
  os.remove(os.path.join(finished_copy, 'report.json'))
  checkpoints = sorted(os.listdir(os.path.join(finished_copy, 'checkpoints')))
  original = report_lib.final_report

  def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return original(*args, **kwargs)

  monkeypatch.setattr(report_lib, 'final_report', interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config, finished_copy, console=Console(io.StringIO()))
  assert not os.path.exists(os.path.join(finished_copy, 'report.json'))
  assert sorted(os.listdir(os.path.join(finished_copy, 'checkpoints'))) == checkpoints


# ---------------------------------------------------------------------------------------------
# Rerunning a finished run (issue 20): answered from its report only for the very same run.


@pytest.fixture
def tiny_config(tiny_run_result):
  """A copy of the config the session's tiny run was trained with."""
  return tiny_run_result.config.copy_and_resolve_references()


@pytest.fixture
def finished_copy(tiny_run, tmp_path):
  workdir = tmp_path / 'finished'
  shutil.copytree(tiny_run, workdir)
  return str(workdir)


def test_a_damaged_report_is_evaluated_again_without_compiling_the_train_step(
    finished_copy, tiny_config):
  """Issue 20 (6): a truncated report.json ended in a JSONDecodeError traceback. A run at its
  last step has nothing to train: its train step is not compiled (it took 12-15 s)."""
  expected = _read_report(finished_copy)
  path = os.path.join(finished_copy, 'report.json')
  with open(path, 'r+') as f:
    f.truncate(os.path.getsize(path) // 2)
  stream = io.StringIO()
  result = train.train_and_evaluate(tiny_config, finished_copy,
                                    console=Console(stream, enabled=True))
  assert 'Compiled the train step' not in stream.getvalue(), stream.getvalue()
  assert result['test']['accuracy'] == expected['test']['accuracy']
  assert _read_report(finished_copy)['run_id'] == expected['run_id']


def test_a_lost_report_md_is_written_again(finished_copy, tiny_config):
  os.remove(os.path.join(finished_copy, 'report.md'))
  result = train.train_and_evaluate(tiny_config, finished_copy,
                                    console=Console(io.StringIO()))
  with open(os.path.join(finished_copy, 'report.md')) as f:
    assert f'run {result["run_id"]}' in f.read()


def test_a_finished_run_is_not_shortened_silently(finished_copy, tiny_config):
  """It reported 'Epochs completed: 2 of 1' without a word."""
  tiny_config.max_steps = 2
  with pytest.raises(config_lib.ConfigError):
    train.train_and_evaluate(tiny_config, finished_copy, console=Console(io.StringIO()))
  assert _read_report(finished_copy)['training']['steps'] == 32


def test_a_finished_run_answers_only_for_its_data_and_its_checkpoints(tmp_path,
                                                                      make_tiny_config):
  """Issue 20 (5): npz_path is rerun-neutral, so another --config.npz_path got the old numbers."""
  config = make_tiny_config(dataset='cifar10', npz_path=str(tmp_path / 'a.npz'))
  workdir = tmp_path / 'run'
  os.makedirs(workdir / 'checkpoints' / '16')
  files.write_json_atomic(str(workdir / 'report.json'), {
      'config': config.to_dict(), 'data': input_pipeline.data_identity(config), 'step': 16,
      'weights': {'epoch': 1, 'step': 16, 'run_id': 'abc'}})
  assert summary.finished_report(str(workdir), config)['step'] == 16
  moved = make_tiny_config(dataset='cifar10', npz_path=str(tmp_path / 'b.npz'))
  with pytest.raises(summary.FinishedRunError) as error:
    summary.finished_report(str(workdir), moved)
  assert error.value.reason == 'data' and 'b.npz' in str(error.value)
  assert summary.finished_report(str(workdir), moved, allow_changed_data=True) is None
  os.rmdir(workdir / 'checkpoints' / '16')
  with pytest.raises(summary.FinishedRunError) as error:
    summary.finished_report(str(workdir), config)
  assert error.value.reason == 'checkpoints'


def test_the_tensorboard_command_quotes_a_path_with_spaces(tmp_path):
  workdir = tmp_path / 'my run'
  os.makedirs(workdir)
  (workdir / 'events.out.tfevents.1').write_bytes(b'')
  report = {'epochs_completed': 1, 'weights': {'epoch': 1, 'step': 8, 'run_id': 'r1',
                                                'chosen_by': 'the last epoch'}}
  text = summary.closing_summary(str(workdir), report)
  assert f"tensorboard --logdir '{workdir}'" in text, text
