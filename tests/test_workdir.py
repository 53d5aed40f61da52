"""The workdir lock: one process per run directory, never a stale lock after kill -9."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from se_resnet_jax.workdir import WorkdirLockedError, lock_path, workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ('import sys, time\n'
        'from se_resnet_jax.workdir import workdir_lock\n'
        'with workdir_lock(sys.argv[1]):\n'
        '  print("locked", flush=True)\n'
        '  time.sleep(600)\n')


def _holder(workdir: str) -> subprocess.Popen:
  """Another process holding the workdir's lock (it says so on stdout once it does)."""
  proc = subprocess.Popen([sys.executable, '-c', HOLD, workdir], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'locked'
  return proc


@pytest.mark.slow  # a second Python process
def test_a_second_process_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _holder(workdir)
  try:
    with pytest.raises(WorkdirLockedError) as error:
      with workdir_lock(workdir):
        pass
    holder, path = error.value.holder, error.value.lock_path
    assert holder.startswith(f'PID {proc.pid} on host {socket.gethostname()} since '), holder
    assert path == os.path.realpath(lock_path(workdir)), path
    message = str(error.value)
    assert holder in message and path in message and '\n' not in message, message
    print(f'\n{message}')
  finally:
    proc.kill()
    proc.wait()


@pytest.mark.slow  # a second Python process
def test_kill_9_leaves_no_stale_lock(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _holder(workdir)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(lock_path(workdir))  # the file stays; the lock went with the process
  start = time.monotonic()
  with workdir_lock(workdir):
    with open(lock_path(workdir)) as f:
      assert f.read().startswith(f'PID {os.getpid()} on host {socket.gethostname()} since ')
  assert time.monotonic() - start < 1


@pytest.mark.slow  # a second Python process
def test_the_lock_is_reentrant_within_a_process_and_released_after(tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lock(workdir):
    with workdir_lock(workdir):  # e.g. an experiment locking a run that train_and_evaluate locks
      pass
    proc = subprocess.run([sys.executable, '-c', HOLD.replace('time.sleep(600)', 'pass'),
                           workdir], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and 'WorkdirLockedError' in proc.stderr  # still held
  proc = subprocess.run([sys.executable, '-c', HOLD.replace('time.sleep(600)', 'pass'), workdir],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == 'locked', proc.stderr


def test_each_process_of_a_multiprocess_run_locks_its_own_file(tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lock(workdir, process_index=0), workdir_lock(workdir, process_index=1):
    assert os.path.basename(lock_path(workdir, 1)) == 'run.lock.1'
    assert os.path.exists(lock_path(workdir, 1))


@pytest.mark.slow  # a second Python process
def test_training_takes_the_lock_before_reading_any_data(tmp_path, monkeypatch, make_tiny_config):
  """train_and_evaluate (so `main` and every experiment run) holds the workdir's lock."""
  from se_resnet_jax import input_pipeline, train

  def no_loading(config):
    raise AssertionError('data loaded while another process holds the workdir')

  monkeypatch.setattr(input_pipeline, 'load_dataset', no_loading)
  workdir = str(tmp_path / 'run')
  proc = _holder(workdir)
  try:
    with pytest.raises(WorkdirLockedError) as error:
      train.train_and_evaluate(make_tiny_config(), workdir)
    assert error.value.holder.startswith(f'PID {proc.pid} '), error.value.holder
    assert error.value.lock_path == os.path.realpath(lock_path(workdir))
  finally:
    proc.kill()
    proc.wait()
