"""Writes the evaluation report for any checkpoint of an existing run, without training.

  python -m se_resnet_jax.evaluate --workdir=runs/cifar10 --checkpoint=best --split=test

The run's config is read from `workdir/config.json` (written when training starts) unless --config
is given; it names where the training read its data (absolute paths, $TFDS_DATA_DIR filled in), so
no environment needs repeating. --data_dir or --npz_path point at the data where it has moved.
The report goes to `workdir/evaluation/<checkpoint>-<step>/` so the training report stays.
"""

import os
from typing import Optional

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from se_resnet_jax import cli, input_pipeline, report, summary
from se_resnet_jax.console import Console
from se_resnet_jax.errors import ConfigError
from se_resnet_jax.evaluation import final_report, load_run_config, restore_run
from se_resnet_jax.sharding import data_mesh
from se_resnet_jax.steps import make_eval_step

FLAGS = flags.FLAGS


def evaluate_checkpoint(workdir: str, checkpoint: str = 'best', split: str = 'both',
                        output_dir: Optional[str] = None,
                        config: Optional[ml_collections.ConfigDict] = None,
                        tta_flip: Optional[bool] = None, data_dir: Optional[str] = None,
                        npz_path: Optional[str] = None) -> dict:
  """Writes report.json/.md and the pictures for one checkpoint; returns the report (and where).

  `config` defaults to the run's own (workdir/config.json); `tta_flip`, `data_dir` and `npz_path`
  override its settings. The checkpoint is restored (and checked against the config) before any
  data is read.
  """
  if config is None and (data_dir is not None or npz_path is not None):
    config = load_run_config(workdir)
  if data_dir is not None:
    config.data_dir = data_dir
  if npz_path is not None:
    config.npz_path = npz_path
  run = restore_run(workdir, checkpoint, config)
  config = run.config
  if tta_flip is not None:
    config.tta_flip = tta_flip
  data = input_pipeline.load_dataset(config)
  if split == 'validation' and data.validation is None:
    raise ConfigError('This run has no validation split (validation_size=0); use --split=test.')
  splits = (('validation',) if data.validation is not None else ()) + ('test',)
  splits = splits if split == 'both' else (split,)
  Console().say(f'Evaluating checkpoint {checkpoint!r} of {workdir} (step {run.step}, epoch '
                f'{run.meta["epoch"]}) on {" and ".join(splits)}...')
  eval_step = make_eval_step(config, run.model, data.mean, data.std)
  result = final_report(config, data, run.model, run.variables, run.step, run.meta, eval_step,
                        data_mesh(), None, splits)
  result['checkpoint'] = {'which': checkpoint, 'step': run.step, 'epoch': run.meta['epoch']}
  result['weights'] = {'epoch': run.meta['epoch'], 'step': run.step,
                       'chosen_by': f'checkpoint {checkpoint!r} of {workdir}'}
  output_dir = output_dir or os.path.join(workdir, 'evaluation', f'{checkpoint}-{run.step}')
  if jax.process_index() == 0:
    report.write_report(output_dir, result, run.meta.get('history', []))
  result['output_dir'] = output_dir
  return result


def define_flags() -> None:
  """The command's flags; defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'The run directory (holds checkpoints/ and best/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest', or a step number.")
  flags.DEFINE_enum('split', 'both', ['validation', 'test', 'both'], 'Which split(s) to evaluate.')
  flags.DEFINE_string('output_dir', None, 'Where to write the report (default under the workdir).')
  flags.DEFINE_bool('tta_flip', None, 'Override the run config: average with the flipped image.')
  flags.DEFINE_string('data_dir', None, "Override the run config's data location: a tfds data "
                      'directory holding the dataset.')
  flags.DEFINE_string('npz_path', None, "Override the run config's data: an .npz with x_train, "
                      'y_train, x_test, y_test.')
  config_flags.DEFINE_config_file('config', None, 'Config file; default: workdir/config.json.')
  flags.mark_flag_as_required('workdir')


def main(argv):
  def command():
    result = evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint, FLAGS.split, FLAGS.output_dir,
                                 FLAGS.config, FLAGS.tta_flip, FLAGS.data_dir, FLAGS.npz_path)
    if jax.process_index() == 0:
      print(summary.closing_summary(result['output_dir'], result))

  cli.run(argv, command)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
