"""Orbax checkpoints of a run (`workdir/checkpoints/<step>`), each verified when read back.

Orbax does not detect damaged bytes: a flipped bit restores silently as a wrong weight, zeroed
blocks as Inf/NaN. So each step also gets `checksums.json` (SHA-256 of every file), and a restore
checks those and then that the arrays are finite. Resume falls back to the newest intact step and
moves the unusable ones to `workdir/set_aside/` (nothing is deleted). Each step's JSON `meta` item
holds the run's progress and run id, so a step of another network or another run is refused.
"""

import errno
import glob
import hashlib
import json
import logging as std_logging
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from se_resnet_jax import files
from se_resnet_jax.errors import UserError

CHECKSUMS = 'checksums.json'
SET_ASIDE = 'set_aside'
BEST_METRIC = 'val_accuracy'


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be used; the message says what to do. Nothing was deleted."""


class DamagedCheckpointError(CheckpointError):
  """A step whose files fail their checksums, cannot be read, or hold NaN/Inf."""

  def __init__(self, where: str, step: int, reason: str):
    super().__init__(f'Checkpoint {where} is damaged: {reason}.')
    self.where, self.step, self.reason = where, step, reason


class ForeignCheckpointError(DamagedCheckpointError):
  """A step of another run (copied in, its checksums its own): `run_id` it records, `expected`."""

  def __init__(self, where: str, step: int, run_id: str, expected: str):
    super().__init__(where, step, f'it belongs to another run (run id {run_id}; this run is '
                                  f'{expected})')
    self.run_id, self.expected = run_id, expected


class CheckpointNotFoundError(CheckpointError):
  """The checkpoint asked for ('best', 'latest' or a step: `which`, `step`) is not there."""

  def __init__(self, message: str, which: str, step: Optional[int], available: list):
    super().__init__(message)
    self.which, self.step, self.available = which, step, available


class CheckpointSettingsError(CheckpointError):
  """The step is intact but holds another training state than the config makes: `fields` are the
  differing parts of the state, `settings` the config fields that decide them."""

  def __init__(self, message: str, fields: list, settings: list):
    super().__init__(message)
    self.fields, self.settings = fields, settings


# The parts of a TrainState whose presence or shape a config setting (not the network) decides.
STATE_SETTINGS = {'ema_params': 'ema_decay (an EMA of the weights kept or not)',
                  'opt_state': 'the optimizer settings (momentum, nesterov, weight decay)'}


def _manager(directory: str, keep: Optional[int]):
  """Latest `keep` steps plus the best; `keep=None` only reads, and creates nothing (orbax's own
  read_only mode logs three warnings each time it opens)."""
  policies = ocp.checkpoint_managers
  preserve = None if keep is None else policies.AnyPreservationPolicy([
      policies.LatestN(keep),
      policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                     keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False,
                                         best_fn=lambda m: m[BEST_METRIC],
                                         preservation_policy=preserve)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'meta'))


def _reason(error: Exception) -> str:
  """The first line of a restore error, without TensorStore's unprintable spec dump."""
  text = str(error).splitlines()[0] if str(error) else ''
  text = text.split(' See full TensorStore details')[0].split(' [tensorstore_spec=')[0]
  return f'{type(error).__name__}: {text.rstrip(". ")[:300]}'


def file_checksums(directory: str) -> dict:
  """{relative path: sha256} of every file under `directory` except the checksum file itself."""
  sums = {}
  for path in sorted(glob.glob(os.path.join(directory, '**'), recursive=True)):
    relative = os.path.relpath(path, directory)
    if os.path.isfile(path) and relative != CHECKSUMS:
      digest = hashlib.sha256()
      with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
          digest.update(block)
      sums[relative] = digest.hexdigest()
  return sums


def verify_checksums(directory: str) -> Optional[str]:
  """None when every file matches its recorded checksum, else what is wrong; FileNotFoundError
  without a checksum file (a process killed just after the save)."""
  with open(os.path.join(directory, CHECKSUMS)) as f:
    try:
      recorded = json.load(f)['files']
    except (ValueError, KeyError, TypeError):
      return f'its {CHECKSUMS} is unreadable'
  actual = file_checksums(directory)
  missing = sorted(set(recorded) - set(actual))
  if missing:
    return f'{missing[0]} is missing' + (f' (and {len(missing) - 1} more)' if missing[1:] else '')
  changed = sorted(k for k in recorded if recorded[k] != actual[k])
  if changed:
    return (f'{changed[0]} does not match its checksum' +
            (f' (and {len(changed) - 1} more files)' if changed[1:] else ''))
  return None


def nonfinite_leaves(tree: Any) -> list:
  """Paths of the floating-point arrays in `tree` holding NaN or Inf (this process's shards)."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not jax.numpy.issubdtype(getattr(leaf, 'dtype', np.asarray(leaf).dtype), np.inexact):
      continue
    if isinstance(leaf, jax.Array):  # each distinct shard once (replicas hold the same values)
      parts = [np.asarray(s.data) for s in
               {str(s.index): s for s in leaf.addressable_shards}.values()]
    else:
      parts = [np.asarray(leaf)]
    if not all(np.isfinite(p).all() for p in parts):
      bad.append(jax.tree_util.keystr(path))
  return bad


def _disk_full(error: BaseException) -> bool:
  """Whether an error (or one it came from) is ENOSPC; TensorStore wraps it in a ValueError."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if 'No space left on device' in str(error) or "os_error_code='28'" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _size(num_bytes: float) -> str:
  for unit in ('bytes', 'KB', 'MB', 'GB'):
    if num_bytes < 1024 or unit == 'GB':
      return f'{num_bytes:.0f} {unit}' if unit == 'bytes' else f'{num_bytes:.1f} {unit}'
    num_bytes /= 1024


def _directory_bytes(directory: str) -> int:
  return sum(os.path.getsize(p) for p in glob.glob(os.path.join(directory, '**'), recursive=True)
             if os.path.isfile(p))


class _OrbaxSaveLogs(std_logging.Filter):
  """Holds orbax's error logs during a save, replayed unless it failed on a full disk (then one
  line says it all, not a traceback per failed write). Drops the warning for a save without
  metrics: only a new best carries them."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record):
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno >= std_logging.ERROR:
      self.records.append(record)
      return False
    return 'did not provide metrics' not in record.getMessage()


class RunCheckpoints:
  """`workdir/checkpoints`: the latest K states and the best one; `read_only` never saves."""

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False,
               run_id: Optional[str] = None):
    self.workdir = workdir
    self._manager = _manager(os.path.join(workdir, 'checkpoints'), None if read_only else keep)
    self._read_only = read_only
    self._verified = {}  # step -> None (intact), reason (damaged) or 'unverified'
    self.run_id = run_id

  def steps(self) -> list:
    return list(self._manager.all_steps())

  def latest_step(self, which: str = 'latest') -> Optional[int]:
    """The newest step ('latest') or the best one ('best'), whether or not it was verified."""
    if which == 'latest':
      return self._manager.latest_step()
    has_metrics = any(self._manager.metrics(s) for s in self._manager.all_steps())
    return self._manager.best_step() if has_metrics else None

  def _step_dir(self, step: int) -> str:
    return os.path.join(str(self._manager.directory), str(step))

  def _status(self, step: int) -> Optional[str]:
    """None when intact, 'unverified' without checksums, else what is damaged (cached)."""
    if step not in self._verified:
      try:
        self._verified[step] = verify_checksums(self._step_dir(step))
      except FileNotFoundError:
        self._verified[step] = 'unverified'
    return self._verified[step]

  def latest_intact_step(self) -> Optional[int]:
    """The newest step whose files match their checksums: the only kind a message calls intact."""
    for step in reversed(self.steps()):
      if self._status(step) is None:
        return step
    return None

  def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
    """Saves `state` and `meta` at `step`, with checksums; `best` marks a new best validation
    accuracy (meta['best_val_accuracy']; without a value it is no best). A full disk ends in one
    CheckpointError saying how much space the checkpoint needs.
    """
    if self._read_only:
      raise ValueError('RunCheckpoints(read_only=True) cannot save.')
    if self.run_id is not None:
      meta = {**meta, 'run_id': self.run_id}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    best_value = meta.get('best_val_accuracy')
    metrics = {BEST_METRIC: float(best_value)} if best and best_value is not None else None
    held = _OrbaxSaveLogs()
    absl_logger = std_logging.getLogger('absl')
    absl_logger.addFilter(held)
    try:
      os.makedirs(self._manager.directory, exist_ok=True)
      self._manager.save(step, args=args, metrics=metrics, force=True)
      if jax.process_index() == 0:
        sums = file_checksums(self._step_dir(step))
        files.write_json_atomic(os.path.join(self._step_dir(step), CHECKSUMS),
                                {'algorithm': 'sha256', 'files': sums})
    except Exception as e:  # noqa: BLE001 - only a full disk is turned into a user error
      if not _disk_full(e):
        absl_logger.removeFilter(held)
        for record in held.records:
          absl_logger.handle(record)
        raise
      raise self._disk_full_error(step, state) from None
    finally:
      absl_logger.removeFilter(held)
    self._verified[step] = None

  def _disk_full_error(self, step: int, state: Any) -> CheckpointError:
    directory = str(self._manager.directory)
    for partial in glob.glob(os.path.join(directory, f'{step}.orbax-checkpoint-tmp*')):
      shutil.rmtree(partial, ignore_errors=True)  # this save's own partial copy, never a step
    previous = [s for s in self.steps() if s != step]
    free = shutil.disk_usage(directory).free
    if previous:  # the best estimate: the size of the run's last complete step
      need = (f'needs about {_size(_directory_bytes(self._step_dir(previous[-1])))} '
              f'in {directory}, which has {_size(free)} free')
    else:
      arrays = sum(x.nbytes if isinstance(x, jax.Array) else np.asarray(x).nbytes
                   for x in jax.tree.leaves(state))
      need = (f'needs at least {_size(arrays)} (its arrays, uncompressed) in {directory}, which '
              f'has {_size(free)} free' if arrays > free else
              f'does not fit in the {_size(free)} free in {directory} (its arrays alone take '
              f'{_size(arrays)}; orbax adds metadata)')
    resume = (f'rerun the same command to resume from step {previous[-1]}' if previous else
              'rerun the same command')
    return CheckpointError(f'Disk full: the checkpoint of step {step} {need}. Free some space (or '
                           f'move the workdir), then {resume}. No checkpoint was deleted.')

  def restore(self, target: Any, which: str = 'latest', step: Optional[int] = None,
              architecture: Optional[dict] = None):
    """(state, meta) of one step, restored onto `target`'s structure and shardings and checked."""
    found = self.latest_step(which) if step is None else step
    available = self.steps()
    if found is None or found not in available:
      what = f'checkpoint at step {step}' if step is not None else f'{which} checkpoint'
      have = f'it has steps {available}' if available else 'it has no checkpoints'
      raise CheckpointNotFoundError(f'No {what} in {self._manager.directory}: {have}.', which,
                                    step, available)
    return self._restore(found, target, architecture)

  def _restore(self, step: int, target: Any, architecture: Optional[dict]):
    meta = self._check_readable(step, architecture)
    where = self._step_dir(step)
    try:
      state = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
    except Exception as e:  # noqa: BLE001 - any read failure means the same to the user
      self._check_state_settings(step, target)
      raise DamagedCheckpointError(where, step,
                                   f'it could not be restored ({_reason(e)})') from None
    bad = nonfinite_leaves(state)
    if bad:
      raise DamagedCheckpointError(where, step, f'{bad[0]} holds NaN/Inf' +
                                   (f' (and {len(bad) - 1} more arrays)' if bad[1:] else ''))
    return state, meta

  def _check_state_settings(self, step: int, target: Any) -> None:
    """Names the changed setting (ema_decay turned on or off) behind a tree mismatch, instead of
    calling an intact step unusable."""
    if target is None:
      return
    try:
      saved = self._manager.item_metadata(step)['state']
      wanted = target if isinstance(target, dict) else vars(target)
      fields = sorted(k for k in saved.keys() if k in wanted)
    except Exception:  # noqa: BLE001 - no readable metadata: the damage is reported instead
      return
    differ = [k for k in fields
              if len(jax.tree.leaves(saved[k])) != len(jax.tree.leaves(wanted[k]))]
    if not differ:
      return
    settings = [STATE_SETTINGS.get(k, k) for k in differ]
    raise CheckpointSettingsError(
        f'Checkpoint {self._step_dir(step)} is intact but was made with other settings: '
        f'{", ".join(settings)} changed (the saved {", ".join(differ)} differ from what this '
        'config makes). Use the values the run was made with, or a new --workdir.',
        differ, settings)

  def _check_readable(self, step: int, architecture: Optional[dict]) -> dict:
    """The step's meta, once its checksums pass and it is the config's network."""
    where = self._step_dir(step)
    status = self._status(step)
    if status == 'unverified':
      logging.warning('Checkpoint %s has no %s (the run was killed just after saving it): it is '
                      'read unverified.', where, CHECKSUMS)
    elif status is not None:
      raise DamagedCheckpointError(where, step, status)
    try:
      meta = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # noqa: BLE001
      raise DamagedCheckpointError(where, step, f'its meta is unreadable ({_reason(e)})') from None
    if self.run_id and meta.get('run_id') and meta['run_id'] != self.run_id:
      raise ForeignCheckpointError(where, step, meta['run_id'], self.run_id)
    if architecture is not None and meta.get('architecture') != architecture:
      raise CheckpointError(
          f'Checkpoint {where} holds a different network ({meta.get("architecture")}) than the '
          f'config asks for ({architecture}). Use the config that made it, or a new --workdir.')
    return meta

  def resume(self, target: Any, architecture: Optional[dict] = None):
    """(state, meta) of the newest intact step, or (None, None) for a fresh run. A damaged best
    step must be recomputed, so the run resumes before it; later steps are set aside."""
    steps = self.steps()
    if not steps:
      return None, None
    damaged = {}  # where -> reason
    limit = None  # resume strictly before this step: the damaged best one
    best = self.latest_step('best')
    if best is not None:
      try:
        if self._status(best) == 'unverified':
          self._restore(best, None, architecture)
        else:
          self._check_readable(best, architecture)
      except DamagedCheckpointError as e:
        damaged[e.where] = e.reason
        limit = best
    for step in reversed(steps):
      if limit is not None and step >= limit:
        continue
      try:
        state, meta = self._restore(step, target, architecture)
      except DamagedCheckpointError as e:
        damaged[e.where] = e.reason
        continue
      self._set_aside([self._step_dir(s) for s in steps if s > step], damaged, step)
      return state, meta
    listed = '; '.join(f'{where}: {reason}' for where, reason in damaged.items())
    raise CheckpointError(
        f'No usable checkpoint to resume from in {self.workdir} ({listed}). Use a new --workdir, '
        f'or move {os.path.join(self.workdir, "checkpoints")} aside to start this run over. '
        'Nothing was deleted.')

  def _set_aside(self, moves: list, damaged: dict, resumed: int) -> None:
    """Moves step directories out of the manager's sight into `workdir/set_aside/`."""
    aside = os.path.join(self.workdir, SET_ASIDE)
    for where in moves:
      base = os.path.join(aside, f'checkpoints-{os.path.basename(where)}')
      destination, copy = base, 1
      while os.path.exists(destination):
        destination, copy = f'{base}.{copy}', copy + 1
      why = damaged.get(where, 'intact, but after the damaged best step, which the run recomputes')
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        os.replace(where, destination)
      logging.warning('Checkpoint %s is unusable (%s): moved it to %s; resuming from step %d, the '
                      'newest intact one.', where, why, destination, resumed)
    if moves:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('se_resnet_jax: checkpoints set aside')
      self._manager.reload()

  def close(self) -> None:
    self._manager.close()
