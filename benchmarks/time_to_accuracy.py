"""How long the library takes to reach 90/93/94/95/96% accuracy with a config, on this machine.

  python benchmarks/time_to_accuracy.py --config=configs/cifar10_fast.py \
      --config.npz_path=/tmp/cifar10.npz --workdir=runs/fast

It runs `train.train_and_evaluate` unchanged and reads the times from the run's own history:
- "train s": the sum of the epochs' `epoch_time_s` up to that epoch (training steps only);
- "+ compile s": the same plus the train step's `compile_s` from the report;
- "wall s": from the call to `train_and_evaluate` to the end of that epoch's validation (when the
  loop hands the epoch's row to its metric writer), so data loading, initialisation, compilation,
  validation and the earlier epochs' checkpoints included.
Validation accuracy is the run's own. With --test_each_epoch (default) the test split is also
evaluated after every epoch, on the side: through the loop's public `hooks` and `writer`
arguments, with the library's own eval step on the same weights, its result used for nothing in the
run (the best epoch is still chosen on validation, and the final test accuracy is still of those
weights) and its time taken out of "wall s". Those columns are labelled "test (side evaluation)":
they show when the test accuracy first crossed a line, which a real run cannot know.
Writes epochs.jsonl (a line per epoch, as it ends), then time_to_accuracy.json and
time_to_accuracy.md, to --out_dir (default: the workdir).
"""

import json
import os
import sys
import time
from typing import Any, Optional, Sequence

if __package__ in (None, ''):  # run as a script: make `se_resnet_jax` importable from the tree
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from se_resnet_jax import (  # noqa: E402
    cli,
    files,
    input_pipeline,
    sharding,
    steps,
    train,
    writers,
)
from se_resnet_jax import config as config_lib  # noqa: E402
from se_resnet_jax.errors import WorkdirError  # noqa: E402

TARGETS = (0.90, 0.93, 0.94, 0.95, 0.96)


class EpochWatcher:
  """The run's metric writer, wrapped: notes when each epoch's row arrives and, optionally,
  evaluates the test split with the weights of that moment (on the side: the loop never sees it).

  Pass `watcher` as the loop's writer and `watcher.hook` as one of its hooks; the hook only keeps
  a reference to the latest state, which the epoch's row then finds.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, test_each_epoch: bool,
               out_dir: Optional[str] = None):
    self.writer = writers.create_writer(workdir, config.tensorboard)
    self.epochs_path = os.path.join(out_dir, 'epochs.jsonl') if out_dir else None
    if self.epochs_path:
      open(self.epochs_path, 'w').close()  # this run's epochs only
    self.records, self.side_s, self.start, self.state = [], 0.0, None, None
    self.eval_step = self.test_chunks = None
    if test_each_epoch and config.evaluate_test:
      data = input_pipeline.load_dataset(config)
      model = config_lib.build_model(config, data.num_classes)
      self.eval_step = steps.make_eval_step(config, model, data.mean, data.std)
      self.test_chunks = sharding.shard_eval_split(data.test, sharding.data_mesh(),
                                                   config.eval_batch_size)

  def hook(self, step: int, state: Any) -> None:
    self.state = state

  def write_scalars(self, step: int, scalars: dict) -> None:
    self.writer.write_scalars(step, scalars)
    if 'epoch_time_s' not in scalars:  # the final figures, not an epoch's row
      return
    record = {'step': step, 'wall_s': time.perf_counter() - self.start - self.side_s,
              'val_accuracy': scalars.get('val_accuracy')}
    if self.eval_step is not None:
      side_start = time.perf_counter()
      test, _ = steps.evaluate(self.eval_step, steps.eval_variables(self.state),
                               self.test_chunks)
      record.update(test_accuracy=test['accuracy'], test_loss=test['loss'])
      self.side_s += time.perf_counter() - side_start
    self.records.append(record)
    if self.epochs_path:  # at once, so a run cut short still shows how far it got
      with open(self.epochs_path, 'a') as f:
        f.write(json.dumps({**scalars, **record}) + '\n')

  def __getattr__(self, name: str) -> Any:  # write_hparams, flush, close: the run's writer
    return getattr(self.writer, name)


def epoch_rows(history: Sequence[dict], records: Sequence[dict], compile_s: float) -> list:
  """The run's history with cumulative times and the side test accuracies, one row per epoch."""
  by_step = {rec['step']: rec for rec in records}
  if [row['step'] for row in history] != [rec['step'] for rec in records]:
    raise RuntimeError('The watched epochs do not match the run\'s history (a resumed workdir?). '
                       'Use a new --workdir.')
  rows, train_s = [], 0.0
  for row in history:
    train_s += row['epoch_time_s']
    rec = by_step[row['step']]
    rows.append({'epoch': row['epoch'], 'train_s': train_s,
                 'train_plus_compile_s': train_s + compile_s, 'wall_s': rec['wall_s'],
                 'train_accuracy': row['train_accuracy'], 'val_accuracy': row.get('val_accuracy'),
                 'test_accuracy_side': rec.get('test_accuracy')})
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
  has_test = any(r['test_accuracy_side'] is not None for r in summary['epochs'])
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
            f'Device: {t["device"]}. Config: {t["config_name"]}.', '',
            '| epoch | train s | wall s | train acc (augmented) | val acc |'
            + (' test acc (side evaluation) |' if has_test else ''),
            '|---|---|---|---|---|' + ('---|' if has_test else '')]
  pct = lambda v: '-' if v is None else f'{100 * v:.2f}%'
  for r in summary['epochs']:
    lines.append(f'| {r["epoch"]} | {r["train_s"]:.1f} | {r["wall_s"]:.1f} '
                 f'| {pct(r["train_accuracy"])} | {pct(r["val_accuracy"])} |'
                 + (f' {pct(r["test_accuracy_side"])} |' if has_test else ''))
  return '\n'.join(lines)


def measure(config: ml_collections.ConfigDict, workdir: str, out_dir: Optional[str] = None,
            test_each_epoch: bool = True, targets: Sequence[float] = TARGETS,
            config_name: str = '') -> dict:
  """Trains `config` in `workdir` and writes time_to_accuracy.{json,md} to out_dir (or workdir)."""
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise WorkdirError(f'{workdir} holds checkpoints: a resumed run has no time to accuracy. '
                     'Use a new --workdir.')
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  watcher = EpochWatcher(config, workdir, test_each_epoch, out_dir)
  watcher.start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir, writer=watcher, hooks=[watcher.hook])
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
  files.write_json_atomic(os.path.join(out_dir, 'time_to_accuracy.json'), summary)
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
