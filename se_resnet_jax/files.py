"""Files a run leaves behind: written atomically, pictures without a display, Markdown tables.

A run killed mid-write leaves the previous version of a file, never a truncated one.
"""

import contextlib
import functools
import json
import math
import os
import sys
import uuid
from typing import IO, Any, Iterator, Mapping, Sequence

import numpy as np
from absl import logging

from se_resnet_jax.errors import UserError


class OutputPathError(UserError):
  """An output path the user named (`flag`) that cannot be written; nothing was computed or written.
  `reason`: 'exists', 'no_directory', 'not_writable' or 'is_directory'."""

  def __init__(self, message: str, path: str, flag: str, reason: str):
    super().__init__(message)
    self.path, self.flag, self.reason = path, flag, reason


def check_output(path: str, flag: str, overwrite: bool = False, *,
                 directory: bool = False) -> None:
  """Refuses, before any compute, an output path a user named that could not be written: an
  existing file unless `overwrite`; with `directory`, a folder to be (created and) filled."""
  full = os.path.abspath(path)
  refuse = lambda text, reason: OutputPathError(text, path, flag, reason)
  if directory:
    if os.path.exists(full) and not os.path.isdir(full):
      raise refuse(f'{flag}={path} is a file, not a directory: choose another {flag}.', 'exists')
    existing = full
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
  else:
    if os.path.isdir(full):
      raise refuse(f'{flag}={path} is a directory; name a file.', 'is_directory')
    if os.path.lexists(full) and not overwrite:
      raise refuse(f'{path} already exists; pass --overwrite to replace it, or choose another '
                   f'{flag}.', 'exists')
    existing = os.path.dirname(full)
    if not os.path.isdir(existing):
      raise refuse(f'{flag}={path}: its directory {os.path.dirname(path) or "."!r} does not '
                   'exist; create it first.', 'no_directory')
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise refuse(f'{flag}={path}: cannot write to {existing!r}; choose a writable {flag}.',
                 'not_writable')


def write_output(path: str, data: Any, flag: str, overwrite: bool = False) -> None:
  """Writes `data` (bytes or str) atomically, checked again: the file may have appeared since."""
  check_output(path, flag, overwrite)
  with atomic_open(path, 'wb' if isinstance(data, (bytes, bytearray)) else 'w') as f:
    f.write(data)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w') -> Iterator[IO[Any]]:
  """Opens a temporary sibling of `path` (same directory: an atomic rename) that replaces `path`
  only once complete; on any error it is removed and `path` is left untouched."""
  directory, name = os.path.split(os.path.abspath(path))
  stem, ext = os.path.splitext(name)  # same extension, for tools that sniff names
  tmp_path = os.path.join(directory, f'.{stem}.{uuid.uuid4().hex}.tmp{ext}')
  try:
    with open(tmp_path, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp_path)
    raise


def to_jsonable(value: Any) -> Any:
  """Strict JSON values: NaN/Inf (a diverged run) become null, numpy values Python ones and
  anything else unknown its string form, instead of failing the report."""
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic)):
    return to_jsonable(value.tolist())
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if value is None or isinstance(value, (bool, int, str)):
    return value
  return str(value)


def write_json_atomic(path: str, value: Any) -> None:
  """Strict JSON, replacing `path` only once fully written."""
  with atomic_open(path) as f:
    json.dump(to_jsonable(value), f, indent=2)
    f.write('\n')


def write_text(path: str, lines: Sequence[str]) -> None:
  """Replaces `path` atomically with `lines`, so an interrupted write never leaves half a table."""
  with atomic_open(path) as f:
    f.write('\n'.join(lines) + '\n')


@functools.cache
def drawing_available() -> bool:
  """Whether matplotlib (not in the core install) is there; without it, says once that the
  pictures are skipped."""
  try:
    import matplotlib  # noqa: F401 - only whether it imports
    return True
  except ImportError:
    logging.warning('matplotlib is not installed: the pictures (PNG) are skipped; report.json and '
                    'report.md are written. `pip install matplotlib` (or the [data] extra) adds '
                    'them.')
    return False


def pyplot() -> Any:
  """pyplot, imported lazily, on the headless Agg backend unless the caller (a notebook) already
  imported it: switching backends would close its open figures."""
  import matplotlib
  if 'matplotlib.pyplot' not in sys.modules:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig: Any, path: str) -> None:
  """Writes `fig` as a PNG atomically and frees it (pyplot keeps figures alive)."""
  plt = pyplot()
  try:
    with atomic_open(path, 'wb') as f:
      fig.savefig(f, format='png', dpi=100, bbox_inches='tight')
  finally:
    plt.close(fig)


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
  """Lines of a GitHub Markdown table (then a blank line), columns of numbers right-aligned."""
  columns = [[c for c in column if c != ''] for column in zip(*rows)]
  align = ['---:' if column and all(_numeric(c) for c in column) else '---' for column in columns]
  align += ['---'] * (len(header) - len(align))  # no rows: every column left-aligned
  cell = lambda v: str(v).replace('|', '\\|')  # a pipe would split the cell
  return (['| ' + ' | '.join(cell(h) for h in header) + ' |', '|' + '|'.join(align) + '|']
          + ['| ' + ' | '.join(cell(c) for c in row) + ' |' for row in rows] + [''])


def _numeric(cell: Any) -> bool:
  try:
    float(str(cell).strip('*').split(' ')[0].replace(',', '').replace('%', ''))
    return True
  except ValueError:
    return False
