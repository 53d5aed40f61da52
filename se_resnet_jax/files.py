"""Files a run leaves behind: written atomically, pictures without a display, Markdown tables.

Every file is written to a temporary sibling and renamed into place (`os.replace`), so a run killed
mid-write leaves the previous version intact rather than a truncated `report.json` or table.
matplotlib is imported only when a picture is drawn, so importing this module stays cheap.
"""

import contextlib
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
  """A path the user named for output that cannot be written; nothing was computed or written.

  `path` is the path as given, `flag` the option that named it (e.g. '--csv') and `reason` one of
  'exists', 'no_directory', 'not_writable', 'is_directory'.
  """

  def __init__(self, message: str, path: str, flag: str, reason: str):
    super().__init__(message)
    self.path, self.flag, self.reason = path, flag, reason


def check_output(path: str, flag: str, overwrite: bool = False, *,
                 directory: bool = False) -> None:
  """Refuses, before any compute, an output path a user named that could not be written.

  Every command that writes where a user says (`--out`, `--to_torch`, `--csv`, `--output_dir`)
  calls this first, so a missing folder or a typo costs nothing and an existing file is never
  replaced unless `overwrite`. With `directory`, `path` is a folder to be (created and) filled: an
  existing one is fine, an existing file is not.
  """
  full = os.path.abspath(path)
  if directory:
    if os.path.exists(full) and not os.path.isdir(full):
      raise OutputPathError(f'{flag}={path} is a file, not a directory: choose another {flag}.',
                            path, flag, 'exists')
    existing = full
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
  else:
    if os.path.isdir(full):
      raise OutputPathError(f'{flag}={path} is a directory; name a file.', path, flag,
                            'is_directory')
    if os.path.lexists(full) and not overwrite:
      raise OutputPathError(f'{path} already exists; pass --overwrite to replace it, or choose '
                            f'another {flag}.', path, flag, 'exists')
    existing = os.path.dirname(full)
    if not os.path.isdir(existing):
      raise OutputPathError(f'{flag}={path}: its directory {os.path.dirname(path) or "."!r} does '
                            'not exist; create it first.', path, flag, 'no_directory')
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise OutputPathError(f'{flag}={path}: cannot write to {existing!r}; choose a writable '
                          f'{flag}.', path, flag, 'not_writable')


def write_output(path: str, data: Any, flag: str, overwrite: bool = False) -> None:
  """Writes `data` (bytes or str) to a path a user named: checked again, then atomically.

  Checked again because the computation between `check_output` and this write may have taken
  minutes, in which time the file may have appeared.
  """
  check_output(path, flag, overwrite)
  with atomic_open(path, 'wb' if isinstance(data, (bytes, bytearray)) else 'w') as f:
    f.write(data)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w') -> Iterator[IO[Any]]:
  """Opens a temporary sibling of `path` that replaces `path` only once complete.

  The temporary file lives in the same directory so `os.replace` is an atomic rename; on any
  error it is removed and `path` is left untouched.
  """
  directory, name = os.path.split(os.path.abspath(path))
  stem, ext = os.path.splitext(name)
  # Same extension, so tools that sniff names see the right type; hidden and unique.
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
  """Converts a report (numpy scalars, tuples, NaN...) to strict JSON values.

  Diverged runs produce NaN losses and configs may hold numpy scalars; strict JSON readers (jq,
  browsers) reject NaN, so non-finite floats become null and anything else unknown becomes its
  string form instead of failing the report.
  """
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return to_jsonable(value.tolist())
  if isinstance(value, np.generic):
    return to_jsonable(value.item())
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


_told_no_matplotlib = False


def drawing_available() -> bool:
  """Whether matplotlib is installed; without it, says once per process that pictures are skipped.

  The core install (`pip install .`) has no matplotlib: its runs still write report.json and
  report.md, and only the PNGs are missing.
  """
  global _told_no_matplotlib
  try:
    import matplotlib  # noqa: F401 - only whether it imports
    return True
  except ImportError:
    pass
  if not _told_no_matplotlib:
    logging.warning('matplotlib is not installed: the pictures (PNG) are skipped; report.json and '
                    'report.md are written. `pip install matplotlib` (or the [data] extra) adds '
                    'them.')
    _told_no_matplotlib = True
  return False


def pyplot() -> Any:
  """Imports pyplot lazily on the headless Agg backend.

  Lazily so importing the library never pays for matplotlib; Agg so reports render on
  accelerator hosts without a display. If the caller already imported pyplot (e.g. in a notebook)
  its backend is kept, because switching backends closes the caller's open figures; saving to a
  file works on any backend.
  """
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
  head = str(cell).strip('*').split(' ')[0].replace(',', '').replace('%', '')
  try:
    float(head)
  except ValueError:
    return False
  return True
