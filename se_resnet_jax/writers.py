"""Where a run's numbers go: TensorBoard through clu's writers, or the log alone without TensorFlow.

The loop calls a writer for epoch scalars and hparams, and hooks after every step; tests and
notebooks pass their own instead of patching the loop.
"""

from typing import Any, Callable

import jax
import ml_collections
from absl import logging
from flax import traverse_util

Hook = Callable[[int, Any], Any]  # called by the loop after every step with (step, state)


class LogOnlyWriter:
  """Stands in for clu's writers where TensorBoard/TensorFlow are not installed."""

  def write_scalars(self, step, scalars):
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))

  def write_hparams(self, hparams):
    logging.info('hparams: %s', hparams)

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str) -> Any:
  """clu's TensorBoard + log writer; the log alone where TensorFlow is absent."""
  try:  # clu's writers import TensorBoard and TensorFlow
    from clu import metric_writers
  except ImportError:
    logging.warning('TensorBoard/TensorFlow not installed: metrics go to the log only.')
    return LogOnlyWriter()
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def progress_hook(writer: Any, total_steps: int) -> Hook:
  """clu's steps/s and ETA report, as a loop hook (a no-op without clu's TensorFlow parts)."""
  try:
    from clu import periodic_actions
  except ImportError:
    return lambda step, state: None
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  return lambda step, state: report_progress(step)


def hparams(config: ml_collections.ConfigDict) -> dict:
  """The config as TensorBoard hparams: every scalar field under its dotted name."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}


