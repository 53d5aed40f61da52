"""A run's progress: what every checkpoint records beside the weights (its JSON `meta` item).

A resume reads it back to continue the curves, the choice of the best checkpoint and early
stopping exactly where the saved step left them; a report reads the same fields.
"""

import dataclasses
from typing import Optional

import ml_collections


@dataclasses.dataclass
class Progress:
  architecture: dict  # config.architecture: the network the weights are of
  epoch: int = 0
  history: list = dataclasses.field(default_factory=list)  # one row of scalars per epoch
  best_val_accuracy: Optional[float] = None
  best_epoch: Optional[int] = None
  stopped_epoch: Optional[int] = None  # set when early stopping ends the run
  monitor_best: Optional[float] = None  # early stopping: the best monitored value so far
  bad_evaluations: int = 0  # evaluations since the monitored value last improved by min_delta

  def to_meta(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_meta(cls, meta: dict) -> 'Progress':
    """The progress a checkpoint recorded (keys the checkpoint adds beside it are left out)."""
    return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})

  def validated(self, row: dict, early_stopping: ml_collections.ConfigDict) -> bool:
    """Records the validation result in `row` (an epoch's); whether it is the best so far.

    The monitored value improves when it beats the best by more than `min_delta` (accuracy up,
    loss down); after `patience` evaluations without that, the run stops.
    """
    best = self.best_val_accuracy is None or row['val_accuracy'] > self.best_val_accuracy
    if best:
      self.best_val_accuracy, self.best_epoch = row['val_accuracy'], row['epoch']
    value = row[early_stopping.monitor]
    sign = -1.0 if early_stopping.monitor == 'val_loss' else 1.0
    if self.monitor_best is None or sign * (value - self.monitor_best) > early_stopping.min_delta:
      self.monitor_best, self.bad_evaluations = value, 0
    else:
      self.bad_evaluations += 1
    if early_stopping.enabled and self.bad_evaluations >= early_stopping.patience:
      self.stopped_epoch = row['epoch']
    return best
