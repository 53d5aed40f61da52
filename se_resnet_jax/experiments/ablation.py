r"""Ablation: the full model against it without SE, dropout or augmentation, over several seeds.

  python -m se_resnet_jax.experiments.ablation --config=configs/cifar10.py --workdir=runs/ablation \
      --seeds=3 [--all_off]

Every variant trains on the same data with the same seeds, so each seed gives a paired difference
against the full model, and a Student's t interval says whether a change (SE's gain above all)
is larger than seed noise, as the SENet paper's CIFAR table is read. Writes ablation.json,
ablation.md and ablation.png.
"""

import os
from typing import Optional, Sequence

import ml_collections
from absl import app, flags

from se_resnet_jax import cli, files, train
from se_resnet_jax.experiments import common
from se_resnet_jax.models import MODELS, has_se

VARIANTS = ('full', 'no_se', 'no_dropout', 'no_augmentation')
ALL_OFF = 'all_off'
DESCRIPTIONS = {
    'full': 'the config as given',
    'no_se': 'the same network without SE blocks (model.name SE... -> ResNet...)',
    'no_dropout': 'model.dropout_rate = 0',
    'no_augmentation': 'augment.enabled = False (no crop, flip, colour jitter or cutout)',
    ALL_OFF: 'no SE, no dropout and no augmentation',
}


def variant_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  if variant not in DESCRIPTIONS:
    raise common.SettingError(f'Unknown ablation variant {variant!r}; choose from '
                              f'{", ".join(DESCRIPTIONS)}.', 'variants', variant)
  values = {}
  name = config.model.name
  if variant in ('no_se', ALL_OFF):
    if not has_se(name) or name[2:] not in MODELS:  # SEResNet18 -> ResNet18
      raise common.SettingError(f'model.name={name!r} has no SE blocks to remove; the ablation '
                                'needs an SE model such as SEResNet18.', 'model.name', name)
    values['model.name'] = name[2:]
  if variant in ('no_dropout', ALL_OFF):
    values['model.dropout_rate'] = 0.0
  if variant in ('no_augmentation', ALL_OFF):
    values['augment.enabled'] = False
  return common.with_values(config, values)


def run_ablation(config: ml_collections.ConfigDict, workdir: str, seeds: int = 3,
                 variants: Sequence[str] = VARIANTS, cache_dir: Optional[str] = None,
                 trainer: common.Trainer = train.train_and_evaluate) -> dict:
  """Trains (or reads back) every variant for seeds config.seed, +1, ...; returns ablation.json."""
  if seeds < 1:
    raise common.SettingError(f'seeds must be >= 1, got {seeds}.', 'seeds', seeds)
  variants = ['full'] + [v for v in dict.fromkeys(variants) if v != 'full']
  seed_list = [config.seed + i for i in range(seeds)]
  configs = {v: variant_config(config, v) for v in variants}
  for name, variant in configs.items():
    if name != 'full' and variant.to_dict() == config.to_dict():
      raise common.SettingError(
          f'Variant {name!r} ({DESCRIPTIONS[name]}) is the config itself; leave it out with '
          f'--variants={",".join(v for v in variants if v != name)}.', 'variants', name)
  runs = {(v, s): common.with_values(configs[v], {'seed': s}) for v in variants for s in seed_list}
  common.validate_all(list(runs.values()))
  split = 'test' if config.evaluate_test else 'validation'
  with common.compilation_cache(common.cache_dir_for(workdir, cache_dir)):
    summaries = {key: common.run(c, os.path.join(workdir, key[0], f'seed_{key[1]}'), trainer)
                 for key, c in sorted(runs.items(), key=lambda kv: kv[0][1])}  # seed by seed
  num_classes = summaries['full', seed_list[0]]['num_classes']
  full_params = common.count_parameters(configs['full'], num_classes)
  full = {s: summaries['full', s][split] for s in seed_list}
  result = {'split': split, 'seeds': seed_list, 'config': config.to_dict(), 'variants': []}
  for v in variants:
    runs_v = [dict(seed=s, **summaries[v, s]) for s in seed_list]
    params = common.count_parameters(configs[v], num_classes)
    stats = {k: common.mean_std(r[split][k] for r in runs_v) for k in ('accuracy', 'loss')}
    differences = {k: [r[split][k] - full[r['seed']][k] for r in runs_v] for k in stats}
    result['variants'].append({
        'name': v, 'description': DESCRIPTIONS[v], 'parameters': params,
        'parameters_change': params / full_params - 1.0, **stats,
        **{f'{k}_delta': common.mean_std(d) for k, d in differences.items()},
        **{f'{k}_delta_ci95': common.paired_interval(d) for k, d in differences.items()},
        'validation_accuracy': common.mean_std(r['validation']['accuracy'] for r in runs_v),
        'runs': runs_v})
  if 'no_se' in variants:  # SE's gain: full minus no_se per seed
    gain = {'model': configs['full'].model.name, 'baseline': configs['no_se'].model.name,
            'split': split}
    for k, sign in (('accuracy', 1.0), ('loss', -1.0)):  # a lower loss with SE is a gain
      differences = [sign * (full[s][k] - summaries['no_se', s][split][k]) for s in seed_list]
      gain[k] = dict(common.paired_interval(differences), per_seed=differences)
    result['se_gain'] = gain
  write_outputs(workdir, result)
  return result


def write_outputs(workdir: str, result: dict) -> None:
  split, seeds, variants = result['split'], result['seeds'], result['variants']
  label = split.capitalize()
  lines = ['# Ablation', '',
           f'{len(seeds)} seed(s) per variant ({", ".join(map(str, seeds))}), identical data and '
           f'seeds across variants; {split} metrics of the best-validation checkpoint. Values are '
           'mean ± sample std over seeds; Δ is the mean ± std of the per-seed differences against '
           '`full` (accuracy in points), with the 95% Student\'s t interval of their mean '
           f'(df = {len(seeds) - 1}).', '']
  if 'se_gain' in result:
    lines += [se_gain_line(result['se_gain']), '']
  rows = []
  for v in variants:
    is_full = v['name'] == 'full'
    rows.append([
        f'`{v["name"]}`', f'{v["parameters"]:,}',
        '' if is_full else f'{100 * v["parameters_change"]:+.2f}%',
        common.fmt(v['accuracy'], 100, 2),
        '' if is_full else common.fmt(v['accuracy_delta'], 100, 2, signed=True),
        '' if is_full else common.fmt_interval(v['accuracy_delta_ci95'], 100),
        common.fmt(v['loss']), '' if is_full else common.fmt(v['loss_delta'], signed=True),
        common.fmt(v['validation_accuracy'], 100, 2)])
  lines += files.markdown_table(
      ['Variant', 'Parameters', 'Δ parameters', f'{label} accuracy (%)', 'Δ accuracy',
       'Δ accuracy 95% CI', f'{label} loss', 'Δ loss', 'Validation accuracy (%)'], rows)
  lines += ['![Ablation](ablation.png)', '', '## Variants', '']
  lines += [f'- `{v["name"]}`: {v["description"]}' for v in variants] + ['', '## Runs', '']
  lines += files.markdown_table(
      ['Variant', 'Seed', f'{label} accuracy (%)', f'{label} loss', 'Validation accuracy (%)',
       'Best epoch', 'Epochs'],
      [[f'`{v["name"]}`', r['seed'], f'{100 * r[split]["accuracy"]:.2f}',
        f'{r[split]["loss"]:.4f}', f'{100 * r["validation"]["accuracy"]:.2f}',
        r['best_epoch'], r['epochs_completed']] for v in variants for r in v['runs']])
  common.write_tables(workdir, 'ablation', result, lines)
  common.bar_chart(
      os.path.join(workdir, 'ablation.png'), [v['name'] for v in variants],
      [(f'{label} accuracy (%)', [100 * v['accuracy']['mean'] for v in variants],
        [100 * v['accuracy']['std'] for v in variants]),
       (f'{label} loss', [v['loss']['mean'] for v in variants],
        [v['loss']['std'] for v in variants])],
      f'Ablation: mean ± std over {len(seeds)} seed(s)')


def define_flags() -> None:
  common.define_flags()
  flags.adopt_module_key_flags(common)
  flags.DEFINE_integer('seeds', 3, 'Number of seeds: config.seed, config.seed + 1, ...')
  flags.DEFINE_list('variants', list(VARIANTS), f'Variants to run, from {", ".join(DESCRIPTIONS)}; '
                    '"full" is always run (the deltas are against it).')
  flags.DEFINE_bool('all_off', False, f'Also run "{ALL_OFF}": no SE, no dropout, no augmentation.')


def se_gain_line(gain: dict) -> str:
  accuracy = gain['accuracy']
  verdict = ('' if accuracy['low'] is None else
             ' (larger than seed noise)' if accuracy['low'] > 0 else
             ' (not distinguishable from seed noise)' if accuracy['high'] >= 0 else
             ' (SE is worse beyond seed noise)')
  return (f'SE\'s gain, {gain["model"]} minus {gain["baseline"]}, {gain["split"]} accuracy: '
          f'{100 * accuracy["mean"]:+.2f} points, 95% CI {common.fmt_interval(accuracy, 100)} '
          f'(paired t over {accuracy["n"]} seed(s), df={accuracy["df"]}){verdict}.')


def closing_summary(workdir: str, result: dict) -> str:
  split = result['split']
  lines = [f'Ablation, {split} accuracy over {len(result["seeds"])} seed(s) (mean ± std; Δ against '
           'full, in points):', '']
  width = max(len(v['name']) for v in result['variants'])
  for v in result['variants']:
    delta = '' if v['name'] == 'full' else (
        f'  Δ {common.fmt(v["accuracy_delta"], 100, 2, signed=True)}'
        f'  95% CI {common.fmt_interval(v["accuracy_delta_ci95"], 100)}')
    lines.append(f'  {v["name"].ljust(width)}  {common.fmt(v["accuracy"], 100, 2)}%{delta}')
  if 'se_gain' in result:
    lines += ['', '  ' + se_gain_line(result['se_gain'])]
  return '\n'.join(lines + ['', common.tables_line(workdir, 'ablation')])


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  variants = f.variants + ([ALL_OFF] if f.all_off else [])
  common.run_command(argv, lambda: run_ablation(f.config, f.workdir, f.seeds, variants,
                                                f.cache_dir),
                     lambda result: closing_summary(f.workdir, result))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
