"""One command, one table: the library and its PyTorch twin trained on one config, side by side.

  python benchmarks/twin_compare.py --config=configs/cifar10.py --config.num_epochs=30 \
      --config.batch_size=512 --config.learning_rate=0.4 --config.warmup_epochs=2 \
      --config.half_precision=True --config.npz_path=/tmp/cifar10.npz --out_dir=runs/twin

Every `--config...` argument goes unchanged to both `python -m se_resnet_jax.main` (the library,
workdir OUT/jax) and `benchmarks/torch_train.py` (the twin, OUT/pytorch), each in its own process so
that neither framework holds device memory while the other trains, and each framework's wall time
covers what a user waits for: start-up, data, compilation, training, validation and the final test.
The table (twin.json, twin.md in --out_dir) is rewritten as soon as each side finishes, so a run
cut short still shows the side that finished; a side that fails or runs out of time gets a row
saying so.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

if __package__ in (None, ''):  # run as a script: make `se_resnet_jax` importable from the tree
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from se_resnet_jax import cli, files  # noqa: E402
from se_resnet_jax.errors import ConfigError, WorkdirError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ('jax', 'pytorch')
TORCH_MARGIN_S = 30.0  # PyTorch's start-up, data loading and final evaluation, outside its budget
COLUMNS = ('framework', 'epochs', 'best epoch', 'final train acc', 'final val acc', 'test acc',
           'test loss', 'train img/s', 's/epoch', 'compile s', 'wall s')


def framework_command(framework: str, config_args: Sequence[str], run_dir: str,
                      torch_time_budget_s: Optional[float] = None,
                      torch_compile: bool = False, torch_init: str = 'config') -> list:
  if framework == 'jax':
    return [sys.executable, '-m', 'se_resnet_jax.main', *config_args, f'--workdir={run_dir}']
  command = [sys.executable, os.path.join(REPO, 'benchmarks', 'torch_train.py'), *config_args,
             f'--out_dir={run_dir}', f'--torch_compile={torch_compile}', f'--init={torch_init}']
  if torch_time_budget_s is not None:
    command.append(f'--time_budget_s={torch_time_budget_s}')
  return command


def summarize(framework: str, result: dict, wall_s: float) -> dict:
  """One table row from the library's report.json or the twin's result.json."""
  history, timing = result.get('history', []), result.get('timing', {})
  last = history[-1] if history else {}
  compile_s = timing.get('compile_s')
  if compile_s is None and len(history) > 1:  # PyTorch: first epoch's excess over the others
    compile_s = max(0.0, timing['first_epoch_s'] - timing['train_time_per_epoch_s'])
  return {
      'framework': framework, 'status': 'ok',
      'epochs': result.get('epochs_completed'),
      'epochs_planned': result['config']['num_epochs'],
      'stopped_by_time_budget': result.get('stopped_by_time_budget', False),
      'best_epoch': result.get('best_epoch'),
      'final_train_accuracy': last.get('train_accuracy'),
      'final_val_accuracy': last.get('val_accuracy'),
      'best_val_accuracy': result.get('validation', {}).get('accuracy'),
      'test_accuracy': result.get('test', {}).get('accuracy'),
      'test_loss': result.get('test', {}).get('loss'),
      'train_images_per_s': timing.get('train_images_per_s'),
      'seconds_per_epoch': timing.get('train_time_per_epoch_s'),
      'compile_s': compile_s,
      'wall_s': wall_s,
      'device': result.get('device', {}).get('kind'),
  }


# The small files of a finished side that are copied next to the table when runs_dir is elsewhere.
RUN_FILES = ('report.json', 'report.md', 'curves.png', 'confusion_matrix.png',
             'per_class_accuracy.png', 'result.json', 'epochs.jsonl')


def run_framework(framework: str, config_args: Sequence[str], out_dir: str,
                  timeout_s: Optional[float] = None, runs_dir: Optional[str] = None,
                  **options) -> dict:
  """Trains one side in a subprocess (log: OUT/<framework>.log) and returns its table row.

  The run itself (checkpoints included) goes to runs_dir/<framework>; when that is not out_dir, its
  report files are copied to out_dir/<framework> once it ends.
  """
  run_dir = os.path.join(runs_dir or out_dir, framework)
  command = framework_command(framework, config_args, run_dir, **options)
  log_path = os.path.join(out_dir, f'{framework}.log')
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    log.write(' '.join(command) + '\n')
    log.flush()
    try:
      rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                          timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
      rc = 'timeout'
  wall_s = time.perf_counter() - start
  if os.path.abspath(run_dir) != os.path.abspath(os.path.join(out_dir, framework)):
    copy_run_files(run_dir, os.path.join(out_dir, framework))
  result_path = os.path.join(run_dir, 'report.json' if framework == 'jax' else 'result.json')
  if rc != 0 or not os.path.exists(result_path):
    with open(log_path) as f:
      tail = [line.strip() for line in f.readlines()[-3:]]
    return {'framework': framework, 'status': f'failed ({rc})', 'wall_s': wall_s,
            'log': log_path, 'log_tail': tail}
  with open(result_path) as f:
    return summarize(framework, json.load(f), wall_s)


def copy_run_files(run_dir: str, destination: str) -> None:
  os.makedirs(destination, exist_ok=True)
  for name in RUN_FILES:
    if os.path.exists(os.path.join(run_dir, name)):
      shutil.copy(os.path.join(run_dir, name), destination)


def _pct(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}%'


def _num(value, digits: int = 1) -> str:
  return '-' if value is None else f'{value:,.{digits}f}'


def markdown(rows: Sequence[dict], config_args: Sequence[str]) -> str:
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  for r in rows:
    if r['status'] != 'ok':
      lines.append(f'| {r["framework"]} | {r["status"]} |' + ' |' * (len(COLUMNS) - 3)
                   + f' {_num(r["wall_s"])} |')
      continue
    epochs = f'{r["epochs"]}/{r["epochs_planned"]}' + (' (time budget)'
                                                       if r['stopped_by_time_budget'] else '')
    cells = [r['framework'], epochs, r['best_epoch'], _pct(r['final_train_accuracy']),
             _pct(r['final_val_accuracy']), _pct(r['test_accuracy']), _num(r['test_loss'], 4),
             _num(r['train_images_per_s'], 0), _num(r['seconds_per_epoch'], 3),
             _num(r['compile_s']), _num(r['wall_s'])]
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  device = next((r['device'] for r in rows if r.get('device')), 'unknown')
  for r in rows:
    if r['status'] != 'ok':
      lines += ['', f'{r["framework"]} {r["status"]}, the end of {r["log"]}:', '',
                *[f'    {line}' for line in r['log_tail']]]
  lines += ['', f'Device: {device}. Config: {" ".join(config_args)}',
            'Test accuracy is of the best-validation weights; "final" figures are the last '
            "epoch's; train accuracy is under augmentation; PyTorch's compile s is its first "
            "epoch's excess over the mean of the others."]
  return '\n'.join(lines)


def compare(config_args: Sequence[str], out_dir: str, frameworks: Sequence[str] = FRAMEWORKS,
            timeout_s: Optional[float] = None, runs_dir: Optional[str] = None,
            time_budget_s: Optional[float] = None, torch_time_budget_s: Optional[float] = None,
            torch_compile: bool = False, torch_init: str = 'config') -> list:
  """Trains each framework in turn; twin.json / twin.md are rewritten after each one.

  With time_budget_s, PyTorch's training budget is cut to what the sides before it left (less a
  margin for its start-up and final evaluation), so the whole comparison ends in time.
  """
  runs_dir = runs_dir or out_dir
  existing = [f for f in frameworks if os.path.exists(os.path.join(runs_dir, f))]
  if existing:
    raise WorkdirError(f'{runs_dir} already holds runs {existing}: the library would resume '
                       'from their checkpoints. Choose a new --out_dir (or --runs_dir).')
  os.makedirs(out_dir, exist_ok=True)
  start, rows = time.perf_counter(), []
  for framework in frameworks:
    options = {}
    if framework == 'pytorch':
      budget = torch_time_budget_s
      if time_budget_s is not None:
        left = time_budget_s - (time.perf_counter() - start) - TORCH_MARGIN_S
        budget = max(0.0, left if budget is None else min(budget, left))
      options = dict(torch_time_budget_s=budget, torch_compile=torch_compile,
                     torch_init=torch_init)
    rows.append(run_framework(framework, config_args, out_dir, timeout_s, runs_dir, **options))
    table = markdown(rows, config_args)
    files.write_json_atomic(os.path.join(out_dir, 'twin.json'),
                             {'config_args': list(config_args), 'rows': rows})
    with open(os.path.join(out_dir, 'twin.md'), 'w') as f:
      f.write(table + '\n')
    print(f'\n{framework} done in {rows[-1]["wall_s"]:.0f} s ({rows[-1]["status"]}):\n{table}',
          flush=True)
  return rows


def main(argv):
  FLAGS = flags.FLAGS
  config_args = [a for a in sys.argv[1:] if a.startswith('--config')]

  def command():
    frameworks = FLAGS.frameworks
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
      raise ConfigError(f'--frameworks must be from {", ".join(FRAMEWORKS)}, got '
                       f'{sorted(unknown)}.')
    out_dir = FLAGS.out_dir or os.path.join('runs', time.strftime('twin_%Y%m%d_%H%M%S'))
    compare(config_args, out_dir, frameworks, FLAGS.timeout_s, FLAGS.runs_dir,
            FLAGS.time_budget_s, FLAGS.torch_time_budget_s, FLAGS.torch_compile,
            FLAGS.torch_init)

  cli.run(argv, command)


if __name__ == '__main__':
  from ml_collections import config_flags

  flags.DEFINE_string('out_dir', None, 'Where both runs, their logs and twin.json/twin.md go '
                      '(default runs/twin_<time>); must not hold earlier runs.')
  flags.DEFINE_string('runs_dir', None, 'Where the runs themselves (checkpoints included) go '
                      '(default: --out_dir); their report files are then copied to --out_dir.')
  flags.DEFINE_float('time_budget_s', None, 'The whole comparison should end within this: '
                     'PyTorch gets what the library left of it as its training budget.')
  flags.DEFINE_list('frameworks', list(FRAMEWORKS), 'Which sides to train, in this order.')
  flags.DEFINE_float('torch_time_budget_s', None, 'PyTorch stops training between epochs when '
                     'the next would end after this many seconds, and reports how far it got.')
  flags.DEFINE_bool('torch_compile', False, 'torch.compile the PyTorch model.')
  flags.DEFINE_enum('torch_init', 'config', ('config', 'torch', 'flax'), 'PyTorch\'s initial '
                    'weights: as the config\'s model.kernel_init (the library\'s distribution), '
                    'or forced to PyTorch\'s defaults or to Flax\'s LeCun normal.')
  flags.DEFINE_float('timeout_s', None, 'Kill a side that runs longer than this (its row then '
                     'says so).')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file, as for '
                                  'se_resnet_jax.main; overrides go to both sides.',
                                  lock_config=True)
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=cli.parse_flags)
