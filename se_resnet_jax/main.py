"""Command line: `python -m se_resnet_jax.main --config=configs/cifar10.py --workdir=runs/cifar10`.

Any config field can be overridden, e.g. `--config.num_epochs=10 --config.model.num_filters=32`.
Rerunning with the same --workdir resumes from its latest intact checkpoint; Ctrl-C or SIGTERM
saves where the run is and says how to resume. Rerunning a finished run shows its results without
training (a larger --config.num_epochs trains it further). Progress goes to stderr; the closing
summary (results and where the report is) to stdout.
"""

import jax
from absl import app, flags
from ml_collections import config_flags

from se_resnet_jax import cli, summary, train
from se_resnet_jax.console import Console

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and the report.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host GPU, TPU '
                  'pod slices); coordinator flags below, or auto-detection on TPU/SLURM.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, with --distributed.')
flags.DEFINE_integer('num_processes', None, 'Number of processes, with --distributed.')
flags.DEFINE_integer('process_id', None, 'This process index, with --distributed.')
flags.DEFINE_bool('allow_changed_data', False, 'Resume even when the data settings (dataset, '
                  'npz_path, label_key, validation split, k-fold, batch size) differ from those '
                  'the checkpoints were made with.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  def command():
    if FLAGS.distributed:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    device = jax.devices()[0]
    # Every process says which it is; only process 0 speaks after this.
    Console(enabled=True).say(f'JAX process {jax.process_index()}/{jax.process_count()}: '
                              f'{jax.device_count()} x {device.device_kind} ({device.platform}).')
    summary.print_summary(FLAGS.workdir, train.train_and_evaluate(
        FLAGS.config, FLAGS.workdir, allow_changed_data=FLAGS.allow_changed_data))

  cli.run(argv, command)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
