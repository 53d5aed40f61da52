r"""Which suspect costs the accuracy: one recipe, changed one thing at a time, over paired seeds.

  python benchmarks/causes.py --config=configs/cifar10.py --config.npz_path=/tmp/cifar10.npz \
      --config.num_epochs=30 --config.batch_size=512 --config.learning_rate=0.4 \
      --config.warmup_epochs=2 --config.half_precision=True --out_dir=runs/causes

Each variant of VARIANTS changes one thing of the given recipe (issue 22's suspects: the weight
decay's scope, the regularisers, the warm-up, the initialisation, the residual BatchNorm scales);
every variant trains with seeds config.seed, +1, ... (the same seeds, data and split as the
baseline, so each seed gives a paired difference). Runs go seed by seed, the variants in the order
of VARIANTS (most informative first), so a stage cut short still holds a first seed of every
variant. Then the best combination (every variant whose mean validation accuracy beat the
baseline's; if none did, the best single one: chosen on validation, never on the test set) trains
once for --long_epochs.

All runs share one process and JAX's persistent compilation cache: seeds and the variants that
change only the first weights reuse the baseline's compiled step. Each run validates and saves a
checkpoint once, at its end (so the table compares the final weights of every run): validating
every epoch would add a save of the whole state (weights, momentum, checksums) to most epochs of
runs whose epochs take well under a second on a GPU. With --time_budget_s a run that would end
after the budget (estimated from the runs before it: their mean, so a run that compiles a new step
may still overrun, and the stage's timeout ends it) is not started and gets a row saying so.
causes.json and causes.md in --out_dir are rewritten as each run ends.
"""

import json
import os
import sys
import time
from typing import Optional, Sequence

if __package__ in (None, ''):  # run as a script: make `se_resnet_jax` importable from the tree
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from se_resnet_jax import cli, files  # noqa: E402
from se_resnet_jax.errors import ConfigError  # noqa: E402
from se_resnet_jax.experiments import common  # noqa: E402

# name: (what it changes, the config fields it sets); 'warmup' gets --warmup_epochs_variant.
VARIANTS = {
    'baseline': ('the recipe as given', {}),
    'decay_all': ('weight decay on every parameter (BatchNorm scales and shifts, biases), as '
                  'torch.optim.SGD(model.parameters())', {'weight_decay_mask': 'all'}),
    'light_regularisation': ('no dropout, no label smoothing, cutout 8',
                             {'model.dropout_rate': 0.0, 'label_smoothing': 0.0,
                              'augment.cutout_size': 8}),
    'warmup': ('longer linear warm-up', {'warmup_epochs': None}),
    'torch_init': ("PyTorch's default initialisation", {'model.kernel_init': 'torch_default'}),
    'residual_scale_one': ('residual BatchNorm scales start at 1',
                           {'model.zero_init_residual': False}),
}
# Every run validates and checkpoints once, at its end; nothing else of the recipe changes.
RUN_SETTINGS = {'measure_inference': False, 'keep_checkpoints': 1}


def variant_changes(name: str, warmup_epochs: float) -> dict:
  if name not in VARIANTS:
    raise ConfigError(f'Unknown variant {name!r}; choose from {", ".join(VARIANTS)}.')
  changes = dict(VARIANTS[name][1])
  if 'warmup_epochs' in changes:
    changes['warmup_epochs'] = float(warmup_epochs)
  return changes


def run_config(config: ml_collections.ConfigDict, changes: dict, seed: int,
               num_epochs: Optional[int] = None) -> ml_collections.ConfigDict:
  epochs = num_epochs or config.num_epochs
  return common.with_values(config, dict(changes, seed=seed, num_epochs=epochs,
                                         eval_every_epochs=epochs, checkpoint_every_epochs=epochs,
                                         **RUN_SETTINGS))


def choose_combination(rows: Sequence[dict]) -> list:
  """The variants to combine: those whose mean paired validation delta is positive, else the one
  with the largest delta; [] when no variant besides the baseline has one."""
  deltas = {r['variant']: r['val_delta'] for r in rows
            if r['variant'] != 'baseline' and r.get('val_delta') is not None}
  if not deltas:
    return []
  better = [v for v, d in deltas.items() if d > 0]
  return better or [max(deltas, key=deltas.get)]


def table_rows(results: dict, variants: Sequence[str], seeds: Sequence[int]) -> list:
  """One row per variant: accuracies per seed, means, and mean paired deltas to the baseline."""
  rows = []
  for v in variants:
    row = {'variant': v, 'change': VARIANTS[v][0], 'runs': []}
    for s in seeds:
      r = results.get((v, s))
      row['runs'].append(dict(seed=s, **r) if r else {'seed': s, 'status': 'not run'})
    for split, key in (('test', 'test'), ('validation', 'val')):
      done = {r['seed']: r[split] for r in row['runs'] if r.get(split) is not None}
      row[f'{key}_mean'] = float(np.mean(list(done.values()))) if done else None
      base = {s: results[('baseline', s)][split] for s in seeds
              if results.get(('baseline', s), {}).get(split) is not None}
      paired = [done[s] - base[s] for s in done if s in base]
      row[f'{key}_delta'] = float(np.mean(paired)) if paired and v != 'baseline' else None
      row[f'{key}_pairs'] = len(paired)
    rows.append(row)
  return rows


def _pct(value: Optional[float], signed: bool = False) -> str:
  return '-' if value is None else f'{100 * value:{"+" if signed else ""}.2f}'


def markdown(summary: dict) -> str:
  seeds = summary['seeds']
  header = (['variant'] + [f'test seed {s}' for s in seeds] + [f'val seed {s}' for s in seeds]
            + ['test mean', 'Δ test', 'val mean', 'Δ val'])
  lines = [f'Accuracy (%) after {summary["epochs"]} epochs, final weights; Δ: mean over seeds of '
           'the paired difference to the baseline (points).', '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in summary['rows']:
    by_seed = {r['seed']: r for r in row['runs']}
    cell = lambda r, split: (_pct(r.get(split)) if r.get(split) is not None
                             else r.get('status', '-'))
    cells = ([f'`{row["variant"]}`'] + [cell(by_seed[s], 'test') for s in seeds]
             + [cell(by_seed[s], 'validation') for s in seeds]
             + [_pct(row['test_mean']), _pct(row['test_delta'], True), _pct(row['val_mean']),
                _pct(row['val_delta'], True)])
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', *[f'- `{row["variant"]}`: {row["change"]}' for row in summary['rows']]]
  long = summary.get('long')
  if long:
    lines += ['', f'Best combination ({" + ".join(long["variants"]) or "none"}, chosen on '
              f'validation) at {long["epochs"]} epochs, seed {long["seed"]}: '
              + (f'test {_pct(long.get("test"))}%, validation {_pct(long.get("validation"))}%'
                 if long.get('test') is not None else long.get('status', 'not run'))]
  lines += ['', f'Device: {summary.get("device") or "unknown"}. Config: '
            f'{" ".join(summary["config_args"])}']
  return '\n'.join(lines)


def _run_summary(summary: dict, wall_s: float) -> dict:
  return {'test': summary.get('test', {}).get('accuracy'),
          'validation': summary.get('validation', {}).get('accuracy'),
          'test_loss': summary.get('test', {}).get('loss'),
          'epochs_completed': summary.get('epochs_completed'), 'wall_s': wall_s,
          'compile_cache': summary.get('compile_cache')}


def run_causes(config: ml_collections.ConfigDict, out_dir: str, runs_dir: Optional[str] = None,
               variants: Sequence[str] = tuple(VARIANTS), seeds: int = 2,
               long_epochs: int = 100, warmup_epochs: float = 5.0,
               time_budget_s: Optional[float] = None, cache_dir: Optional[str] = None,
               config_args: Sequence[str] = ()) -> dict:
  """Trains every variant for each seed, then the best combination; returns causes.json's content.

  Every run's config is checked before the first one trains.
  """
  start = time.perf_counter()
  variants = ['baseline'] + [v for v in dict.fromkeys(variants) if v != 'baseline']
  seed_list = [config.seed + i for i in range(seeds)]
  runs_dir = runs_dir or os.path.join(out_dir, 'runs')
  changes = {v: variant_changes(v, warmup_epochs) for v in variants}
  plan = [(v, s) for s in seed_list for v in variants]
  configs = {key: run_config(config, changes[key[0]], key[1]) for key in plan}
  for v in variants[1:]:
    if configs[(v, seed_list[0])].to_dict() == configs[('baseline', seed_list[0])].to_dict():
      raise ConfigError(f'Variant {v!r} ({VARIANTS[v][0]}) is the recipe itself; leave it out '
                        'with --variants.')
  # Every variant's config (also those not run) and the longest combination are checked first.
  every = {k: val for v in VARIANTS for k, val in variant_changes(v, warmup_epochs).items()}
  checks = [run_config(config, variant_changes(v, warmup_epochs), seed_list[0]) for v in VARIANTS]
  if long_epochs:
    checks.append(run_config(config, every, seed_list[0], long_epochs))
  common.validate_all(list(configs.values()) + checks)
  os.makedirs(out_dir, exist_ok=True)
  summary = {'epochs': config.num_epochs, 'seeds': seed_list, 'variants': variants,
             'config_args': list(config_args), 'config': config.to_dict(), 'rows': [],
             'long': None, 'device': None}

  def write():
    summary['rows'] = table_rows(results, variants, seed_list)
    files.write_json_atomic(os.path.join(out_dir, 'causes.json'), summary)
    with open(os.path.join(out_dir, 'causes.md'), 'w') as f:
      f.write(markdown(summary) + '\n')

  def fits(estimate: Optional[float]) -> bool:
    return (time_budget_s is None or estimate is None
            or time.perf_counter() - start + estimate <= time_budget_s)

  results, run_times = {}, []
  cache_dir = cache_dir or os.environ.get('JAX_COMPILATION_CACHE_DIR')
  with common.compilation_cache(common.cache_dir_for(runs_dir, cache_dir)):
    for v, s in plan:
      estimate = float(np.mean(run_times)) if run_times else None
      if not fits(estimate):
        results[(v, s)] = {'status': 'not run (time)'}
        write()
        continue
      run_start = time.perf_counter()
      result = common.run(configs[(v, s)], os.path.join(runs_dir, v, f'seed_{s}'))
      run_times.append(time.perf_counter() - run_start)
      results[(v, s)] = _run_summary(result, run_times[-1])
      summary['device'] = summary['device'] or _device(result['run_dir'])
      write()
    summary['rows'] = table_rows(results, variants, seed_list)
    combination = choose_combination(summary['rows'])
    if long_epochs and combination:
      long = {'variants': combination, 'epochs': long_epochs, 'seed': seed_list[0]}
      per_epoch = (np.mean(run_times) / config.num_epochs) if run_times else None
      if not fits(None if per_epoch is None else per_epoch * long_epochs):
        long['status'] = 'not run (time)'
      else:
        merged = {k: val for v in combination for k, val in changes[v].items()}
        long_config = run_config(config, merged, seed_list[0], long_epochs)
        run_start = time.perf_counter()
        result = common.run(long_config,
                            os.path.join(runs_dir, 'combination', f'seed_{seed_list[0]}'))
        long.update(_run_summary(result, time.perf_counter() - run_start))
      summary['long'] = long
    write()
  return summary


def _device(run_dir: str) -> Optional[str]:
  try:
    with open(os.path.join(run_dir, common.REPORT)) as f:
      device = json.load(f)['device']
    return f'{device["count"]} x {device["kind"]}'
  except (OSError, KeyError, ValueError):
    return None


def main(argv):
  FLAGS = flags.FLAGS
  config_args = [a for a in sys.argv[1:] if a.startswith('--config')]

  def command():
    summary = run_causes(FLAGS.config, FLAGS.out_dir, FLAGS.runs_dir, FLAGS.variants, FLAGS.seeds,
                         FLAGS.long_epochs, FLAGS.warmup_epochs_variant, FLAGS.time_budget_s,
                         FLAGS.cache_dir, config_args)
    print(markdown(summary), flush=True)

  cli.run(argv, command)


if __name__ == '__main__':
  from ml_collections import config_flags

  flags.DEFINE_string('out_dir', None, 'Where causes.json and causes.md (and, without --runs_dir, '
                      'the runs) go.')
  flags.DEFINE_string('runs_dir', None, 'Where the runs (checkpoints included) go (default '
                      'OUT_DIR/runs); a finished run there is read back, not trained again.')
  flags.DEFINE_list('variants', list(VARIANTS), f'Variants, from {", ".join(VARIANTS)}; '
                    'the baseline always runs.')
  flags.DEFINE_integer('seeds', 2, 'Seeds per variant: config.seed, config.seed + 1, ...')
  flags.DEFINE_integer('long_epochs', 100, 'Epochs of the best combination\'s run; 0: none.')
  flags.DEFINE_float('warmup_epochs_variant', 5.0, 'warmup_epochs of the `warmup` variant.')
  flags.DEFINE_float('time_budget_s', None, 'Start no run that would end after this many '
                     'seconds (estimated from the runs before it).')
  flags.DEFINE_string('cache_dir', None, 'JAX persistent compilation cache (default '
                      '$JAX_COMPILATION_CACHE_DIR, else RUNS_DIR/jax_cache).')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file, as for '
                                  'se_resnet_jax.main.', lock_config=True)
  flags.mark_flags_as_required(['config', 'out_dir'])
  app.run(main, flags_parser=cli.parse_flags)
