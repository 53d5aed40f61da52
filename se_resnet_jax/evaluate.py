"""Writes the evaluation report for any checkpoint of an existing run, without training.

  python -m se_resnet_jax.evaluate --workdir=runs/cifar10 --checkpoint=best --split=test

The run's config is read from `workdir/config.json` (written when training starts) unless --config
is given; it names where the training read its data (absolute paths, $TFDS_DATA_DIR filled in), so
no environment needs repeating. The report goes to `workdir/evaluation/<checkpoint>-<step>/`, so
the training report stays; while a run trains in the workdir, only an --output_dir outside it can
be written (the workdir is then only read).
"""

import contextlib
import os
import tempfile
from typing import Optional

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from se_resnet_jax import cli, files, input_pipeline, report, summary
from se_resnet_jax.console import Console
from se_resnet_jax.errors import ConfigError, WorkdirError
from se_resnet_jax.rundir import load_run_config, restore_run
from se_resnet_jax.sharding import data_mesh
from se_resnet_jax.steps import make_eval_step
from se_resnet_jax.workdir import WorkdirLockedError, workdir_lock

FLAGS = flags.FLAGS


def _check_writable(directory: str) -> None:
  """Fails before any work when the report could not be written (a read-only run, say), by
  writing a temporary file in the nearest existing directory: a permission check is no proof."""
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise WorkdirError(f'Cannot write the report to {directory!r} ({e.strerror} in {existing!r}): '
                       'pass --output_dir=<a writable directory>.') from None


@contextlib.contextmanager
def _lock_if_inside(workdir: str, directory: str):
  """The workdir's lock while writing into it; nothing when the report goes elsewhere."""
  if not os.path.realpath(directory).startswith(os.path.realpath(workdir) + os.sep):
    yield
    return
  try:
    with workdir_lock(workdir, jax.process_index()):
      yield
  except WorkdirLockedError as e:
    raise WorkdirLockedError(f'{e} Or pass --output_dir outside it to evaluate while it trains.',
                             e.holder, e.lock_path) from None


def evaluate_checkpoint(workdir: str, checkpoint: str = 'best', split: str = 'both',
                        output_dir: Optional[str] = None,
                        config: Optional[ml_collections.ConfigDict] = None,
                        tta_flip: Optional[bool] = None,
                        allow_changed_data: bool = False, data_dir: Optional[str] = None,
                        npz_path: Optional[str] = None, overwrite: bool = False) -> dict:
  """Writes the report of one checkpoint and returns it, with 'output_dir' saying where. Before
  any data is read, the report's directory must be writable and the checkpoint is restored and
  checked against the config, data settings included (an npz_path other than the run's too)."""
  if not os.path.isdir(workdir):
    raise WorkdirError(f'Workdir {workdir!r} does not exist.')
  destination = output_dir or os.path.join(workdir, 'evaluation')
  if output_dir is not None:
    files.check_output(output_dir, '--output_dir', directory=True)
    if os.path.isdir(output_dir):  # else it is made for this report
      files.check_output(os.path.join(output_dir, report.REPORT_JSON), '--output_dir', overwrite)
  _check_writable(destination)
  if data_dir is not None or npz_path is not None:
    config = config or load_run_config(workdir)
    config.data_dir = config.data_dir if data_dir is None else data_dir
    config.npz_path = config.npz_path if npz_path is None else npz_path
  with _lock_if_inside(workdir, destination):
    run = restore_run(workdir, checkpoint, config, allow_changed_data)
    config = run.config
    if tta_flip is not None:
      config.tta_flip = tta_flip
    data = input_pipeline.load_dataset(config, test_only=split == 'test')  # validation: train's
    if split == 'validation' and data.validation is None:
      raise ConfigError('This run has no validation split (validation_size=0); use --split=test.')
    splits = (('validation',) if data.validation is not None else ()) + ('test',)
    splits = splits if split == 'both' else (split,)
    epoch = run.progress.epoch
    Console().say(f'Evaluating checkpoint {checkpoint!r} of {workdir} (step {run.step}, epoch '
                  f'{epoch}) on {" and ".join(splits)}...')
    # The weights were trained on inputs scaled by the run's constants, whatever data they see now.
    eval_step = make_eval_step(config, run.model, run.record.mean, run.record.std)
    result = report.final_report(config, data, run.model, run.variables, run.step, run.progress,
                                 eval_step, data_mesh(), None, splits)
    result['weights'] = {'epoch': epoch, 'step': run.step, 'run_id': run.run_id,
                         'chosen_by': f'checkpoint {checkpoint!r} of {workdir}'}
    result['run_id'] = run.run_id
    result['data'] = input_pipeline.data_identity(config)  # the data it was evaluated on
    output_dir = output_dir or os.path.join(destination, f'{checkpoint}-{run.step}')
    if jax.process_index() == 0:
      report.write_report(output_dir, result, run.progress.history)
  result['output_dir'] = output_dir
  return result


def define_flags() -> None:
  """The command's flags; defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'The run directory (holds checkpoints/ and best/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest', or a step number.")
  flags.DEFINE_enum('split', 'both', ['validation', 'test', 'both'], 'Which split(s) to evaluate.')
  flags.DEFINE_string('output_dir', None, 'Where to write the report (default under the workdir).')
  flags.DEFINE_bool('overwrite', False, 'Replace the report an --output_dir already holds.')
  flags.DEFINE_bool('tta_flip', None, 'Override the run config: average with the flipped image.')
  flags.DEFINE_bool('allow_changed_data', False, 'Evaluate even when the config\'s data settings '
                    '(dataset, split, batch size) differ from those the checkpoint was made with.')
  flags.DEFINE_string('data_dir', None, "Where the run's tfds data is now (default: the run's "
                      'config.json).')
  flags.DEFINE_string('npz_path', None, "Where the run's .npz arrays are now (default: the run's "
                      'config.json); another path than the run recorded needs '
                      '--allow_changed_data.')
  config_flags.DEFINE_config_file('config', None, 'Config file; default: workdir/config.json.')
  flags.mark_flag_as_required('workdir')


def main(argv):
  def command():
    result = evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint, FLAGS.split, FLAGS.output_dir,
                                 FLAGS.config, FLAGS.tta_flip, FLAGS.allow_changed_data,
                                 FLAGS.data_dir, FLAGS.npz_path, FLAGS.overwrite)
    summary.print_summary(result['output_dir'], result)

  cli.run(argv, command)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
