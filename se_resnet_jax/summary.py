"""What a command prints when it ends: the result table and where the report's files are; for a
rerun of a finished run (its workdir holds report.json, which training writes last), that run read
back from its report instead of being loaded, compiled and evaluated again. The summary is built
from the report alone, so a fresh run and a rerun of a finished one end with the same text.
"""

import glob
import json
import os
import shlex
from typing import Optional

import jax
import ml_collections
from absl import logging
from flax import traverse_util

from se_resnet_jax import report as report_lib
from se_resnet_jax.errors import UserError
from se_resnet_jax.report import REPORT_JSON

# Fields that say where the data is or how often to print, not what the run computes: a finished
# run moved to another machine, or rerun with another TFDS_DATA_DIR, is still the same run.
RERUN_NEUTRAL_FIELDS = ('data_dir', 'npz_path', 'download', 'log_every_steps')


def _flat(config_dict: dict) -> dict:
  """A config as JSON holds it (tuples become lists), flattened to dotted names."""
  return traverse_util.flatten_dict(json.loads(json.dumps(config_dict)), sep='.')


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list:
  """Dotted names of the fields where `config` asks for another run than `saved` records."""
  from se_resnet_jax.config import base_config  # config imports the models; summary stays light

  # A field added since the run was saved asks for its default, which is what the run computed.
  saved = {**_flat(base_config().to_dict()), **_flat(saved)}
  current = _flat(config.to_dict())
  return sorted(k for k in saved.keys() | current.keys()
                if k not in RERUN_NEUTRAL_FIELDS and saved.get(k) != current.get(k))


class FinishedRunError(UserError):
  """A finished run's report cannot answer for this command: `reason` is 'data' (other data
  settings than the report's) or 'checkpoints' (the weights it reports on are gone)."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


def read_report(workdir: str) -> Optional[dict]:
  """The workdir's report.json; None when there is none, or it is damaged (with a warning), as
  after a full disk or a kill during a copy: the run is then evaluated again, which rewrites it."""
  path = os.path.join(workdir, REPORT_JSON)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      report = json.load(f)
  except (OSError, ValueError) as e:
    logging.warning('%s is unreadable (%s): treating the run as unreported; its checkpoints are '
                    'evaluated again.', path, str(e).splitlines()[0][:100] or type(e).__name__)
    return None
  return report if isinstance(report, dict) else None


def finished_report(workdir: str, config: ml_collections.ConfigDict,
                    allow_changed_data: bool = False) -> Optional[dict]:
  """The report of the finished run in `workdir` if `config` asks for that very run (the same
  config but for RERUN_NEUTRAL_FIELDS), else None. Other data settings (an npz_path moved elsewhere
  may hold other arrays) or lost weights raise FinishedRunError, unless `allow_changed_data` asks
  to evaluate the run's checkpoints again on the data given."""
  from se_resnet_jax import input_pipeline

  report = read_report(workdir)
  if report is None or 'config' not in report or config_differences(report['config'], config):
    return None
  try:
    input_pipeline.check_same_data(report['data'], input_pipeline.data_identity(config),
                                   f'The finished run in {workdir}')
  except input_pipeline.DataSettingsChangedError as e:
    if allow_changed_data:
      return None
    raise FinishedRunError(f'{e} Going on evaluates its weights on these data.', 'data') from None
  step = report['weights']['step']
  if not os.path.isdir(os.path.join(workdir, 'checkpoints', str(step))):
    raise FinishedRunError(
        f'{workdir} holds a finished run whose {REPORT_JSON} reports on step {step}, but that '
        f'checkpoint is no longer in {os.path.join(workdir, "checkpoints")}: its numbers cannot be '
        f'tied to weights. Put the checkpoints back, or move {REPORT_JSON} aside to evaluate what '
        'is left, or use a new --workdir.', 'checkpoints')
  return report


def ensure_markdown(workdir: str, report: dict) -> None:
  """Rewrites a missing report.md (a kill between the two writes), which the summary points at."""
  path = os.path.join(workdir, 'report.md')
  if not os.path.exists(path):
    report_lib.write_markdown(report, path, figures=report_lib.figures_in(workdir))
    logging.warning('%s was missing: rewrote it from %s.', path, REPORT_JSON)


def finished_message(workdir: str, report: dict) -> str:
  """What a rerun of a finished run says instead of training: and how to train it further."""
  epochs = report['epochs_completed']
  text = (f'{workdir} holds a finished run ({epochs} epoch{"s" if epochs != 1 else ""}, '
          f'{REPORT_JSON}): nothing to train; its results are below. ')
  stopped = report.get('early_stopping', {}).get('stopped_epoch')
  if stopped:
    text += f'Early stopping ended it at epoch {stopped}, so more epochs would not train; '
  elif report_lib.stopped_by_max_steps(report):
    text += ('It stopped at max_steps; to train further rerun with a larger --config.max_steps '
             '(or -1): it continues from its last checkpoint. ')
  else:
    text += (f'To train it longer, rerun with a larger --config.num_epochs (e.g. '
             f'--config.num_epochs={2 * report["config"]["num_epochs"]}): it continues from its '
             'last checkpoint, with the learning-rate schedule recomputed for the new length. ')
  return text + 'To start over, use a new --workdir.'


def closing_summary(workdir: str, report: dict) -> str:
  """The result table (split, accuracy, loss, best epoch) and the paths of the report's files."""
  weights = report['weights']
  model = report.get('config', {}).get('model', {}).get('name', 'model')
  lines = [f'Results of {workdir}: {model} on {report.get("dataset", "?")}, '
           f'weights of epoch {weights["epoch"]} of {report["epochs_completed"]}, step '
           f'{weights["step"]} of run {weights["run_id"]} ({weights["chosen_by"]})', '']
  best = report.get('best_epoch')
  rows = [('split', 'accuracy', 'loss', 'best epoch')]
  rows += [(split, f'{100 * report[split]["accuracy"]:.2f}%', f'{report[split]["loss"]:.4f}',
            '-' if best is None else str(best))
           for split in ('validation', 'test') if report.get(split)]
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  for row in rows:
    lines.append('  ' + '  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                  for i, (cell, w) in enumerate(zip(row, widths))))
  pictures = [os.path.join(workdir, name) for name in report_lib.figures_in(workdir).values()]
  lines += ['', f'  report       {os.path.join(workdir, "report.md")} (numbers: '
                f'{os.path.join(workdir, REPORT_JSON)})',
            f'  pictures     {", ".join(pictures) if pictures else "none (install matplotlib)"}']
  if glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    lines.append(f'  TensorBoard  tensorboard --logdir {shlex.quote(workdir)}')
  return '\n'.join(lines)


def print_summary(workdir: str, report: dict) -> None:
  """The closing summary on stdout (progress goes to stderr), from process 0 only."""
  if jax.process_index() == 0:
    print(closing_summary(workdir, report))
