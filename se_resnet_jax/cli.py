"""What every command shares: one-line errors for bad flags and configs, a quiet log, --help.

Users meet the library through these commands; a typo in a flag or config must end in one line that
says what to do, not a traceback, and the libraries' INFO chatter (JAX's backend probing, orbax's
per-save lines, JAX's cache resets) must not bury the progress lines: it shows with -v 1.
"""

import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import app, flags, logging

from se_resnet_jax.config import base_config
from se_resnet_jax.errors import Preempted, UserError
from se_resnet_jax.usage import exit_with_help_if_asked

FLAGS = flags.FLAGS

# What a user can fix, said in one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError,)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library_or_warning(record) -> bool:
  """Log records a person reads by default: this library's, and anyone's warnings and errors."""
  return (record.levelno >= std_logging.WARNING
          or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


def _quiet_logs() -> None:
  """Hides other libraries' INFO logs unless --verbosity (-v) was given."""
  if FLAGS['verbosity'].present:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ INFO, if it gets imported
  logging.get_absl_handler().addFilter(_library_or_warning)


def _drop_closed_loop_noise(unraisable, default=sys.unraisablehook) -> None:
  """Silences the reads still in flight when orbax gives up restoring a damaged checkpoint.

  Once one read fails, orbax closes its event loop; each tensorstore read finishing later reports
  'Event loop is closed' as an unraisable exception, dozens of tracebacks that bury the one-line
  error. Nothing else is hidden.
  """
  value = unraisable.exc_value
  if not (isinstance(value, RuntimeError) and 'Event loop is closed' in str(value)):
    default(unraisable)


def _loaded_config():
  """The config the --config flag loaded, or None when loading or an override failed."""
  value = FLAGS['config'].value
  try:
    value.keys()
  except Exception:  # noqa: BLE001 - None, or config_flags' placeholder for a failed load
    return None
  return value


def _bad_override(argv) -> str:
  """Names the first --config.a.b=... override whose key no config has, with the known keys.

  Every config starts from `base_config()` (validate_config refuses other keys), so it is the
  reference even when config_flags failed before exposing the loaded config.
  """
  for arg in argv[1:]:
    match = re.match(r'--config\.([^=]+)', arg)
    if not match:
      continue
    node, path = base_config(), []
    for key in match.group(1).split('.'):
      if not hasattr(node, 'keys') or key not in node.keys():
        where = '.'.join(path)
        known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else 'none (not a group)'
        return (f'Unknown config key {".".join(path + [key])!r} in {arg!r}. Known keys'
                f'{" under " + repr(where) if where else ""}: {known}.')
      node, path = node[key], path + [key]
  return ''


def _flag_error(argv, error: Exception) -> str:
  """A one-line explanation of a command-line error."""
  text = ' '.join(str(error).split()).rstrip('.')
  path = next((a.split('=', 1)[1] for a in reversed(argv) if a.startswith('--config=')), '?')
  if 'Failed loading config file' in str(error):  # a --config file missing or not importable
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f'Cannot load --config={path}: {lines[-1]}.'
  problem = _bad_override(argv)
  if problem:
    return problem
  match = re.match(r'flag --config\.([\w.]+)=(.*?): (.*)', text)
  if match:
    current = _loaded_config() or base_config()
    for key in match.group(1).split('.'):
      current = current[key]
    if hasattr(current, 'keys'):
      return (f'--config.{match.group(1)} is a group of fields: set one of them, e.g. '
              f'--config.{match.group(1)}.{sorted(current.keys())[0]}=...')
    reason = '' if isinstance(current, bool) else f' ({match.group(3)})'
    return (f'Bad value in --config.{match.group(1)}={match.group(2)}: expected type '
            f'{type(current).__name__}, like {current!r}{reason}.')
  if not isinstance(error, flags.Error):  # raised by the config file's own code
    return f'Cannot load --config={path}: {type(error).__name__}: {text}.'
  return f'{text}. Pass --helpfull to see the flags.'


def _find_config_file(argv: Sequence[str]) -> list:
  """argv with --config=configs/x.py found in the repository when it is not in the current folder.

  The config files live in the repository (beside the package of an editable install), so the
  README's commands work from any folder: a relative path is read from the current folder first.
  """
  found = list(argv)
  for i, arg in enumerate(found):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
      in_repo = os.path.join(_REPO_DIR, path)
      if path and not os.path.isabs(path) and not os.path.exists(path) and os.path.isfile(in_repo):
        found[i] = f'--config={in_repo}'
  return found


def parse_flags(argv):
  """absl's flag parsing, but a bad --config file or override ends in one line, not a traceback.

  ml_collections raises plain KeyError/AttributeError/IOError for an unknown override key or a
  config file that does not load, which absl would show as a long traceback. --help shows the
  command's own flags and every config field, and exits 0.
  """
  argv = _find_config_file(argv)
  exit_with_help_if_asked(argv)
  try:
    args = FLAGS(argv)
    if FLAGS['config'].value is not None:
      FLAGS['config'].value.keys()  # a config file that failed to load raises only when used
  except Exception as e:  # noqa: BLE001 - every parse failure is a user error
    try:
      message = _flag_error(argv, e)
    except Exception:  # noqa: BLE001 - an unforeseen shape of error: absl's own words
      message = ' '.join(str(e).split())
    sys.exit(f'error: {message}')
  return args


def run(argv: Sequence[str], command: Callable[[], Any]) -> Any:
  """Runs a command's body with the quiet log; user errors end in one `error:` line.

  A preempted run is no error: it saved its checkpoint, says how to resume and exits with 0.
  Ctrl-C (SIGINT) stops the same way with status 130; outside the training loop, and on a second
  Ctrl-C, the command ends at once, with status 130 too.
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  _quiet_logs()
  sys.unraisablehook = _drop_closed_loop_noise
  try:
    return command()
  except Preempted as e:
    logging.warning('%s', e)
    if e.exit_code:
      sys.exit(e.exit_code)
    return None
  except USER_ERRORS as e:
    logging.debug('%s: %s', type(e).__name__, e)  # the type, for -v 1; the user reads one line
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:
    print('error: interrupted (Ctrl-C).', file=sys.stderr)
    sys.exit(130)
