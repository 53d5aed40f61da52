"""The workdir: checked before anything is written, then held by one process for the whole run.

Two runs in one workdir would interleave their checkpoints and report each other's numbers. The
lock is `fcntl.flock`, which the OS releases however the holder ends (never stale); the file names
the holder for the message. Each JAX process locks its own file, so every process of a second run
stops (none waits in a collective for a process 0 that quit).
"""

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import tempfile
import threading
from typing import Iterator

from absl import logging

from se_resnet_jax.errors import WorkdirError

LOCK_FILE = 'run.lock'

_held: dict = {}  # realpath of a lock file -> how many nested holders in this process
_held_guard = threading.Lock()


class WorkdirLockedError(WorkdirError):
  """Another process uses the workdir: `holder` ('PID 123 on host h since ...'), `lock_path`."""

  def __init__(self, message: str, holder: str, lock_path: str):
    super().__init__(message)
    self.holder, self.lock_path = holder, lock_path


def prepare_workdir(workdir: str) -> None:
  """Fails early, with advice, when the workdir cannot be written (a URL would quietly become a
  local directory named 'gs:')."""
  if '://' in workdir:
    raise WorkdirError(f'--workdir {workdir!r} is a URL; the workdir must be a local or mounted '
                       'path (on a TPU pod slice: a shared filesystem, or the bucket mounted '
                       'with gcsfuse).')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(f'Cannot write to workdir {workdir!r} ({e.strerror}). Choose a writable '
                       '--workdir or fix its permissions.') from None


def lock_path(workdir: str, process_index: int = 0) -> str:
  return os.path.join(workdir, LOCK_FILE if process_index == 0 else f'{LOCK_FILE}.{process_index}')


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    text = ''
  return text or 'another process (it has not written its PID yet)'


@contextlib.contextmanager
def workdir_lock(workdir: str, process_index: int = 0) -> Iterator[None]:
  """Holds the workdir's lock until the block ends; re-entrant within a process. A filesystem
  without locks (some FUSE mounts) gets a warning rather than a run that cannot start."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(lock_path(workdir, process_index))
  with _held_guard:
    nested = path in _held
    if nested:
      _held[path] += 1
  if nested:
    try:
      yield
    finally:
      with _held_guard:
        _held[path] -= 1
    return

  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(path)
      raise WorkdirLockedError(
          f'Workdir {workdir!r} is in use by {holder} (lock file {path}). Wait for that '
          'run to finish or stop it, or use another --workdir.', holder, path) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      logging.warning('The filesystem of %s does not support locks (%s): nothing stops a second '
                      'run from using this workdir at the same time.', workdir, e.strerror)
    else:
      since = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
      os.ftruncate(fd, 0)
      os.write(fd, f'PID {os.getpid()} on host {socket.gethostname()} since {since}\n'.encode())
    with _held_guard:
      _held[path] = 1
    try:
      yield
    finally:
      with _held_guard:
        del _held[path]
  finally:
    os.close(fd)  # releases the flock; the file stays, holding the last holder's line
