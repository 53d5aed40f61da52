"""Writes the evaluation report for any checkpoint of an existing run, without training.

  python -m se_resnet_jax.evaluate --workdir=runs/cifar10 --checkpoint=best --split=test

The run's config is read from `workdir/config.json` (written when training starts) unless --config
is given. The report goes to `workdir/evaluation/<checkpoint>-<step>/` so the training report stays.
"""

import json
import os
from typing import Optional

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from se_resnet_jax import cli, input_pipeline, report, train
from se_resnet_jax.checkpoints import CheckpointError, RunCheckpoints
from se_resnet_jax.config import ConfigError, base_config, flatten, validate_config

FLAGS = flags.FLAGS



def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, on top of today's defaults (for fields added since)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{path} not found: is {workdir!r} a training workdir? Pass --config=<the '
                      'config file the run used> if it was made by an older version.')
  with open(path) as f:
    saved = json.load(f)
  config = base_config()
  config.update_from_flattened_dict(
      {k: tuple(v) if isinstance(v, list) else v for k, v in flatten(saved).items()})
  return config


def restore_model(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = 'best',
                  data: Optional[input_pipeline.Dataset] = None):
  """(model, state, meta, data) for a checkpoint: 'best', 'latest' or a step number."""
  if checkpoint not in ('best', 'latest') and not checkpoint.isdigit():
    raise CheckpointError(f"--checkpoint must be 'best', 'latest' or a step number, got "
                          f'{checkpoint!r}.')
  validate_config(config, jax.device_count())
  data = data or input_pipeline.load_dataset(config)
  mesh = train.data_mesh()
  model = train.build_model(config, data.num_classes)
  steps_per_epoch = max(1, len(data.train) // config.batch_size)
  tx = train.create_optimizer(config, steps_per_epoch)
  target = train.init_train_state(config, model, tx, data.train.images.shape[1:],
                                  jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  ckpts = RunCheckpoints(workdir)
  try:
    which, step = (checkpoint, None) if not checkpoint.isdigit() else ('latest', int(checkpoint))
    if checkpoint == 'best' and ckpts.latest_step('best') is None:
      which = 'latest'  # runs without a validation split keep no best checkpoint
    state, meta = ckpts.restore(target, which=which, step=step,
                                architecture=train.architecture(config, data.num_classes))
  finally:
    ckpts.close()
  return model, state, meta, data


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = 'best',
                        split: str = 'both', output_dir: Optional[str] = None) -> dict:
  """Writes report.json/.md and the pictures for one checkpoint; returns the report."""
  if not os.path.isdir(workdir):
    raise CheckpointError(f'Workdir {workdir!r} does not exist.')
  model, state, meta, data = restore_model(config, workdir, checkpoint)
  if split == 'validation' and data.validation is None:
    raise ConfigError('This run has no validation split (validation_size=0); use --split=test.')
  splits = (('validation',) if data.validation is not None else ()) + ('test',)
  splits = splits if split == 'both' else (split,)
  mesh = train.data_mesh()
  eval_step = train.make_eval_step(config, model, data.mean, data.std)
  result = train.final_report(config, data, model, state, meta, eval_step, mesh, None,
                              data.train.images.shape[1:], splits)
  result['checkpoint'] = {'which': checkpoint, 'step': int(state.step), 'epoch': meta['epoch']}
  output_dir = output_dir or os.path.join(workdir, 'evaluation', f'{checkpoint}-{int(state.step)}')
  if jax.process_index() == 0:
    report.write_report(output_dir, result, meta.get('history', []))
  logging.info('Wrote the report for step %d to %s', int(state.step), output_dir)
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
    config = FLAGS.config or load_run_config(FLAGS.workdir)
    if FLAGS.tta_flip is not None:
      config.tta_flip = FLAGS.tta_flip
    result = evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.split,
                                 FLAGS.output_dir)
    for name in ('validation', 'test'):
      if name in result:
        print(f'{name}: accuracy {result[name]["accuracy"]:.4f}  loss {result[name]["loss"]:.4f}')

  cli.run(argv, command)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
