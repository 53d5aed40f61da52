r"""k-fold cross-validation of a few (reduction ratio, dropout) settings over the training set.

  python -m se_resnet_jax.experiments.kfold --config=configs/cifar10.py --workdir=runs/kfold \
      --folds=5 --settings=16:0.5,8:0.3

Every setting is judged on the same k stratified folds of the training split, never on the test
set; r=0 means no SE blocks, for a baseline. Writes kfold.json, kfold.md and kfold.png.
"""

import os
from typing import Optional, Sequence

import ml_collections
from absl import app, flags

from se_resnet_jax import cli, files, train
from se_resnet_jax.experiments import common


def parse_settings(text: str) -> list:
  """'16:0.5,8:0.3' -> [(16, 0.5), (8, 0.3)]."""
  settings = []
  for item in filter(None, (part.strip() for part in text.split(','))):
    try:
      r, p = item.split(':')
      settings.append((int(r), float(p)))
    except ValueError:
      raise common.SettingError(f'Bad setting {item!r} in --settings={text!r}: write '
                                'reduction:dropout pairs separated by commas, e.g. 16:0.5,8:0.3.',
                                'settings', item) from None
  return settings


def fold_config(config: ml_collections.ConfigDict, reduction: int, dropout: float, folds: int,
                fold: int) -> ml_collections.ConfigDict:
  return common.with_values(config, {
      'model.se_reduction': reduction, 'model.dropout_rate': dropout, 'kfold.num_folds': folds,
      'kfold.fold': fold, 'evaluate_test': False})


def run_kfold(config: ml_collections.ConfigDict, workdir: str, folds: int = 5,
              settings: Optional[Sequence[tuple]] = None, cache_dir: Optional[str] = None,
              trainer: common.Trainer = train.train_and_evaluate) -> dict:
  """Trains (or reads back) every (reduction, dropout) setting, by default the config's own, on
  every fold; returns kfold.json."""
  if folds < 2:
    raise common.SettingError(f'folds must be >= 2, got {folds}.', 'folds', folds)
  settings = list(dict.fromkeys(settings or [(config.model.se_reduction,
                                              config.model.dropout_rate)]))
  common.check_reduction_settable(config)
  runs = {(s, f): fold_config(config, *s, folds, f) for s in settings for f in range(folds)}
  common.validate_all(list(runs.values()))
  with common.compilation_cache(common.cache_dir_for(workdir, cache_dir)):
    summaries = {key: common.run(c, os.path.join(workdir, common.setting_name(*key[0]),
                                                 f'fold_{key[1]}'), trainer)
                 for key, c in runs.items()}
  rows = []
  for r, p in settings:
    per_fold = [dict(fold=f, **summaries[(r, p), f]) for f in range(folds)]
    rows.append({'reduction': r, 'dropout': p,
                 **{k: common.mean_std(x['validation'][k] for x in per_fold)
                    for k in ('accuracy', 'loss')}, 'runs': per_fold})
  rows.sort(key=lambda row: (-row['accuracy']['mean'], row['loss']['mean']))
  result = {'folds': folds, 'validation_seed': config.validation_seed, 'config': config.to_dict(),
            'settings': rows}
  write_outputs(workdir, result)
  return result


def write_outputs(workdir: str, result: dict) -> None:
  folds, rows = result['folds'], result['settings']
  names = [common.setting_name(row['reduction'], row['dropout']) for row in rows]
  lines = ['# k-fold cross-validation', '',
           f'{folds} stratified folds of the training split (validation_seed '
           f'{result["validation_seed"]}); each setting trains {folds} times, validating on one '
           'fold each time. Mean ± sample std over folds, best first; the test set is not used.',
           '']
  lines += files.markdown_table(
      ['Rank', 'r', 'Dropout', 'Validation accuracy (%)', 'Validation loss',
       *[f'Fold {f} (%)' for f in range(folds)]],
      [[i + 1, row['reduction'], f'{row["dropout"]:g}', common.fmt(row['accuracy'], 100, 2),
        common.fmt(row['loss']), *[f'{100 * x["validation"]["accuracy"]:.2f}'
                                   for x in row['runs']]] for i, row in enumerate(rows)])
  lines += ['![k-fold validation accuracy](kfold.png)']
  common.write_tables(workdir, 'kfold', result, lines)
  common.bar_chart(os.path.join(workdir, 'kfold.png'), names,
                   [('validation accuracy (%)', [100 * row['accuracy']['mean'] for row in rows],
                     [100 * row['accuracy']['std'] for row in rows])],
                   f'{folds}-fold cross-validation: mean ± std over folds')


def define_flags() -> None:
  common.define_flags()
  flags.adopt_module_key_flags(common)
  flags.DEFINE_integer('folds', 5, 'Number of folds k.')
  flags.DEFINE_string('settings', None, 'reduction:dropout pairs, e.g. 16:0.5,8:0.3 (r=0: no SE); '
                      "default: the config's model.se_reduction and model.dropout_rate.")


def closing_summary(workdir: str, result: dict) -> str:
  lines = [f'{result["folds"]}-fold cross-validation, validation accuracy (mean ± std over '
           'folds), best first:', '']
  for i, row in enumerate(result['settings']):
    lines.append(f'  {i + 1}. r={row["reduction"]}, dropout={row["dropout"]:g}: '
                 f'{common.fmt(row["accuracy"], 100, 2)}%')
  return '\n'.join(lines + ['', common.tables_line(workdir, 'kfold')])


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  common.run_command(argv, lambda: run_kfold(
      f.config, f.workdir, f.folds, parse_settings(f.settings) if f.settings else None,
      f.cache_dir), lambda result: closing_summary(f.workdir, result))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
