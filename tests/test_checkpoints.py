"""Checkpoints are verified when read back: damage is found, named, and skipped on resume.

The states here are small dicts of numpy arrays: what is under test is the files and the
bookkeeping around them, which do not depend on the network.
"""

import glob
import os

import numpy as np
import pytest
from absl import logging as absl_logging

from se_resnet_jax import checkpoints
from se_resnet_jax.checkpoints import CheckpointError, DamagedCheckpointError, RunCheckpoints

ARCH = {'name': 'SEResNet18', 'num_filters': 4}


def _state(step: int) -> dict:
  rs = np.random.RandomState(step)
  return {'params': {'kernel': rs.normal(size=(128, 128)).astype(np.float32),
                     'bias': rs.normal(size=(128,)).astype(np.float32)},
          'step': np.int32(step)}


def _meta(step: int, best_val_accuracy=None) -> dict:
  return {'epoch': step, 'best_val_accuracy': best_val_accuracy, 'architecture': ARCH}


def _run(workdir, steps=(1, 2, 3), best=(), keep=3) -> None:
  """A run's checkpoints: `steps` saved in order, those in `best` as new bests."""
  ckpts = RunCheckpoints(str(workdir), keep)
  accuracy = 0.0
  for step in steps:
    if step in best:
      accuracy += 0.1
    ckpts.save(step, _state(step), _meta(step, accuracy or None), best=step in best)
  ckpts.close()


def _data_file(workdir, step: int, where: str = 'checkpoints') -> str:
  """The largest array file of a step: the one holding the kernel."""
  files = glob.glob(os.path.join(str(workdir), where, str(step), 'state', '**', 'd', '*'),
                    recursive=True)
  return max(files, key=os.path.getsize)


def _flip_byte(path: str, offset: int = 10000) -> None:
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0x01]))


def _zero_block(path: str, offset: int = 4096, size: int = 4096) -> None:
  with open(path, 'r+b') as f:
    f.seek(offset)
    f.write(b'\0' * size)


@pytest.fixture
def warnings(caplog):
  """A function returning the warnings this library's checkpoints module has logged so far."""
  return lambda: [r.getMessage() for r in caplog.records
                  if r.levelname == 'WARNING' and r.pathname == checkpoints.__file__]


def test_a_flipped_byte_is_named_not_restored(tmp_path):
  """Orbax alone restores this silently, one weight changed."""
  _run(tmp_path)
  _flip_byte(_data_file(tmp_path, 3))
  ckpts = RunCheckpoints(str(tmp_path))
  with pytest.raises(DamagedCheckpointError, match=r'checkpoints/3 is damaged: state/.* does not '
                     r'match its checksum'):
    ckpts.restore(None)
  state, meta = ckpts.restore(None, step=2)  # the others are fine
  np.testing.assert_array_equal(state['params']['kernel'], _state(2)['params']['kernel'])
  assert ckpts.latest_intact_step() == 2


def test_resume_falls_back_to_the_newest_intact_step_and_says_so(tmp_path, warnings):
  _run(tmp_path)
  _zero_block(_data_file(tmp_path, 3))
  ckpts = RunCheckpoints(str(tmp_path))
  state, meta = ckpts.resume(None, ARCH)
  assert meta['epoch'] == 2
  np.testing.assert_array_equal(state['params']['kernel'], _state(2)['params']['kernel'])
  logged = warnings()
  assert len(logged) == 1, logged
  assert 'checkpoints/3 is unusable (state/' in logged[0]
  assert 'set_aside/checkpoints-3; resuming from step 2' in logged[0]
  # Nothing deleted: the damaged step is kept aside, out of the way of the step 3 to come.
  assert ckpts.steps() == [1, 2]
  assert os.path.isdir(tmp_path / 'set_aside' / 'checkpoints-3' / 'state')
  ckpts.save(3, _state(3), _meta(3))
  assert ckpts.restore(None)[1]['epoch'] == 3


def test_nan_in_an_unverified_step_is_refused_and_named(tmp_path):
  """A step without checksums (an older version's) is still checked for NaN/Inf once restored."""
  ckpts = RunCheckpoints(str(tmp_path))
  state = _state(1)
  state['params']['bias'][5] = np.nan
  ckpts.save(1, state, _meta(1))
  os.remove(tmp_path / 'checkpoints' / '1' / checkpoints.CHECKSUMS)
  ckpts = RunCheckpoints(str(tmp_path))
  with pytest.raises(DamagedCheckpointError, match=r"\['params'\]\['bias'\] holds NaN/Inf"):
    ckpts.restore(None)
  assert ckpts.latest_intact_step() is None  # unverified is never called intact


def test_every_step_damaged_stops_with_one_message_and_deletes_nothing(tmp_path):
  _run(tmp_path, steps=(1, 2))
  for step in (1, 2):
    _flip_byte(_data_file(tmp_path, step))
  ckpts = RunCheckpoints(str(tmp_path))
  with pytest.raises(CheckpointError, match=r'No usable checkpoint .*checkpoints/2: .*'
                     r'checkpoints/1: .*new --workdir'):
    ckpts.resume(None, ARCH)
  assert ckpts.steps() == [1, 2] and not (tmp_path / 'set_aside').exists()


def test_another_network_is_refused_not_skipped(tmp_path):
  _run(tmp_path)
  with pytest.raises(CheckpointError, match='holds a different network') as error:
    RunCheckpoints(str(tmp_path)).resume(None, dict(ARCH, num_filters=8))
  assert not isinstance(error.value, DamagedCheckpointError)


def test_one_manager_keeps_the_latest_k_and_the_best(tmp_path):
  _run(tmp_path, steps=range(1, 8), best=(1, 2), keep=3)
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints')) == [2, 5, 6, 7]
  assert not (tmp_path / 'best').exists()
  ckpts = RunCheckpoints(str(tmp_path), 3)
  assert ckpts.latest_step('best') == 2 and ckpts.latest_step() == 7
  state, meta = ckpts.restore(None, which='best')
  assert meta['epoch'] == 2 and meta['best_val_accuracy'] == pytest.approx(0.2)
  np.testing.assert_array_equal(state['params']['kernel'], _state(2)['params']['kernel'])


def test_a_damaged_best_is_found_before_training_and_recomputed(tmp_path, warnings):
  """The best step is checked at resume: resuming before it lets the run make it again."""
  _run(tmp_path, steps=range(1, 6), best=(3,), keep=3)  # keeps 3 (best), 4, 5
  _flip_byte(_data_file(tmp_path, 3))
  with pytest.raises(CheckpointError, match=r'No usable checkpoint .*checkpoints/3: '):
    RunCheckpoints(str(tmp_path), 3).resume(None, ARCH)  # nothing before step 3 to redo it from

  workdir = tmp_path / 'kept'
  _run(workdir, steps=range(1, 6), best=(3,), keep=5)  # keeps 1-5
  _flip_byte(_data_file(workdir, 3))
  ckpts = RunCheckpoints(str(workdir), 5)
  state, meta = ckpts.resume(None, ARCH)
  assert meta['epoch'] == 2 and ckpts.steps() == [1, 2]
  assert sorted(os.listdir(workdir / 'set_aside')) == ['checkpoints-3', 'checkpoints-4',
                                                        'checkpoints-5']
  assert any('checkpoints/4 is unusable (intact, but after the damaged best step' in w
             for w in warnings()), warnings()


def test_reading_a_workdir_creates_nothing(tmp_path):
  """evaluate on a workdir without checkpoints used to leave empty checkpoints/ and best/."""
  ckpts = RunCheckpoints(str(tmp_path))
  assert ckpts.latest_step() is None and ckpts.latest_step('best') is None
  assert ckpts.resume(None, ARCH) == (None, None)
  ckpts.close()
  assert os.listdir(tmp_path) == []


def test_a_full_disk_is_one_line_with_the_space_needed(tmp_path, monkeypatch):
  _run(tmp_path, steps=(1,))
  ckpts = RunCheckpoints(str(tmp_path))
  needed = sum(os.path.getsize(p) for p in glob.glob(str(tmp_path / 'checkpoints' / '1' / '**'),
                                                     recursive=True) if os.path.isfile(p))

  def full_disk(step, **kwargs):
    os.makedirs(tmp_path / 'checkpoints' / f'{step}.orbax-checkpoint-tmp' / 'state')
    absl_logging.error('a background write failed')  # orbax logs these with tracebacks
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 113 '
                     "bytes to file 11: No space left on device [os_error_code='28']")

  monkeypatch.setattr(ckpts._manager, 'save', full_disk)
  with pytest.raises(CheckpointError) as error:
    ckpts.save(2, _state(2), _meta(2))
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('Disk full: the checkpoint of step 2 needs about '
                            f'{checkpoints._size(needed)} in ')
  assert 'free. Free some space' in message and 'resume from step 1' in message
  assert os.listdir(tmp_path / 'checkpoints') == ['1']  # this save's partial copy removed
  print(f'\n{message}')


def test_other_save_errors_pass_through(tmp_path, monkeypatch):
  ckpts = RunCheckpoints(str(tmp_path))

  def broken(step, **kwargs):
    raise ValueError('something else')

  monkeypatch.setattr(ckpts._manager, 'save', broken)
  with pytest.raises(ValueError, match='something else'):
    ckpts.save(1, _state(1), _meta(1))


def test_a_full_disk_at_the_first_save_says_what_the_arrays_take(tmp_path, monkeypatch):
  ckpts = RunCheckpoints(str(tmp_path))

  def full_disk(step, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(ckpts._manager, 'save', full_disk)
  with pytest.raises(CheckpointError, match=r'^Disk full: the checkpoint of step 1 does not fit '
                     r'in the .* free in .*checkpoints \(its arrays alone take 64\.5 KB; orbax '
                     r'adds metadata\)\. .*then rerun the same command\. '):
    ckpts.save(1, _state(1), _meta(1))


def test_a_step_copied_from_another_run_is_set_aside_like_a_damaged_one(tmp_path, warnings):
  """Issue 20 (13): its own checksums pass, so it used to be resumed from without notice."""
  runs = {'ours': 'run-ours', 'theirs': 'run-theirs'}
  for name, steps in (('ours', (1, 2)), ('theirs', (1, 2, 3))):
    ckpts = RunCheckpoints(str(tmp_path / name), run_id=runs[name])
    for step in steps:
      ckpts.save(step, _state(step), _meta(step))
    ckpts.close()
  os.replace(tmp_path / 'theirs' / 'checkpoints' / '3', tmp_path / 'ours' / 'checkpoints' / '3')

  ckpts = RunCheckpoints(str(tmp_path / 'ours'), run_id=runs['ours'])
  with pytest.raises(checkpoints.ForeignCheckpointError) as error:  # evaluate would refuse it
    ckpts.restore(None)
  assert (error.value.step, error.value.run_id, error.value.expected) == (
      3, runs['theirs'], runs['ours'])
  state, meta = ckpts.resume(None, ARCH)
  assert meta['epoch'] == 2 and meta['run_id'] == runs['ours'] and ckpts.steps() == [1, 2]
  assert os.path.isdir(tmp_path / 'ours' / 'set_aside' / 'checkpoints-3')
  assert any('checkpoints/3 is unusable (it belongs to another run' in w for w in warnings())


def test_changing_ema_decay_on_resume_names_the_setting_and_keeps_the_checkpoint(
    tmp_path, make_tiny_config):
  """Issue 20 (9): it said 'No usable checkpoint ... move checkpoints aside to start over'."""
  import jax
  import jax.numpy as jnp
  from conftest import abstract_state

  def target(ema_decay):
    return abstract_state(make_tiny_config(**{'model.num_filters': 4, 'ema_decay': ema_decay}))

  with_ema = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target(0.99))
  ckpts = RunCheckpoints(str(tmp_path))
  ckpts.save(16, with_ema, _meta(1))
  ckpts.close()
  ckpts = RunCheckpoints(str(tmp_path))
  with pytest.raises(checkpoints.CheckpointSettingsError) as error:
    ckpts.resume(target(0.0), ARCH)
  assert error.value.fields == ['ema_params'] and 'ema_decay' in error.value.settings[0]
  assert ckpts.steps() == [16] and not (tmp_path / 'set_aside').exists()
