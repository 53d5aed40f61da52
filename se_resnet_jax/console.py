"""What a run tells the person watching it: one progress display, one line per epoch; on stderr,
so that stdout carries only a command's result (`... > result.txt` keeps the closing summary).
"""

import sys
import time
from typing import IO, Optional

import jax

_BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
  """'1h02m03s', '4m05s' or '6s': short enough for a progress line, exact enough for an ETA."""
  seconds = max(0, int(round(seconds)))
  hours, minutes, secs = seconds // 3600, seconds % 3600 // 60, seconds % 60
  if hours:
    return f'{hours}h{minutes:02d}m{secs:02d}s'
  return f'{minutes}m{secs:02d}s' if minutes else f'{secs}s'


class Console:
  """Lines for a person, on stderr of process 0 (the others would repeat it). On a terminal a
  progress line is redrawn in place; elsewhere (a file, a pipe, a notebook) it is a line of its own.
  """

  def __init__(self, stream: Optional[IO[str]] = None, enabled: Optional[bool] = None):
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    try:
      self.live = self.enabled and self.stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
      self.live = False
    self._pending = False  # a live line is on screen without its newline

  def say(self, text: str) -> None:
    """A line that stays."""
    if self.enabled:
      self.stream.write(('\n' if self._pending else '') + text + '\n')  # ends a live line
      self.stream.flush()
      self._pending = False

  def update(self, text: str) -> None:
    """A progress line: redrawn in place on a terminal, else written as a line of its own."""
    if not self.live:
      return self.say(text)
    self.stream.write('\r\033[K' + text)
    self.stream.flush()
    self._pending = True


class TrainingProgress:
  """The training loop's display: a progress line every `log_every_steps`, a line per epoch.

  The one ETA counts the remaining steps at the rate measured since the first progress line of
  this process, so it covers validation and checkpoint time as they recur, and neither the compile
  nor a resumed run's earlier life skews it.
  """

  def __init__(self, console: Console, total_steps: int, steps_per_epoch: int, num_epochs: int,
               batch_size: int, start_step: int):
    self.console = console
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch
    self.num_epochs = min(num_epochs, -(-total_steps // steps_per_epoch))
    self.batch_size = batch_size
    self._start: Optional[tuple] = None  # (time, step) of the first progress line
    self._last = (time.perf_counter(), start_step)

  def step(self, step: int, scalars: dict) -> None:
    """The progress line after `step`, with the running train loss and accuracy of the epoch."""
    now = time.perf_counter()
    last_time, last_step = self._last
    images_per_s = (step - last_step) * self.batch_size / max(now - last_time, 1e-9)
    if self._start is None:
      self._start = (last_time, last_step)
    start_time, start_step = self._start
    rate = (step - start_step) / max(now - start_time, 1e-9)
    self._last = (now, step)
    done = step / self.total_steps
    bar = ''
    if self.console.live:
      filled = int(_BAR_WIDTH * done)
      bar = f'[{"#" * filled}{"." * (_BAR_WIDTH - filled)}] {100 * done:3.0f}%  '
    epoch = (step - 1) // self.steps_per_epoch + 1
    self.console.update(
        f'{bar}step {step}/{self.total_steps}  epoch {epoch}/{self.num_epochs}  '
        f'loss {scalars["loss"]:.4f}  acc {scalars["accuracy"]:.4f}  {images_per_s:,.0f} img/s  '
        f'ETA {format_duration((self.total_steps - step) / rate)}')

  def epoch(self, row: dict, best: bool) -> None:
    """The line of a finished epoch: train, validation (when run) and time."""
    text = (f'epoch {row["epoch"]}/{self.num_epochs}  train loss {row["train_loss"]:.4f} '
            f'acc {row["train_accuracy"]:.4f}')
    if 'val_loss' in row:
      text += (f'  |  val loss {row["val_loss"]:.4f} acc {row["val_accuracy"]:.4f}'
               f'{" (best)" if best else ""}')
    text += (f'  |  {format_duration(row["epoch_time_s"])}, '
             f'{row["train_images_per_s"]:,.0f} img/s, lr {row["learning_rate"]:.3g}')
    self.console.say(text)
    self._last = (time.perf_counter(), row['step'])  # img/s of the next line: training alone
