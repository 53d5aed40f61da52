"""What the experiment commands share: runs in subdirectories, the compilation cache, tables.

The trainer writes a run's report.json last, atomically, so a run without one is resumed from its
checkpoints on a rerun while finished runs are read back.
"""

import collections
import contextlib
import json
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
from ml_collections import config_flags

from se_resnet_jax import cli, files, rundir, train
from se_resnet_jax.config import build_model, validate_config
from se_resnet_jax.console import Console
from se_resnet_jax.errors import ConfigError, UserError
from se_resnet_jax.models import has_se
from se_resnet_jax.summary import config_differences, read_report

REPORT = 'report.json'
CACHE_SUBDIR = 'jax_cache'
_CACHE_OPTIONS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
                  'jax_persistent_cache_min_entry_size_bytes')

# Trains or resumes a run as train.train_and_evaluate does; tests and benchmarks pass their own.
Trainer = Callable[[ml_collections.ConfigDict, str], dict]


class RunConflictError(UserError):
  """A run directory holds a run made with other settings; `differences` maps each dotted field
  to (its value there, its value now)."""

  def __init__(self, run_dir: str, differences: dict):
    shown = ', '.join(f'{k}: {there!r} there, {now!r} now'
                      for k, (there, now) in list(differences.items())[:5])
    super().__init__(
        f'{run_dir} holds a run made with other settings ({shown}'
        f'{", ..." if len(differences) > 5 else ""}). Rerun with the settings it was made with, or '
        'use a new --workdir (or move that directory aside).')
    self.run_dir = run_dir
    self.differences = differences


class SettingError(ConfigError):
  """`field` is a dotted config field or an argument such as 'seeds'; `value` what it was given."""

  def __init__(self, message: str, field: str, value: Any):
    super().__init__(message)
    self.field = field
    self.value = value


@contextlib.contextmanager
def compilation_cache(cache_dir: str) -> Iterator[None]:
  """JAX's persistent compilation cache in `cache_dir`, for every program however small or quick:
  the seeds of one ablation variant, grid cells sharing r, reruns and resumes then load their
  programs from disk (keys and the normalisation are arguments of the compiled step, not
  constants)."""
  previous = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  os.makedirs(cache_dir, exist_ok=True)
  _set_cache_options(dict(zip(_CACHE_OPTIONS, (cache_dir, 0.0, 0))))
  try:
    yield
  finally:
    _set_cache_options(previous)


def _set_cache_options(values: dict) -> None:
  for name, value in values.items():
    jax.config.update(name, value)
  jax_compilation_cache.reset_cache()  # JAX opens its cache directory once; make it look again


_cache_events: collections.Counter = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kwargs: _cache_events.update([event]))


def run(config: ml_collections.ConfigDict, run_dir: str,
        trainer: Trainer = train.train_and_evaluate) -> dict:
  """The numbers the tables use of the run in `run_dir`, read back if finished, else trained or
  resumed there; runs trained now add how many of their compilations the cache answered."""
  result = read_report(run_dir)  # a damaged report is none: the run is evaluated again
  saved, config_path = result and result['config'], os.path.join(run_dir, rundir.CONFIG_FILE)
  if result is None and os.path.exists(config_path):  # an unfinished run, to resume
    with open(config_path) as f:
      saved = json.load(f)
  differ = config_differences(saved, config) if saved else []
  if differ:  # rather stop than mix two settings in one run
    saved, current = (traverse_util.flatten_dict(c, sep='.') for c in (saved, config.to_dict()))
    raise RunConflictError(run_dir, {k: (saved.get(k), current.get(k)) for k in differ})
  if result is not None:
    Console().say(f'{run_dir}: finished earlier, read from its {REPORT}.')
    extra = {'trained_now': False}
  else:
    before = collections.Counter(_cache_events)
    Console().say(f'{run_dir}: training (resuming from its checkpoints if it has any).')
    result = trainer(config, run_dir)  # Preempted (SIGTERM) passes through: no further run starts
    new = _cache_events - before
    requests, hits = (new[f'/jax/compilation_cache/{k}']
                      for k in ('compile_requests_use_cache', 'cache_hits'))
    extra = {'trained_now': True,
             'compile_cache': {'requests': requests, 'hits': hits, 'misses': requests - hits}}
  summary = {'run_dir': run_dir, 'epochs_completed': result.get('epochs_completed'),
             'best_epoch': result.get('best_epoch'), 'num_classes': len(result['class_names'])}
  for split in ('validation', 'test'):
    if result.get(split) is not None:
      summary[split] = {k: float(result[split][k]) for k in ('accuracy', 'loss')}
  if 'early_stopping' in result:
    summary['stopped_epoch'] = result['early_stopping']['stopped_epoch']
  return dict(summary, **extra)


def validate_all(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Checks every run's config before any is trained, so a bad one fails in seconds."""
  for config in configs:
    validate_config(config, jax.device_count())
    if not config.validation_size and not config.kfold.num_folds:
      raise SettingError('The experiments need a validation split (best checkpoints and choices '
                         'use it, never the test set): set validation_size > 0.',
                         'validation_size', config.validation_size)


def check_reduction_settable(config: ml_collections.ConfigDict) -> None:
  if not has_se(config.model.name):
    raise SettingError(f'model.name={config.model.name!r} has no SE blocks, so the reduction '
                       'ratio does nothing; use an SE model such as SEResNet18.', 'model.name',
                       config.model.name)
  if config.model.se_reductions:
    raise SettingError(f'model.se_reductions={tuple(config.model.se_reductions)} (per stage) '
                       'overrides model.se_reduction, which the experiment sets; set '
                       'model.se_reductions to () in the config.', 'model.se_reductions',
                       tuple(config.model.se_reductions))


def count_parameters(config: ml_collections.ConfigDict, num_classes: int) -> int:
  """Parameters of the config's model, from shapes alone (jax.eval_shape computes nothing)."""
  model = build_model(config, num_classes)
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)  # the count does not depend on H, W
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))


def mean_std(values: Iterable[float]) -> dict:
  """{'mean', 'std', 'n'}: std is the sample standard deviation (ddof=1), 0 for one value."""
  values = np.asarray(list(values), dtype=np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return {'mean': float(values.mean()), 'std': std, 'n': int(len(values))}


def paired_interval(differences: Iterable[float], confidence: float = 0.95) -> dict:
  """mean_std plus 'df' and Student's t interval 'low', 'high' (None for one seed) of the mean of
  paired differences: pairing by seed removes what the seed does to both runs alike."""
  from scipy import stats  # not needed to import the experiments

  summary = mean_std(differences)
  n = summary['n']
  summary['df'] = n - 1
  if n < 2:
    return dict(summary, low=None, high=None)
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * summary['std'] / np.sqrt(n)
  return dict(summary, low=summary['mean'] - half, high=summary['mean'] + half)


def fmt_interval(interval: dict, scale: float = 1.0, decimals: int = 2) -> str:
  """'[low, high]' of a paired_interval, or 'n/a' for one seed."""
  if interval['low'] is None:
    return 'n/a (1 seed)'
  return f'[{scale * interval["low"]:+.{decimals}f}, {scale * interval["high"]:+.{decimals}f}]'


def fmt(stats: dict, scale: float = 1.0, decimals: int = 4, signed: bool = False) -> str:
  """'mean ± std' of a mean_std dict, e.g. scale=100, decimals=2 for accuracies in percent."""
  sign = '+' if signed else ''
  return f'{scale * stats["mean"]:{sign}.{decimals}f} ± {scale * stats["std"]:.{decimals}f}'


def bar_chart(path: str, labels: Sequence[str], panels: Sequence[tuple], title: str) -> None:
  """Side-by-side bar panels with error bars; `panels` holds (ylabel, means, stds) tuples."""
  if not files.drawing_available():
    return
  plt = files.pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 1.2 * len(labels)) * len(panels), 4),
                           squeeze=False)
  x = np.arange(len(labels))
  for ax, (ylabel, means, stds) in zip(axes[0], panels):
    bars = ax.bar(x, means, yerr=stds, capsize=4, color='tab:blue', alpha=0.8)
    ax.bar_label(bars, labels=[f'{m:.4g}' for m in means], label_type='center', color='white',
                 fontsize=8)
    ax.set_xticks(x, labels, rotation=20, ha='right')
    ax.set_ylabel(ylabel)
    ax.grid(axis='y', alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  files.save_figure(fig, path)


def setting_name(reduction: int, dropout: float) -> str:
  return f'r{reduction}_p{dropout:g}'


def with_values(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(values)
  return config


def write_tables(workdir: str, name: str, result: dict, markdown: Sequence[str]) -> None:
  files.write_json_atomic(os.path.join(workdir, f'{name}.json'), result)
  files.write_text(os.path.join(workdir, f'{name}.md'), markdown)


def tables_line(workdir: str, name: str) -> str:
  return (f'  table        {os.path.join(workdir, f"{name}.md")} '
          f'(numbers: {os.path.join(workdir, f"{name}.json")})')


def define_flags() -> None:
  """Called only when a module runs as a command, so importing the experiments defines no flags
  that could clash with other commands'."""
  config_flags.DEFINE_config_file('config', None, 'Training config file, as for '
                                  'se_resnet_jax.main; --config.field=value overrides.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Experiment directory: one subdirectory per run, tables '
                      'and pictures at the top. Rerun the same command to resume.')
  flags.DEFINE_string('cache_dir', None, 'JAX persistent compilation cache (default '
                      f'<workdir>/{CACHE_SUBDIR}); share one between experiments to reuse more.')
  flags.mark_flags_as_required(['config', 'workdir'])


def run_command(argv: Sequence[str], experiment: Callable[[], Any],
                closing: Callable[[Any], str]) -> None:
  """Runs an experiment command (user errors: one line, non-zero exit), then prints `closing`."""
  def command():
    result = experiment()
    if jax.process_index() == 0:
      print(closing(result))

  cli.run(argv, command)


def cache_dir_for(workdir: str, cache_dir: Optional[str]) -> str:
  return cache_dir or os.path.join(workdir, CACHE_SUBDIR)
