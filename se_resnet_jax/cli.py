"""What every command shares: one-line errors for bad flags and configs, a quiet log, --help.

A typo ends in one line that says what to do, not a traceback; other libraries' INFO logs, which
would bury the progress lines, show only with -v 1.
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
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quiet_logs() -> None:
  """Shows only this library's logs and anyone's warnings, unless --verbosity (-v) was given."""
  if not FLAGS['verbosity'].present:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ INFO, if imported
    logging.get_absl_handler().addFilter(
        lambda record: (record.levelno >= std_logging.WARNING
                        or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)))


def _drop_closed_loop_noise(unraisable, default=sys.unraisablehook) -> None:
  """Silences the 'Event loop is closed' tracebacks of reads still in flight when orbax gives up
  restoring a damaged checkpoint: dozens of them would bury the one-line error."""
  value = unraisable.exc_value
  if not (isinstance(value, RuntimeError) and 'Event loop is closed' in str(value)):
    default(unraisable)


def _bad_override(argv) -> str:
  """Names the first --config.a.b=... override whose key `base_config()` (every config's start)
  lacks, with the known keys."""
  for arg in argv[1:]:
    match = re.match(r'--config\.([^=]+)', arg)
    if not match:
      continue
    node, path = base_config(), []
    for key in match.group(1).split('.'):
      known = sorted(node.keys()) if hasattr(node, 'keys') else []
      if key not in known:
        where = f' under {".".join(path)!r}' if path else ''
        return (f'Unknown config key {".".join(path + [key])!r} in {arg!r}. Known keys{where}: '
                f'{", ".join(known) or "none (not a group)"}.')
      node, path = node[key], path + [key]
  return ''


def _flag_error(argv, error: Exception) -> str:
  """A one-line explanation of a command-line error."""
  text = ' '.join(str(error).split()).rstrip('.')
  path = next((a.split('=', 1)[1] for a in reversed(argv) if a.startswith('--config=')), '?')
  if 'Failed loading config file' in str(error):  # a --config file missing or not importable
    return f'Cannot load --config={path}: {str(error).strip().splitlines()[-1].strip()}.'
  problem = _bad_override(argv)
  if problem:
    return problem
  match = re.match(r'flag --config\.([\w.]+)=(.*?): (.*)', text)
  if match:
    current = FLAGS['config'].value
    try:
      current.keys()
    except Exception:  # noqa: BLE001 - None, or config_flags' placeholder for a failed load
      current = base_config()
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
  """argv with a relative --config=configs/x.py that is not in the current folder taken from the
  repository (beside an editable install's package), so the README's commands work anywhere."""
  found = list(argv)
  for i, arg in enumerate(found):
    path = arg.split('=', 1)[1] if arg.startswith('--config=') else ''
    in_repo = os.path.join(_REPO_DIR, path)
    if path and not os.path.isabs(path) and not os.path.exists(path) and os.path.isfile(in_repo):
      found[i] = f'--config={in_repo}'
  return found


def parse_flags(argv):
  """absl's flag parsing, but a bad --config file or override ends in one line, not a traceback;
  --help shows the command's flags and every config field, and exits 0."""
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
  """Runs a command's body with the quiet log; user errors end in one `error:` line, and a
  preempted run (its checkpoint saved) exits 0, or 130 for Ctrl-C, as does Ctrl-C elsewhere."""
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
  except UserError as e:
    logging.debug('%s: %s', type(e).__name__, e)  # the type, for -v 1; the user reads one line
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:
    print('error: interrupted (Ctrl-C).', file=sys.stderr)
    sys.exit(130)
