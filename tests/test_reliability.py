"""Reliability of the training command: interruptions, divergence and bad input.

These tests drive the real command (`python -m se_resnet_jax.main`) in subprocesses, because what
they check is process-level: a SIGKILL at an arbitrary moment, a SIGTERM, the exit status and the
one-line message a person sees. Runs are tiny (SEResNet18 at base width 4, 8 steps per epoch) and
share a compilation cache, so after the first run the others mostly load compiled programs.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
  REPO,
  TINY_RUN,
  checkpoint_steps,
  run_commands_forked,
  subprocess_env,
  wait_until,
)

from se_resnet_jax import input_pipeline, stopping
from se_resnet_jax.checkpoints import RunCheckpoints
from se_resnet_jax.errors import Preempted
from se_resnet_jax.input_pipeline import DatasetUnavailableError

pytestmark = pytest.mark.slow  # every run here is the real command in a subprocess

EPOCHS = TINY_RUN['num_epochs']  # the session run's schedule: its programs come from the cache
STEPS_PER_EPOCH = 8  # (384 - 128 validation) / 32
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
# The session run's sizes on generated images: every run of this file uses these, plus the
# overrides a test is about.
SMALL = {
    **{k: v for k, v in TINY_RUN.items() if k != 'dataset'}, 'log_every_steps': 1000,
    'num_epochs': EPOCHS, 'checkpoint_every_epochs': 1, 'keep_checkpoints': 3,
    'evaluate_test': False,
}
RUN_TIMEOUT_S = 900  # a guard against hangs only; a run takes seconds once compiled


def _args(workdir: str, overrides: dict = (), flags: tuple = ()) -> list:
  settings = {**SMALL, **dict(overrides)}
  return (['--config=configs/smoke.py', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in settings.items()] + list(flags))


def _command(workdir: str, overrides: dict = (), flags: tuple = ()) -> list:
  return [sys.executable, '-m', 'se_resnet_jax.main', *_args(workdir, overrides, flags=flags)]


def _start(workdir: str, log: str, overrides: dict = (), **env) -> subprocess.Popen:
  with open(log, 'w') as out:  # a file, not a pipe: nobody reads while the run goes on
    return subprocess.Popen(_command(workdir, overrides), cwd=REPO, env=subprocess_env(**env),
                            stdout=out, stderr=subprocess.STDOUT)


def _run(workdir: str, overrides: dict = (), flags: tuple = (),
         **env) -> subprocess.CompletedProcess:
  return subprocess.run(_command(workdir, overrides, flags=flags), cwd=REPO,
                        env=subprocess_env(**env), capture_output=True, text=True,
                        timeout=RUN_TIMEOUT_S)


def _finish(proc: subprocess.Popen, log: str) -> str:
  proc.wait(timeout=RUN_TIMEOUT_S)
  with open(log) as f:
    return f.read()


def _partial_saves(workdir: str) -> list:
  return glob.glob(os.path.join(workdir, '*', '*.orbax-checkpoint-tmp*'))


def _kill(proc: subprocess.Popen) -> None:
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL


def _restore(workdir: str):
  """(state, meta) of a run's latest checkpoint, read back as saved by the library's RunCheckpoints.

  Without a target the state comes back as nested dicts: step, params, batch_stats, opt_state and
  ema_params, all of which an exact resume must reproduce.
  """
  ckpts = RunCheckpoints(workdir, SMALL['keep_checkpoints'])
  try:
    return ckpts.restore(None)
  finally:
    ckpts.close()


def _assert_same_run(workdir: str, reference: str) -> None:
  """Same final step, weights, BatchNorm statistics and optimizer state as the reference run."""
  (state, meta), (expected, expected_meta) = _restore(workdir), _restore(reference)
  assert int(state['step']) == int(expected['step']) == TOTAL_STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state, expected)
  assert meta['architecture'] == expected_meta['architecture']


def _all_finite(state: dict) -> bool:
  return all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def _snapshot(workdir: str) -> dict:
  """Every file under the checkpoint directories with its size and modification time."""
  files = {}
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '**'), recursive=True):
    if os.path.isfile(path):
      stat = os.stat(path)
      files[os.path.relpath(path, workdir)] = (stat.st_size, stat.st_mtime_ns)
  return files


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> str:
  """The workdir of one uninterrupted run; the interrupted runs must end exactly like it."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoint_steps(workdir)[-3:] == [16, 24, 32]  # the latest three (and the best, if older)
  return workdir


def test_killed_and_preempted_runs_resume_to_the_uninterrupted_result(reference, tmp_path):
  """kill -9 twice and SIGTERM once, at different moments; each rerun picks up where it can."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log')
  # 1. kill -9 just after the first checkpoint is in place, while the next epoch runs.
  proc = _start(workdir, log)
  wait_until([proc], lambda: checkpoint_steps(workdir), RUN_TIMEOUT_S)
  _kill(proc)
  assert checkpoint_steps(workdir) == [8]
  # 2. kill -9 during the next checkpoint write, when the poll catches it (else just after it).
  left_before = set(_partial_saves(workdir))  # one the first kill may have left
  proc = _start(workdir, log)
  wait_until([proc], lambda: (set(_partial_saves(workdir)) - left_before
                              or checkpoint_steps(workdir)[-1] > 8), RUN_TIMEOUT_S)
  _kill(proc)
  resumed_from = checkpoint_steps(workdir)[-1]
  # 3. SIGTERM (preemption) after the next checkpoint: it saves where it is and exits cleanly.
  proc = _start(workdir, log)
  wait_until([proc], lambda: checkpoint_steps(workdir)[-1] > resumed_from, RUN_TIMEOUT_S)
  proc.send_signal(signal.SIGTERM)
  output = _finish(proc, log)
  assert proc.returncode == 0, output[-3000:]
  assert f'at step {resumed_from} ' in output
  saved = [line for line in output.splitlines() if 'SIGTERM: saved a checkpoint at step' in line]
  assert len(saved) == 1, output[-3000:]
  step = int(saved[0].split('at step ')[1].split()[0].rstrip(';'))
  assert resumed_from < step < TOTAL_STEPS and checkpoint_steps(workdir)[-1] == step
  assert not os.path.exists(os.path.join(workdir, 'report.json'))
  # 4. To the end.
  proc = _start(workdir, log)
  output = _finish(proc, log)
  assert proc.returncode == 0, output[-3000:]
  assert f'at step {step} ' in output
  _assert_same_run(workdir, reference)
  assert os.path.exists(os.path.join(workdir, 'report.json'))
  print(f'\nkilled at checkpoint 8, then resumed from {resumed_from}; SIGTERM saved step {step}')


def test_a_diverging_run_stops_keeps_good_checkpoints_and_resumes_with_a_lower_rate(
    reference, tmp_path):
  """The good run's first two epochs, then epoch 3 at a rate 1e8 times its own: the loss
  overflows, the run stops naming its last good checkpoint, and the rerun at the good rate ends as
  the good run did."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  for step in checkpoint_steps(workdir):
    if step > 16:
      shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  os.remove(os.path.join(workdir, 'report.json'))
  result = _run(workdir, {'learning_rate': 5e6})
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith('error: ') and 'by step 24' in message, message
  assert 'Training loss became nan' in message or 'weights became NaN' in message, message
  assert 'last good checkpoint (step 16, its checksums verified)' in message, message
  assert 'learning_rate' in message, message
  print(f'\ndiverging run: {message}')
  assert checkpoint_steps(workdir)[-1] == 16  # nothing of the diverged epoch was saved
  state, meta = _restore(workdir)
  assert int(state['step']) == 16 and meta['epoch'] == 2 and _all_finite(state)

  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'at step 16 ' in result.stderr
  _assert_same_run(workdir, reference)


def test_a_partial_checkpoint_left_by_a_kill_is_ignored(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  # What a kill during the last save leaves: the step half-written under orbax's temporary name.
  partial = os.path.join(workdir, 'checkpoints', '32.orbax-checkpoint-tmp-1700000000000000')
  os.rename(os.path.join(workdir, 'checkpoints', '32'), partial)
  for path in glob.glob(os.path.join(partial, 'state', '**', 'd', '*'), recursive=True)[::2]:
    os.remove(path)
  os.remove(os.path.join(workdir, 'report.json'))

  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'at step 24 ' in result.stderr
  _assert_same_run(workdir, reference)
  assert os.path.exists(os.path.join(workdir, 'report.json'))


def _zero_bytes(workdir: str, step: int) -> str:
  """4 KB of zeros inside the largest array file of a step (what a bad disk or copy leaves)."""
  data = glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state', '**', 'd', '*'),
                   recursive=True)
  path = max(data, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.seek(min(4096, os.path.getsize(path) // 4))
    f.write(b'\0' * 4096)
  return path


def test_a_damaged_checkpoint_is_named_and_the_run_resumes_from_the_newest_intact_one(
    reference, tmp_path):
  """It used to restore Inf/NaN silently and train at chance until the NaN guard fired."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  _zero_bytes(workdir, 32)
  os.remove(os.path.join(workdir, 'report.json'))
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  named = [line for line in result.stderr.splitlines() if 'checkpoints/32 is unusable' in line]
  assert len(named) == 1, result.stderr[-3000:]
  assert 'does not match its checksum' in named[0] and 'resuming from step 24' in named[0]
  assert 'set_aside/checkpoints-32' in named[0]
  assert 'at step 24 ' in result.stderr
  _assert_same_run(workdir, reference)
  assert os.path.isdir(os.path.join(workdir, 'set_aside', 'checkpoints-32'))  # kept, not deleted
  print(f'\n{named[0]}')


def test_changed_data_settings_go_on_only_when_asked(reference, tmp_path):
  """--allow_changed_data resumes anyway, says so, and the checkpoints record the new settings."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, 'report.json'))
  result = _run(workdir, {'validation_seed': 7, 'num_epochs': EPOCHS + 1},
                flags=('--allow_changed_data',))
  assert result.returncode == 0, result.stderr[-3000:]
  warned = [line for line in result.stderr.splitlines() if 'as --allow_changed_data asks' in line]
  assert len(warned) == 1, warned
  _, meta = _restore(workdir)
  assert meta['epoch'] == EPOCHS + 1
  with open(os.path.join(workdir, 'run.json')) as f:
    assert json.load(f)['data']['validation_seed'] == 7


def _below_a_file(workdir: str) -> str:
  with open(os.path.join(workdir, 'a_file'), 'w') as f:
    f.write('not a directory')
  return os.path.join(workdir, 'a_file', 'run')


def _npz(workdir: str, name: str, **changes) -> None:
  """An npz next to the workdir (the {tmp} of the overrides): 64 train, 16 test images."""
  rs = np.random.RandomState(0)
  arrays = dict(x_train=rs.randint(0, 256, (64, 32, 32, 3)).astype(np.uint8),
                y_train=np.arange(64) % 10,
                x_test=rs.randint(0, 256, (16, 32, 32, 3)).astype(np.uint8),
                y_test=np.arange(16) % 10)
  arrays.update(changes)
  np.savez(os.path.join(os.path.dirname(workdir), name), **arrays)


def _nchw_npz(workdir: str) -> None:
  _npz(workdir, 'nchw.npz', x_train=np.zeros((64, 3, 32, 32), np.uint8))


def _float_npz(workdir: str) -> None:
  _npz(workdir, 'float.npz', x_train=np.random.RandomState(0).uniform(0, 1, (64, 32, 32, 3))
       .astype(np.float32))


def _label_10_npz(workdir: str) -> None:
  _npz(workdir, 'labels.npz', y_test=np.r_[0, 1, 2, 10, np.arange(12) % 10])


# (id, overrides, extra environment, prepare(workdir) -> workdir to pass, expected message parts)
BAD_INPUT = [
    ('unknown key', {'nonsense': 1}, {}, None,
     ["Unknown config key 'nonsense' in '--config.nonsense=1'", 'Known keys: augment,']),
    ('unknown nested key', {'model.reduction': 8}, {}, None,
     ["Unknown config key 'model.reduction'", "under 'model': dropout_rate, kernel_init, name"]),
    ('wrong type', {'batch_size': 'abc'}, {}, None,
     ['Bad value in --config.batch_size=abc: expected type int, like 64', 'invalid literal']),
    ('dropout 1', {'model.dropout_rate': 1.0}, {}, None,
     ['model.dropout_rate must be in [0, 1), got 1.0']),
    ('dropout negative', {'model.dropout_rate': -0.1}, {}, None,
     ['model.dropout_rate must be in [0, 1), got -0.1']),
    ('negative learning rate', {'learning_rate': -0.1}, {}, None,
     ['learning_rate must be >= 0, got -0.1']),
    ('reduction above channels', {'model.se_reduction': 8}, {}, None,
     ['model.se_reduction', 'r=8 exceeds the 4 channels', 'Use r <= 4']),
    ('batch not divisible by devices', {'batch_size': 12, 'eval_batch_size': 16},
     {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}, None,
     ['batch_size=12 is not divisible by the 8 devices', 'multiple of 8']),
    ('unknown dataset', {'dataset': 'mnist'}, {}, None,
     ["Unknown dataset 'mnist'", 'cifar10, cifar100, synthetic']),
    ('unknown model', {'model.name': 'SEResNet19'}, {}, None,
     ["Unknown model.name 'SEResNet19'", 'SEResNet18']),
    ('dataset missing, no download', {'dataset': 'cifar10', 'download': False},
     {'TFDS_DATA_DIR': '{tmp}/empty_tfds'}, None,
     ["Dataset 'cifar10' is not in", 'empty_tfds', 'TFDS_DATA_DIR', 'download it on a machine']),
    ('changed validation seed', {'validation_seed': 7}, {}, None,
     ['was made with other data settings (validation_seed: 0 there, 7 now)',
      '--allow_changed_data']),
    ('changed batch size', {'batch_size': 16}, {}, None, ['(batch_size: 32 there, 16 now)']),
    ('cutout larger than the image', {'augment.cutout_size': 100}, {}, None,
     ['augment.cutout_size=100 is larger than the 32x32 images']),
    ('infinite learning rate', {'learning_rate': 'inf'}, {}, None,
     ['learning_rate must be a finite number, got inf.']),
    ('infinite weight decay', {'weight_decay': 'inf'}, {}, None,
     ['weight_decay must be a finite number, got inf.']),
    ('onecycle warm-up past the run', {'schedule': 'onecycle', 'warmup_epochs': 5.0}, {}, None,
     ['schedule=onecycle warms up for warmup_epochs=5.0 of num_epochs=4']),
    ('negative synthetic noise', {'synthetic.noise': -1.0}, {}, None,
     ['synthetic.noise must be >= 0 (the standard deviation of the noise']),
    ('npz_path with synthetic data', {'npz_path': 'missing.npz'}, {}, None,
     ["npz_path='missing.npz' is set, but dataset=synthetic generates its images"]),
    ('NCHW arrays', {'dataset': 'cifar10', 'npz_path': '{tmp}/nchw.npz'}, {}, _nchw_npz,
     ['nchw.npz: x_train has shape (64, 3, 32, 32), channels first (NCHW)',
      'np.transpose(x_train, (0, 2, 3, 1))']),
    ('float arrays in [0, 1]', {'dataset': 'cifar10', 'npz_path': '{tmp}/float.npz'}, {},
     _float_npz, ['float.npz: x_train is float32', '(x_train * 255).round().astype(np.uint8)']),
    ('labels out of range', {'dataset': 'cifar10', 'npz_path': '{tmp}/labels.npz'}, {},
     _label_10_npz, ['labels.npz: y_test holds label 10 at index 3, outside [0, 10)']),
    ('other architecture', {'model.num_filters': 8}, {}, None,
     ['checkpoints/32 holds a different network', "'num_filters': 4", "'num_filters': 8"]),
    ('workdir below a file', {}, {}, _below_a_file,
     ['Cannot write to workdir', 'a_file/run', 'Not a directory', 'writable --workdir']),
    ('workdir a URL', {}, {}, lambda workdir: 'gs://bucket/run',
     ["--workdir 'gs://bucket/run' is a URL", 'gcsfuse']),
]


@pytest.fixture(scope='module')
def bad_input_outcomes(reference, tmp_path_factory) -> dict:
  """Each case's (result, workdir, checkpoint files before): the real command, forked per case
  from one process that imported the library (see conftest.run_commands_forked).

  Each case gets a copy of a finished run, whose checkpoints must come out untouched.
  """
  jobs, cases = [], []
  for name, overrides, env, prepare, _ in BAD_INPUT:
    tmp = tmp_path_factory.mktemp('bad_input')
    workdir = str(tmp / 'run')
    shutil.copytree(reference, workdir)
    target = (prepare(workdir) if prepare else None) or workdir
    os.makedirs(tmp / 'empty_tfds')
    cases.append((name, workdir, _snapshot(workdir)))
    overrides = {k: v.format(tmp=tmp) if isinstance(v, str) else v for k, v in overrides.items()}
    jobs.append(('main', _args(target, overrides), {k: v.format(tmp=tmp) for k, v in env.items()}))
  results = run_commands_forked(jobs, str(tmp_path_factory.mktemp('bad_input_output')))
  return {name: (result, workdir, before)
          for (name, workdir, before), result in zip(cases, results)}


@pytest.mark.parametrize('name,expected', [(case[0], case[-1]) for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_stops_with_one_line_before_compute_and_leaves_checkpoints(
    bad_input_outcomes, name, expected):
  result, workdir, before = bad_input_outcomes[name]
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
  for part in expected:
    assert part in errors[0], errors[0]
  assert 'Compiled the train step' not in result.stderr
  assert _snapshot(workdir) == before
  print(f'\n{name}: {errors[0]}')


def test_missing_config_file_is_one_line(tmp_path):
  command = [sys.executable, '-m', 'se_resnet_jax.main', '--config=configs/no_such.py',
             f'--workdir={tmp_path}', '--config.batch_size=32']
  result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  print(f'\nmissing config file: {result.stderr.strip().splitlines()[-1]}')
  assert result.stderr.strip().splitlines()[-1] == (
      "error: Cannot load --config=configs/no_such.py: [Errno 2] No such file or directory: "
      "'configs/no_such.py'.")


def test_missing_dataset_with_download_and_no_network_fails_fast(tmp_path, monkeypatch,
                                                                 make_tiny_config):
  def no_network(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')

  monkeypatch.setattr(socket, 'getaddrinfo', no_network)  # what DNS does without network
  for proxy in ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(proxy, raising=False)
  config = make_tiny_config(dataset='cifar10', data_dir=str(tmp_path), download=True)
  start = time.monotonic()
  with pytest.raises(DatasetUnavailableError) as error:
    input_pipeline.load_dataset(config)
  # tfds alone retries with back-off for minutes before giving up.
  assert time.monotonic() - start < 60
  message = str(error.value)
  assert 'www.cs.toronto.edu:443 cannot be reached to download it (no network?)' in message, message
  assert 'TFDS_DATA_DIR' in message and '--config.npz_path' in message, message
  print(f'\nno network, download=True: {message}')


def test_a_second_run_on_a_busy_workdir_is_refused_and_the_first_ends_as_if_alone(
    reference, tmp_path):
  """Both used to exit 0, the second reporting the first one's weights as its own."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log')
  lock = os.path.join(workdir, 'run.lock')
  proc = _start(workdir, log)

  def holds_the_lock():
    if not os.path.exists(lock):
      return False
    with open(lock) as f:
      return f.read().startswith(f'PID {proc.pid} ')

  wait_until([proc], holds_the_lock, RUN_TIMEOUT_S)
  proc.send_signal(signal.SIGSTOP)  # frozen while it holds the lock, however fast it would run
  try:
    start = time.monotonic()
    second = _run(workdir, {'learning_rate': 0.0})
    elapsed = time.monotonic() - start
  finally:
    proc.send_signal(signal.SIGCONT)
  assert second.returncode == 1 and 'Traceback' not in second.stderr, second.stderr[-3000:]
  error = second.stderr.strip().splitlines()[-1]
  assert error.startswith('error: Workdir ') and (
      f'is in use by PID {proc.pid} on host {socket.gethostname()}') in error, error
  assert 'compiling' not in second.stderr
  output = _finish(proc, log)
  assert proc.returncode == 0, output[-3000:]
  _assert_same_run(workdir, reference)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['learning_rate'] > 0  # the first run's config, not the refused one's
  print(f'\nsecond run, refused in {elapsed:.1f}s: {error}')


def test_ctrl_c_saves_mid_epoch_exits_130_and_the_rerun_ends_like_an_uninterrupted_run(
    reference, tmp_path):
  """Ctrl-C used to print a 33-line traceback and save nothing."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log')
  proc = _start(workdir, log)
  wait_until([proc], lambda: checkpoint_steps(workdir), RUN_TIMEOUT_S)  # epoch 2 runs
  proc.send_signal(signal.SIGINT)
  output = _finish(proc, log)
  assert proc.returncode == 130, output[-3000:]
  assert 'Traceback' not in output
  assert 'press Ctrl-C again to abort at once' in output
  saved = [line for line in output.splitlines() if 'SIGINT: saved a checkpoint at step' in line]
  assert len(saved) == 1 and 'rerun the same command to resume' in saved[0], output[-3000:]
  step = int(saved[0].split('at step ')[1].split()[0])
  assert STEPS_PER_EPOCH < step < TOTAL_STEPS and checkpoint_steps(workdir)[-1] == step
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'at step {step} ' in result.stderr
  _assert_same_run(workdir, reference)
  print(f'\nCtrl-C: {saved[0].split("] ")[-1]}')


def test_ctrl_c_while_compiling_stops_cleanly(reference, tmp_path):
  """It used to crash with a segmentation fault inside XLA's compiler."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log')
  proc = _start(workdir, log)

  def compiling():
    with open(log) as f:
      return 'checked; compiling.' in f.read()

  wait_until([proc], compiling, RUN_TIMEOUT_S)
  proc.send_signal(signal.SIGINT)
  output = _finish(proc, log)
  assert proc.returncode == 130, output[-3000:]  # not -11 (SIGSEGV)
  assert 'Traceback' not in output and 'Fatal Python error' not in output
  last = output.strip().splitlines()[-1]
  assert ('SIGINT: stopped before training, nothing saved' in last
          or 'SIGINT: saved a checkpoint at step 1 ' in last), last  # if compiling beat the signal
  print(f'\nCtrl-C while compiling: {last.split("] ")[-1]}')


def test_a_second_ctrl_c_gets_the_default_action(monkeypatch):
  """After the first Ctrl-C the loop finishes its step and saves; a second one ends the process
  at once (its default action). Checked in this process, whose default action is not sent."""
  monkeypatch.setattr(jax, 'process_count', lambda: 1)
  before = signal.getsignal(signal.SIGINT)
  with stopping.Interruption() as interruption:
    assert signal.getsignal(signal.SIGINT) == interruption._on_sigint
    assert signal.getsignal(signal.SIGTERM) == interruption._on_sigterm
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs at the next bytecode
    assert interruption.signal_name == 'SIGINT' and interruption.reached(1)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
  assert signal.getsignal(signal.SIGINT) == before


def test_sighup_stops_the_loop_like_sigterm(monkeypatch):
  """Issue 20 (10): a closed terminal or ssh session killed the run without a save."""
  monkeypatch.setattr(jax, 'process_count', lambda: 1)
  before = signal.getsignal(signal.SIGHUP)
  with stopping.Interruption() as interruption:
    # only with the loop's handler in place: the default action would end pytest itself
    assert signal.getsignal(signal.SIGHUP) == interruption._on_sigterm
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(0.01)
    assert interruption.signal_name == 'SIGHUP' and interruption.reached(1)
  assert signal.getsignal(signal.SIGHUP) == before
  assert Preempted(3, 'w', 'SIGHUP').exit_code == 0
