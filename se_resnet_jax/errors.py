"""The errors a user can fix, and the one stop that is not an error.

The commands print a `UserError` as one line (its message says what is wrong and what to do) and
let every other exception keep its traceback: an internal bug must never look like a bad flag.
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
  """The run saved a checkpoint on SIGTERM and stopped; rerunning the same command resumes it."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f'SIGTERM: saved a checkpoint at step {step} in {workdir}; rerun the same '
                     'command to resume.')
    self.step = step
    self.workdir = workdir
