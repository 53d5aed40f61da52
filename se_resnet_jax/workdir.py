"""The workdir: checked before anything is written, then held by one process for the whole run.

Two runs writing into one workdir interleave their checkpoints, and each then reports numbers made
partly by the other's weights, with exit 0. The lock is `fcntl.flock` on a file in the workdir: the
operating system releases it when the holding process ends in any way (kill -9 included), so a lock
is never stale, and the file records the holder's PID and host for the message a second process
gets. With several JAX processes, each locks its own file, so every process of a second run stops
(none is left waiting in a collective for a process 0 that quit).
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
  """Another process is using the workdir; the message names it and says what to do.

  `holder` is what the lock file says of the holding process ('PID 123 on host h since ...', or
  that it has not written it yet) and `lock_path` the lock file, so callers that reword the
  advice need not parse the message.
  """

  def __init__(self, message: str, holder: str, lock_path: str):
    super().__init__(message)
    self.holder, self.lock_path = holder, lock_path


def prepare_workdir(workdir: str) -> None:
  """Fails early, with advice, when the workdir cannot be written.

  A URL is refused: os.makedirs would quietly make a local directory named 'gs:' on every host.
  """
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
  """Holds the workdir's lock (created with the workdir if need be) until the block ends.

  Re-entrant within a process: `evaluate` inside a locked run, or an experiment that locks a run
  it then trains, do not lock themselves out. A filesystem without locks (some FUSE mounts) gets a
  warning and no lock rather than a run that cannot start.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(lock_path(workdir, process_index))
  with _held_guard:
    if _held.get(path):
      _held[path] += 1
      nested = True
    else:
      nested = False
  if nested:
    try:
      yield
    finally:
      with _held_guard:
        _held[path] -= 1
    return

  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  locked = False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
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
    if locked:
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
