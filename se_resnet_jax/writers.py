"""Where a run's numbers go: TensorBoard through clu's writer, or nowhere but the report without it.

The loop calls a writer for epoch scalars and hparams, and hooks after every step; tests and
notebooks pass their own instead of patching the loop.
"""

from typing import Any, Callable

import jax
import ml_collections
from absl import logging
from flax import traverse_util

Hook = Callable[[int, Any], Any]  # called by the loop after every step with (step, state)


class NullWriter:
  """Writes nothing: without TensorBoard or with config.tensorboard off, and on processes other
  than 0."""

  def write_scalars(self, step, scalars):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str, tensorboard: bool = True) -> Any:
  """TensorBoard summaries in `workdir` on process 0: clu's SummaryWriter alone, since its default
  writer also logs every scalar, repeating the console's epoch line."""
  if jax.process_index() > 0 or not tensorboard:
    return NullWriter()
  try:  # clu's summary writer imports TensorBoard and TensorFlow
    from clu import metric_writers
  except ImportError:
    logging.warning('TensorBoard is not installed: no TensorBoard logs (the per-epoch numbers are '
                    'in report.json). `pip install tensorboard tensorflow` or the [data] extra '
                    'adds them.')
    return NullWriter()
  return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])


def hparams(config: ml_collections.ConfigDict) -> dict:
  """The config as TensorBoard hparams: every scalar field under its dotted name."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
