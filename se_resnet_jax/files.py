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
