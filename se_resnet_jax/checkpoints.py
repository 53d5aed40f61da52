"""Orbax checkpoints of a run: the last K states and the best one by validation accuracy.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a process
killed mid-write leaves the previous checkpoints intact and the partial one is ignored on resume.
Each checkpoint carries a JSON `meta` item (epoch, history, early-stopping state, architecture) so a
resumed run continues its curves and refuses weights from a different network.
"""

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message says what to do. Nothing was deleted."""


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False),
      item_names=('state', 'meta'))


def _reason(error: Exception) -> str:
  """The first line of a restore error, without TensorStore's unprintable spec dump."""
  text = str(error).splitlines()[0] if str(error) else ''
  text = text.split(' See full TensorStore details')[0].rstrip('. ')
  return f'{type(error).__name__}: {text[:300]}'


class RunCheckpoints:
  """`workdir/checkpoints` keeps the latest K states; `workdir/best` keeps the best one."""

  def __init__(self, workdir: str, keep: int = 3):
    self.latest = _manager(os.path.join(workdir, 'checkpoints'), keep)
    self.best = _manager(os.path.join(workdir, 'best'), 1)

  def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self.latest.save(step, args=args, force=True)
    if best:
      if step in self.best.all_steps():  # left by an earlier life of a run resumed from before it
        self.best.delete(step)
      self.best.save(step, args=args, force=True)

  def latest_step(self, which: str = 'latest') -> Optional[int]:
    return getattr(self, which).latest_step()

  def restore(self, target: Any, which: str = 'latest', step: Optional[int] = None,
              architecture: Optional[dict] = None):
    """(state, meta) restored onto `target`'s structure and shardings; clear errors otherwise."""
    manager = getattr(self, which)
    step = manager.latest_step() if step is None else step
    where = os.path.join(str(manager.directory), str(step))
    if step is None or step not in manager.all_steps():
      raise CheckpointError(f'No {which} checkpoint{"" if step is None else f" at step {step}"} in '
                            f'{manager.directory} (have steps {list(manager.all_steps())}).')
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # noqa: BLE001 - any read failure means the same to the user
      raise CheckpointError(
          f'Checkpoint {where} is unreadable or damaged ({_reason(e)}). Move that step '
          'directory aside to resume from an earlier one, or use a new --workdir. '
          'Nothing was deleted.') from None
    if architecture is not None and meta.get('architecture') != architecture:
      raise CheckpointError(
          f'Checkpoint {where} holds a different network ({meta.get("architecture")}) than the '
          f'config asks for ({architecture}). Use the config that made it, or a new --workdir.')
    try:
      state = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
          f'Checkpoint {where} could not be restored ({_reason(e)}). It is damaged or from another '
          'network: move that step directory aside, or use a new --workdir. '
          'Nothing was deleted.') from None
    return state, meta

  def close(self) -> None:
    self.latest.close()
    self.best.close()
