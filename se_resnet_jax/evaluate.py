"""Writes the evaluation report for any checkpoint of an existing run, without training.

  python -m se_resnet_jax.evaluate --workdir=runs/cifar10 --checkpoint=best --split=test

The run's config is read from `workdir/config.json` (written when training starts) unless --config
is given. The report goes to `workdir/evaluation/<checkpoint>-<step>/` so the training report stays.
"""

import os
from typing import Optional

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from se_resnet_jax import cli, input_pipeline, report
from se_resnet_jax.errors import ConfigError
from se_resnet_jax.evaluation import final_report, restore_run
from se_resnet_jax.sharding import data_mesh
from se_resnet_jax.steps import make_eval_step

FLAGS = flags.FLAGS


def evaluate_checkpoint(workdir: str, checkpoint: str = 'best', split: str = 'both',
                        output_dir: Optional[str] = None,
                        config: Optional[ml_collections.ConfigDict] = None,
                        tta_flip: Optional[bool] = None) -> dict:
  """Writes report.json/.md and the pictures for one checkpoint; returns the report.

  `config` defaults to the run's own (workdir/config.json); `tta_flip` overrides its setting.
  The checkpoint is restored (and checked against the config) before any data is read.
  """
  run = restore_run(workdir, checkpoint, config)
  config = run.config
  if tta_flip is not None:
    config.tta_flip = tta_flip
  data = input_pipeline.load_dataset(config)
  if split == 'validation' and data.validation is None:
    raise ConfigError('This run has no validation split (validation_size=0); use --split=test.')
  splits = (('validation',) if data.validation is not None else ()) + ('test',)
  splits = splits if split == 'both' else (split,)
  eval_step = make_eval_step(config, run.model, data.mean, data.std)
  result = final_report(config, data, run.model, run.variables, run.step, run.meta, eval_step,
                        data_mesh(), None, splits)
  result['checkpoint'] = {'which': checkpoint, 'step': run.step, 'epoch': run.meta['epoch']}
  output_dir = output_dir or os.path.join(workdir, 'evaluation', f'{checkpoint}-{run.step}')
  if jax.process_index() == 0:
    report.write_report(output_dir, result, run.meta.get('history', []))
  logging.info('Wrote the report for step %d to %s', run.step, output_dir)
  return result


def define_flags() -> None:
  """The command's flags; defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'The run directory (holds checkpoints/ and best/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest', or a step number.")
  flags.DEFINE_enum('split', 'both', ['validation', 'test', 'both'], 'Which split(s) to evaluate.')
  flags.DEFINE_string('output_dir', None, 'Where to write the report (default under the workdir).')
  flags.DEFINE_bool('tta_flip', None, 'Override the run config: average with the flipped image.')
  config_flags.DEFINE_config_file('config', None, 'Config file; default: workdir/config.json.')
  flags.mark_flag_as_required('workdir')


def main(argv):
  def command():
    result = evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint, FLAGS.split, FLAGS.output_dir,
                                 FLAGS.config, FLAGS.tta_flip)
    for name in ('validation', 'test'):
      if name in result:
        print(f'{name}: accuracy {result[name]["accuracy"]:.4f}  loss {result[name]["loss"]:.4f}')

  cli.run(argv, command)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
