"""How long the library takes to reach 90/93/94/95/96% accuracy with a config, on this machine.

  python benchmarks/time_to_accuracy.py --config=configs/cifar10_fast.py \
      --config.npz_path=/tmp/cifar10.npz --workdir=runs/fast

It runs `train.train_and_evaluate` unchanged and reads the times from the run's own history:
- "train s": the sum of the epochs' `epoch_time_s` up to that epoch (training steps only);
- "+ compile s": the same plus the train step's `compile_s` from the report;
- "wall s": from the call to `train_and_evaluate` to the end of that epoch's validation, so data
  loading, initialisation, compilation, validation and checkpoints included.
Validation accuracy is the run's own. With --test_each_epoch (default) the test split is also
evaluated after every validation, on the side: the same weights and eval step, its result used for
nothing in the run (the best epoch is still chosen on validation, and the final test accuracy is
still of those weights) and its time taken out of "wall s". Those columns are labelled "test (side
evaluation)": they show when the test accuracy first crossed a line, which a real run cannot know.
Writes time_to_accuracy.json and time_to_accuracy.md to --out_dir (default: the workdir).
"""

import contextlib
import json
import os
import sys
import time
from typing import Optional, Sequence

if __package__ in (None, ''):  # run as a script: make `se_resnet_jax` importable from the tree
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from se_resnet_jax import cli, input_pipeline, report, train  # noqa: E402

TARGETS = (0.90, 0.93, 0.94, 0.95, 0.96)


class EpochWatcher:
  """Notes when each validation of the training loop ends and, optionally, evaluates the test
  split with the same weights right after it (on the side: the loop never sees the result)."""

  def __init__(self, config: ml_collections.ConfigDict, test_each_epoch: bool):
    self.records, self.side_s, self.in_loop = [], 0.0, True
    self.start = None
    self.test_chunks = None
    if test_each_epoch and config.evaluate_test:
      test = input_pipeline.load_dataset(config).test
      self.test_chunks = train.shard_eval_split(test, train.data_mesh(), config.eval_batch_size)

  @contextlib.contextmanager
  def watching(self):
    evaluate, final_report = train.evaluate, train.final_report

    def watched_evaluate(eval_step, variables, chunks):
      out = evaluate(eval_step, variables, chunks)
      if self.in_loop:
        record = {'wall_s': time.perf_counter() - self.start - self.side_s,
                  'val_accuracy': out[0]['accuracy']}
        if self.test_chunks is not None:
          side_start = time.perf_counter()
          test, _ = evaluate(eval_step, variables, self.test_chunks)
          record.update(test_accuracy=test['accuracy'], test_loss=test['loss'])
          self.side_s += time.perf_counter() - side_start
        self.records.append(record)
      return out

    def watched_final_report(*args, **kwargs):
      self.in_loop = False
      return final_report(*args, **kwargs)

    train.evaluate, train.final_report = watched_evaluate, watched_final_report
    self.start = time.perf_counter()
    try:
      yield self
    finally:
      train.evaluate, train.final_report = evaluate, final_report


def epoch_rows(history: Sequence[dict], records: Sequence[dict], compile_s: float) -> list:
  """The run's history with cumulative times and the side test accuracies, one row per epoch."""
  evaluated = [row for row in history if 'val_accuracy' in row]
  if len(evaluated) != len(records) or any(
      row['val_accuracy'] != rec['val_accuracy'] for row, rec in zip(evaluated, records)):
    raise RuntimeError('The watched validations do not match the run\'s history (a resumed '
                       'workdir?). Use a new --workdir.')
  by_epoch = {row['epoch']: rec for row, rec in zip(evaluated, records)}
  rows, train_s = [], 0.0
  for row in history:
    train_s += row['epoch_time_s']
    out = {'epoch': row['epoch'], 'train_s': train_s, 'train_plus_compile_s': train_s + compile_s,
           'val_accuracy': row.get('val_accuracy'), 'train_accuracy': row['train_accuracy']}
    rec = by_epoch.get(row['epoch'])
    if rec:
      out.update(wall_s=rec['wall_s'], test_accuracy_side=rec.get('test_accuracy'))
    rows.append(out)
  return rows


def first_reached(rows: Sequence[dict], key: str, targets: Sequence[float]) -> dict:
  """For each target, the first epoch whose `key` reached it, with its times (None: never)."""
  reached = {}
  for target in targets:
    row = next((r for r in rows if r.get(key) is not None and r[key] >= target), None)
    reached[f'{target:.2f}'] = None if row is None else {
        k: row.get(k) for k in ('epoch', 'train_s', 'train_plus_compile_s', 'wall_s')}
  return reached


def _cell(entry: Optional[dict]) -> list:
  if entry is None:
    return ['not reached', '', '', '']
  return [str(entry['epoch']), f'{entry["train_s"]:.1f}', f'{entry["train_plus_compile_s"]:.1f}',
          '-' if entry.get('wall_s') is None else f'{entry["wall_s"]:.1f}']


def markdown(summary: dict) -> str:
  has_test = any(v is not None for v in summary['test_side_reached'].values())
  header = ['accuracy', 'val: epoch', 'train s', '+ compile s', 'wall s']
  if has_test:
    header += ['test (side evaluation): epoch', 'train s', '+ compile s', 'wall s']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for target, entry in summary['val_reached'].items():
    cells = [f'{100 * float(target):.0f}%'] + _cell(entry)
    if has_test:
      cells += _cell(summary['test_side_reached'][target])
    lines.append('| ' + ' | '.join(cells) + ' |')
  t = summary
  lines += ['',
            f'Final: test accuracy {100 * t["test_accuracy"]:.2f}% (best-validation weights, epoch '
            f'{t["best_epoch"]}), validation {100 * t["val_accuracy"]:.2f}%, '
            f'{t["epochs_completed"]} epochs; {t["train_images_per_s"]:,.0f} train img/s, '
            f'{t["seconds_per_epoch"]:.3f} s/epoch, compile {t["compile_s"]:.1f} s, training '
            f'{t["train_s"]:.1f} s, wall {t["wall_s"]:.1f} s (whole run with the final report).',
            f'Device: {t["device"]}. Config: {t["config_name"]}.']
  return '\n'.join(lines)


def measure(config: ml_collections.ConfigDict, workdir: str, out_dir: Optional[str] = None,
            test_each_epoch: bool = True, targets: Sequence[float] = TARGETS,
            config_name: str = '') -> dict:
  """Trains `config` in `workdir` and writes time_to_accuracy.{json,md} to out_dir (or workdir)."""
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileExistsError(f'{workdir} holds checkpoints: a resumed run has no time to accuracy. '
                          'Use a new --workdir.')
  watcher = EpochWatcher(config, test_each_epoch)
  with watcher.watching():
    result = train.train_and_evaluate(config, workdir)
  wall_s = time.perf_counter() - watcher.start - watcher.side_s
  with open(os.path.join(workdir, 'report.json')) as f:
    history = json.load(f)['history']
  timing = result['timing']
  rows = epoch_rows(history, watcher.records, timing['compile_s'])
  summary = {
      'config_name': config_name,
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'targets': list(targets),
      'val_reached': first_reached(rows, 'val_accuracy', targets),
      'test_side_reached': first_reached(rows, 'test_accuracy_side', targets),
      'test_accuracy': result['test']['accuracy'] if 'test' in result else float('nan'),
      'test_loss': result['test']['loss'] if 'test' in result else float('nan'),
      'val_accuracy': result['validation']['accuracy'] if 'validation' in result else float('nan'),
      'best_epoch': result['best_epoch'], 'epochs_completed': result['epochs_completed'],
      'train_images_per_s': timing['train_images_per_s'],
      'seconds_per_epoch': timing['train_time_per_epoch_s'], 'compile_s': timing['compile_s'],
      'train_s': float(np.sum([r['epoch_time_s'] for r in history])), 'wall_s': wall_s,
      'side_evaluation_s': watcher.side_s,
      'epochs': rows, 'config': config.to_dict()}
  summary['table'] = markdown(summary)
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  report.write_json_atomic(os.path.join(out_dir, 'time_to_accuracy.json'), summary)
  with open(os.path.join(out_dir, 'time_to_accuracy.md'), 'w') as f:
    f.write(summary['table'] + '\n')
  return summary


def main(argv):
  FLAGS = flags.FLAGS

  def command():
    config_name = ' '.join(a for a in sys.argv[1:] if a.startswith('--config'))
    summary = measure(FLAGS.config, FLAGS.workdir, FLAGS.out_dir, FLAGS.test_each_epoch,
                      [float(t) / 100 for t in FLAGS.targets], config_name)
    print(summary['table'], flush=True)

  cli.run(argv, command)


if __name__ == '__main__':
  from ml_collections import config_flags

  flags.DEFINE_string('workdir', None, 'A new run directory for the library.')
  flags.DEFINE_string('out_dir', None, 'Where the table goes (default: the workdir).')
  flags.DEFINE_bool('test_each_epoch', True, 'Also evaluate the test split after each '
                    'validation, on the side (never used by the run).')
  flags.DEFINE_list('targets', ['90', '93', '94', '95', '96'], 'Accuracies in percent.')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags)
