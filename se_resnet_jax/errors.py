"""The errors a user can fix, and the one stop that is not an error.

The commands print a `UserError` as one line; every other exception keeps its traceback, so an
internal bug never looks like a bad flag.
"""


class UserError(Exception):
  """Something the user can fix (config, data, workdir, checkpoint, divergence); no traceback."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message says which and what to do."""


class WorkdirError(UserError, PermissionError):
  """The workdir cannot be used (a URL, not writable); nothing was written."""


class DivergedError(UserError, FloatingPointError):
  """The loss or the weights became NaN/Inf; the last good checkpoint is intact."""


class Preempted(Exception):
  """The run stopped on SIGTERM, SIGHUP or SIGINT with its progress saved; rerunning resumes.
  `saved`: False when the signal came before the first step. `exit_code`: 130 for SIGINT, as
  shells report Ctrl-C, else 0 (a preemption is no failure)."""

  def __init__(self, step: int, workdir: str, signal_name: str = 'SIGTERM', saved: bool = True):
    if saved:
      text = f'saved a checkpoint at step {step} in {workdir}; rerun the same command to resume.'
    else:
      text = (f'stopped before training (nothing new to save; the latest checkpoint in {workdir} '
              f'is step {step}); rerun the same command to resume.' if step else
              'stopped before training, nothing saved; rerun the same command to start.')
    super().__init__(f'{signal_name}: {text}')
    self.step, self.workdir, self.signal_name = step, workdir, signal_name
    self.exit_code = 130 if signal_name == 'SIGINT' else 0
