r"""Hyperparameter search over the SE reduction ratio r and the dropout rate, on validation only.

  python -m se_resnet_jax.experiments.search --config=configs/cifar10.py --workdir=runs/search \
      --mode=grid --reductions=8,16,32 --dropouts=0.0,0.3,0.5,0.7

The runs do not even evaluate the test set unless --report_test asks, and then only to print it,
so nothing can leak into a choice. Writes search.json, search.md, a heat map (search.png) and
chosen_config.py, a config file that reruns the chosen settings.
"""

import itertools
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np
from absl import app, flags
from flax import traverse_util
from ml_collections import config_flags

from se_resnet_jax import cli, files, train
from se_resnet_jax.config import base_config, load_config_file
from se_resnet_jax.experiments import common

REDUCTIONS = (8, 16, 32)  # the study's grid
DROPOUTS = (0.0, 0.3, 0.5, 0.7)  # CIFAR-100 also 0.4, 0.6
STAGE1_DROPOUT = 0.5
MODES = ('grid', 'two_stage')
SELECTION = 'highest validation accuracy; ties: lowest validation loss'


def cell_config(config: ml_collections.ConfigDict, reduction: int, dropout: float,
                report_test: bool = False) -> ml_collections.ConfigDict:
  return common.with_values(config, {'model.se_reduction': reduction,
                                     'model.dropout_rate': dropout, 'evaluate_test': report_test})


def ranked(runs: Sequence[dict]) -> list:
  """Runs best first by SELECTION, then in the given order; test metrics are never read."""
  return sorted(runs, key=lambda r: (-r['validation']['accuracy'], r['validation']['loss']))


def run_search(config: ml_collections.ConfigDict, workdir: str, mode: str = 'grid',
               reductions: Sequence[int] = REDUCTIONS, dropouts: Sequence[float] = DROPOUTS,
               stage1_dropout: float = STAGE1_DROPOUT, report_test: bool = False,
               config_file: Optional[str] = None, cache_dir: Optional[str] = None,
               trainer: common.Trainer = train.train_and_evaluate) -> dict:
  """Runs the search (reading back finished runs); returns search.json. chosen_config.py starts
  from `config_file`, the file `config` came from, if given, else from base_config()."""
  if mode not in MODES:
    raise common.SettingError(f'Unknown search mode {mode!r}; choose one of {", ".join(MODES)}.',
                              'mode', mode)
  reductions, dropouts = list(dict.fromkeys(reductions)), list(dict.fromkeys(dropouts))
  if not reductions or not dropouts:
    raise common.SettingError('The search needs at least one reduction ratio and one dropout '
                              'rate.', 'dropouts' if reductions else 'reductions', [])
  common.check_reduction_settable(config)
  axis_dropouts = sorted(set(dropouts) | ({stage1_dropout} if mode == 'two_stage' else set()))
  common.validate_all([cell_config(config, r, p, report_test)
                       for r, p in itertools.product(reductions, axis_dropouts)])
  runs = {}

  def run_cell(r: int, p: float, stage: int) -> dict:
    if (r, p) not in runs:
      summary = common.run(cell_config(config, r, p, report_test),
                           os.path.join(workdir, common.setting_name(r, p)), trainer)
      runs[r, p] = dict(reduction=r, dropout=p, stage=stage, **summary)
    return runs[r, p]

  with common.compilation_cache(common.cache_dir_for(workdir, cache_dir)):
    if mode == 'grid':
      chosen = ranked([run_cell(r, p, 0) for r, p in itertools.product(reductions, dropouts)])[0]
    else:
      best_r = ranked([run_cell(r, stage1_dropout, 1) for r in reductions])[0]['reduction']
      chosen = ranked([run_cell(best_r, p, 2) for p in axis_dropouts])[0]
  result = {'mode': mode, 'selection': SELECTION, 'reductions': reductions, 'dropouts': dropouts,
            'runs': list(runs.values()),
            'chosen': {'model.se_reduction': chosen['reduction'],
                       'model.dropout_rate': chosen['dropout'],
                       'validation': chosen['validation'], 'run_dir': chosen['run_dir']}}
  if mode == 'two_stage':
    result['stage1_dropout'] = stage1_dropout
  chosen_path = os.path.join(workdir, 'chosen_config.py')
  top3 = ','.join(f'{r["reduction"]}:{r["dropout"]:g}' for r in ranked(result['runs'])[:3])
  result['chosen_config'] = chosen_path
  result['commands'] = {
      'train_chosen': f'python -m se_resnet_jax.main --config={chosen_path} '
                      f'--workdir={os.path.join(workdir, "chosen")}',
      'test_chosen_run': f'python -m se_resnet_jax.evaluate --workdir={chosen["run_dir"]} '
                         '--checkpoint=best --split=test',
      'kfold_top3': f'python -m se_resnet_jax.experiments.kfold --config={chosen_path} '
                    f'--workdir={workdir.rstrip("/")}_kfold --folds=5 --settings={top3}'}
  write_config_file(chosen_path, config, {'model.se_reduction': chosen['reduction'],
                                         'model.dropout_rate': chosen['dropout']}, config_file,
                    f'the {mode} search in {workdir} (its run: {chosen["run_dir"]})',
                    result['commands']['train_chosen'])
  write_outputs(workdir, result, axis_dropouts)
  return result


def write_outputs(workdir: str, result: dict, axis_dropouts: Sequence[float]) -> None:
  chosen, reductions = result['chosen'], result['reductions']
  by_cell = {(r['reduction'], r['dropout']): r for r in result['runs']}
  key = (chosen['model.se_reduction'], chosen['model.dropout_rate'])
  bold = lambda r, p: '**' if (r, p) == key else ''
  cell = lambda r, p: ('' if (r, p) not in by_cell else f'{bold(r, p)}'
                       f'{100 * by_cell[r, p]["validation"]["accuracy"]:.2f}{bold(r, p)}')
  two_stage = result['mode'] == 'two_stage'
  mode = ('two-stage (stage 1: dropout {:g}, choose r; stage 2: tune dropout with that r)'
          .format(result['stage1_dropout']) if two_stage else 'full grid')
  lines = ['# Hyperparameter search', '',
           f'Mode: {mode}. Choice: {SELECTION}; the test set plays no part.', '',
           '## Validation accuracy (%), r by dropout', '']
  lines += files.markdown_table(['r \\ dropout', *[f'{p:g}' for p in axis_dropouts]],
                                 [[f'**{r}**', *[cell(r, p) for p in axis_dropouts]]
                                  for r in reductions])
  lines += ['![Validation accuracy](search.png)', '', '## Runs', '']
  has_test = any('test' in r for r in result['runs'])
  header = ['r', 'dropout', *(['Stage'] if two_stage else []),
            'Validation accuracy (%)', 'Validation loss', 'Best epoch', 'Epochs',
            *(['Test accuracy (%, not used)'] if has_test else [])]
  lines += files.markdown_table(header, [
      [r['reduction'], f'{r["dropout"]:g}', *([r['stage']] if two_stage else []),
       f'{100 * r["validation"]["accuracy"]:.2f}', f'{r["validation"]["loss"]:.4f}',
       r['best_epoch'], r['epochs_completed'],
       *([f'{100 * r["test"]["accuracy"]:.2f}' if 'test' in r else ''] if has_test else [])]
      for r in ranked(result['runs'])])
  lines += ['## Chosen', '',
            f'r = {key[0]}, dropout = {key[1]:g}: validation accuracy '
            f'{100 * chosen["validation"]["accuracy"]:.2f}%, loss '
            f'{chosen["validation"]["loss"]:.4f} (`{chosen["run_dir"]}`).', '',
            '```bash',
            '# train the chosen settings (config file written by this search):',
            result['commands']['train_chosen'],
            "# or report the chosen run's test accuracy, once:",
            result['commands']['test_chosen_run'],
            '# or cross-validate the best three settings:',
            result['commands']['kfold_top3'], '```']
  common.write_tables(workdir, 'search', result, lines)
  plot_heat_map(os.path.join(workdir, 'search.png'), reductions, axis_dropouts, by_cell, key,
                'Two-stage' if two_stage else 'Grid')


def plot_heat_map(path: str, reductions: Sequence[int], dropouts: Sequence[float],
                  by_cell: dict, chosen: tuple, mode: str) -> None:
  if not files.drawing_available():
    return
  plt = files.pyplot()
  grid = np.full((len(reductions), len(dropouts)), np.nan)
  for (r, p), run in by_cell.items():
    grid[reductions.index(r), list(dropouts).index(p)] = 100 * run['validation']['accuracy']
  fig, ax = plt.subplots(figsize=(1.2 * len(dropouts) + 2.5, 0.8 * len(reductions) + 2))
  image = ax.imshow(np.ma.masked_invalid(grid), cmap='viridis', aspect='auto')
  middle = np.nanmin(grid) + (np.nanmax(grid) - np.nanmin(grid)) / 2
  for (i, j), value in np.ndenumerate(grid):
    if not np.isnan(value):
      ax.text(j, i, f'{value:.2f}', ha='center', va='center',
              color='black' if value > middle else 'white')
  i, j = reductions.index(chosen[0]), list(dropouts).index(chosen[1])
  ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor='red', linewidth=3))
  ax.set_xticks(range(len(dropouts)), [f'{p:g}' for p in dropouts])
  ax.set_yticks(range(len(reductions)), [str(r) for r in reductions])
  ax.set_xlabel('dropout rate')
  ax.set_ylabel('SE reduction ratio r')
  fig.colorbar(image, ax=ax, label='validation accuracy (%)')
  ax.set_title(f'{mode} search: validation accuracy (chosen: red)')
  fig.tight_layout()
  files.save_figure(fig, path)


def write_config_file(path: str, config: ml_collections.ConfigDict, chosen: dict,
                      config_file: Optional[str], source: str, train_command: str) -> None:
  """The base file is referenced relative to the written file when the two share a directory
  below the root (a repository's configs/ and runs/), so the pair can move together."""
  base = load_config_file(config_file) if config_file else base_config()
  base_flat = traverse_util.flatten_dict(base.to_dict(), sep='.')
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  overrides = {k: v for k, v in flat.items() if base_flat.get(k) != v}
  overrides.update(chosen)
  lines = [f'"""Settings chosen by {source}:', ', '.join(f'{k}={v}' for k, v in chosen.items()),
           '', f'Train them: {train_command}', '"""', '']
  if config_file:
    base_path, here = os.path.abspath(config_file), os.path.dirname(os.path.abspath(path))
    shared = os.path.commonpath([base_path, here])
    if shared != os.path.dirname(shared):  # a directory in common, not only the root
      base_path = os.path.relpath(base_path, here)
    lines += ['import importlib.util', 'import os', '',
              f'BASE_CONFIG = {base_path!r}  # the search\'s --config (relative: to this file)']
    load = ['  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), BASE_CONFIG)',
            "  spec = importlib.util.spec_from_file_location('search_base_config', path)",
            '  module = importlib.util.module_from_spec(spec)',
            '  spec.loader.exec_module(module)', '  config = module.get_config()']
  else:
    lines += ['from se_resnet_jax.config import base_config', '']
    load = ['  config = base_config()']
  lines += ['OVERRIDES = {', *[f'    {k!r}: {v!r},' for k, v in overrides.items()], '}', '', '',
            'def get_config():', *load, '  config.update_from_flattened_dict(OVERRIDES)',
            '  return config']
  files.write_text(path, lines)


def define_flags() -> None:
  common.define_flags()
  flags.adopt_module_key_flags(common)
  flags.DEFINE_enum('mode', 'grid', MODES, 'grid: every (r, dropout); two_stage: the study\'s '
                    'search (fix dropout, choose r; then tune dropout with that r).')
  flags.DEFINE_list('reductions', [str(r) for r in REDUCTIONS], 'SE reduction ratios r.')
  flags.DEFINE_list('dropouts', [str(p) for p in DROPOUTS], 'Dropout rates.')
  flags.DEFINE_float('stage1_dropout', STAGE1_DROPOUT, 'two_stage: the dropout while r is chosen.')
  flags.DEFINE_bool('report_test', False, 'Also evaluate each run on the test set, shown in the '
                    'table for information only (the choice never reads it).')


def _numbers(flag: str, kind: type) -> list:
  values = flags.FLAGS[flag].value
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise common.SettingError(f'--{flag} takes comma-separated {kind.__name__} values, got '
                              f'{",".join(values)!r}.', flag, values) from None


def closing_summary(workdir: str, result: dict) -> str:
  chosen = result['chosen']
  return '\n'.join([
      f'Chosen: r={chosen["model.se_reduction"]}, dropout={chosen["model.dropout_rate"]:g} '
      f'(validation accuracy {100 * chosen["validation"]["accuracy"]:.2f}%, loss '
      f'{chosen["validation"]["loss"]:.4f}; run {chosen["run_dir"]}), of {len(result["runs"])} '
      f'runs by {SELECTION}.', '',
      common.tables_line(workdir, 'search'),
      f'  config       {result["chosen_config"]}',
      f'  train it     {result["commands"]["train_chosen"]}',
      f'  test it once {result["commands"]["test_chosen_run"]}'])


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  common.run_command(argv, lambda: run_search(
      f.config, f.workdir, f.mode, _numbers('reductions', int), _numbers('dropouts', float),
      f.stage1_dropout, f.report_test, config_flags.get_config_filename(f['config']),
      f.cache_dir), lambda result: closing_summary(f.workdir, result))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
