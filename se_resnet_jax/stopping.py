"""Why a run stops early, and how it stops safely: a signal (preemption, Ctrl-C) or NaN/Inf.

Both stop the loop between steps. A signal lets the loop save a checkpoint first; a NaN/Inf stops it
before any save, so no checkpoint a resume would trust ever holds NaN.
"""

import contextlib
import os
import signal
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from se_resnet_jax import compilation
from se_resnet_jax.checkpoints import RunCheckpoints
from se_resnet_jax.errors import DivergedError
from se_resnet_jax.steps import TrainState


class Interruption:
  """Remembers a SIGTERM (preemption), SIGHUP (a closed ssh session) or SIGINT (Ctrl-C): the loop
  saves and exits between steps. Installed before anything compiles, so a Ctrl-C never lands
  inside XLA's compiler; a second Ctrl-C, or one after `disarm`, ends the process at once.

  With several processes a save started at different steps deadlocks, so JAX's preemption service
  agrees on one step for all of them, and a Ctrl-C is passed on to it as a SIGTERM.
  """

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self):
    handlers = {signal.SIGINT: self._on_sigint}
    if not self._multiprocess:
      handlers.update({signal.SIGTERM: self._on_sigterm, signal.SIGHUP: self._on_sigterm})
    for signum, handler in handlers.items():
      with contextlib.suppress(ValueError):  # not the main thread: no handler, as in a library
        self._previous[signum] = signal.signal(signum, handler)
    return self

  def _on_sigterm(self, signum, frame):
    self.signal_name = self.signal_name or (signal.Signals(signum).name if signum else 'SIGTERM')

  def _on_sigint(self, signum, frame):
    self.signal_name = 'SIGINT'
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    logging.warning('SIGINT: finishing the current step and saving a checkpoint; press Ctrl-C '
                    'again to abort at once (losing the steps since the last checkpoint).')
    if self._multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)

  def before_training(self) -> bool:
    """Whether a signal came before the first step (only a single process stops there)."""
    return self.signal_name is not None and not self._multiprocess

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; called after every step, by every process."""
    if self._multiprocess:
      try:
        synced = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # jax_enable_preemption_service=False
        logging.warning('No preemption checkpoints: %s', e)
        self._multiprocess = False
      else:
        if synced:
          self.signal_name = self.signal_name or 'SIGTERM'
        return synced
    return self.signal_name is not None

  def disarm(self) -> None:
    """Puts the previous handlers back: from now on nothing is saved on a signal."""
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def __exit__(self, *exc):
    self.disarm()


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def check_finite(loss: float, step: int, ckpts: RunCheckpoints, workdir: str,
                  state: Optional[TrainState] = None) -> None:
  """Raises before any save once the loss or (with `state`) the weights are NaN/Inf: an update
  that overflows leaves the loss, computed before it, finite."""
  if np.isfinite(loss) and (state is None or bool(compilation.jit(_all_finite)(
      (state.params, state.batch_stats, state.opt_state, state.ema_params)))):
    return
  last = ckpts.latest_intact_step()  # never a step whose checksums were not verified
  what = f'Training loss became {loss}' if not np.isfinite(loss) else 'The weights became NaN/Inf'
  where = (f'the last good checkpoint (step {last}, its checksums verified) in {workdir} is intact'
           if last is not None else f'no checkpoint in {workdir} is verified intact')
  raise DivergedError(
      f'{what} by step {step}. Nothing was saved after this; {where}. Lower '
      '--config.learning_rate (or add warmup) and rerun with the same --workdir to resume from it.')
