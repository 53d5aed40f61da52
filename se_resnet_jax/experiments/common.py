"""What the experiment commands share: runs in subdirectories, the compilation cache, tables.

A run is "finished" when its report.json exists: the trainer (`train_and_evaluate`) writes it
last, atomically, so a run killed at any earlier point has none and is resumed from its own
checkpoints when the experiment is rerun, while finished runs are read back instead of being
trained again.
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

from se_resnet_jax import cli, files, train
from se_resnet_jax.config import build_model, validate_config
from se_resnet_jax.console import Console
from se_resnet_jax.errors import ConfigError, UserError
from se_resnet_jax.models import has_se
from se_resnet_jax.summary import config_differences, read_report

REPORT = 'report.json'
CACHE_SUBDIR = 'jax_cache'
_CACHE_OPTIONS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
                  'jax_persistent_cache_min_entry_size_bytes')

Trainer = Callable[[ml_collections.ConfigDict, str], dict]
"""Trains (or resumes) a config's run in a directory and returns its report, as
`train.train_and_evaluate` does; the experiments take one so that tests and benchmarks can
stand in for training."""


class RunConflictError(UserError):
  """A run directory holds a run made with other settings: rather stop than mix the two.

  `differences` maps each dotted field that differs to (its value there, its value now).
  """

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
  """An experiment's setting that cannot work: `field` names it (a dotted config field, or an
  argument such as 'seeds' or 'variants') and `value` is what it was given."""

  def __init__(self, message: str, field: str, value: Any):
    super().__init__(message)
    self.field = field
    self.value = value


@contextlib.contextmanager
def compilation_cache(cache_dir: str) -> Iterator[None]:
  """JAX's persistent compilation cache in `cache_dir`, for every program however small or quick.

  Runs whose compiled programs agree then load them from disk instead of compiling again: the
  seeds of one ablation variant (keys are arguments of the compiled step, not constants), the
  evaluation step of grid cells that share r, and every rerun or resume. A setting compiled into
  the step (dropout rate, schedule, augmentation switches, a fold's normalisation statistics)
  still compiles once per value. The previous cache settings are restored on exit.
  """
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
_listening = False


def _count_cache_event(event: str, **kwargs: Any) -> None:
  if event.startswith('/jax/compilation_cache/'):
    _cache_events[event] += 1


def _cache_counts() -> tuple[int, int]:
  """(compile requests, persistent-cache hits) so far in this process."""
  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_count_cache_event)
    _listening = True
  return (_cache_events['/jax/compilation_cache/compile_requests_use_cache'],
          _cache_events['/jax/compilation_cache/cache_hits'])


def _check_same_config(saved: Optional[dict], config: ml_collections.ConfigDict,
                       run_dir: str) -> None:
  """Refuses to reuse (or resume) a run made with other settings instead of mixing them."""
  if saved is None:
    return
  differ = config_differences(saved, config)
  if differ:
    saved = traverse_util.flatten_dict(saved, sep='.')
    current = traverse_util.flatten_dict(config.to_dict(), sep='.')
    raise RunConflictError(run_dir, {k: (saved.get(k), current.get(k)) for k in differ})


def _read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run(config: ml_collections.ConfigDict, run_dir: str,
        trainer: Trainer = train.train_and_evaluate) -> dict:
  """Summary of the run in `run_dir`: read back if finished, else trained or resumed there.

  Returns {'run_dir', 'epochs_completed', 'best_epoch', 'num_classes', 'validation' and (when the
  run evaluated it) 'test' as {'accuracy', 'loss'}, 'stopped_epoch' with early stopping,
  'trained_now', and for runs trained now 'compile_cache': {'requests', 'hits', 'misses'}}.
  """
  finished = read_report(run_dir)  # a damaged report is none: the run is evaluated again
  if finished is not None:
    _check_same_config(finished.get('config'), config, run_dir)
    Console().say(f'{run_dir}: finished earlier, read from its {REPORT}.')
    return dict(summarize(finished, run_dir), trained_now=False)
  _check_same_config(_read_json(os.path.join(run_dir, 'config.json')), config, run_dir)
  requests, hits = _cache_counts()
  Console().say(f'{run_dir}: training (resuming from its checkpoints if it has any).')
  result = trainer(config, run_dir)  # Preempted (SIGTERM) passes through: no further run starts
  now_requests, now_hits = _cache_counts()
  cache = {'requests': now_requests - requests, 'hits': now_hits - hits}
  cache['misses'] = cache['requests'] - cache['hits']
  return dict(summarize(result, run_dir), trained_now=True, compile_cache=cache)


def summarize(result: dict, run_dir: str) -> dict:
  """The numbers the experiments' tables use, from a run's report."""
  summary = {'run_dir': run_dir, 'epochs_completed': result.get('epochs_completed'),
             'best_epoch': result.get('best_epoch'), 'num_classes': len(result['class_names'])}
  for split in ('validation', 'test'):
    if result.get(split) is not None:
      summary[split] = {k: float(result[split][k]) for k in ('accuracy', 'loss')}
  if 'early_stopping' in result:
    summary['stopped_epoch'] = result['early_stopping']['stopped_epoch']
  return summary


def validate_all(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Checks every run's config before any is trained, so a bad one fails in seconds.

  Each run needs a validation split: best checkpoints and every choice are made on it, never on
  the test set.
  """
  for config in configs:
    validate_config(config, jax.device_count())
    if not config.validation_size and not config.kfold.num_folds:
      raise SettingError('The experiments need a validation split (best checkpoints and choices '
                         'use it, never the test set): set validation_size > 0.',
                         'validation_size', config.validation_size)


def check_reduction_settable(config: ml_collections.ConfigDict) -> None:
  """The model's SE reduction ratio must come from model.se_reduction for a search to set it."""
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
  """{'mean', 'std', 'n', 'df', 'low', 'high'}: Student's t confidence interval of the mean of
  paired differences (one per seed), mean ± t(df = n - 1) * std / sqrt(n).

  Pairing by seed removes what the seed does to both runs alike; with two seeds df = 1 and
  t = 12.71, so the interval is wide unless the differences agree closely. One seed gives no
  interval (low and high None).
  """
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
  """Directory name of a (reduction ratio, dropout) setting, e.g. r16_p0.5."""
  return f'r{reduction}_p{dropout:g}'


def with_values(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with fields set by dotted name, e.g. {'model.dropout_rate': 0.0}."""
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(values)
  return config


def write_tables(workdir: str, name: str, result: dict, markdown: Sequence[str]) -> None:
  """<name>.json (every number, for programs) and <name>.md (the tables, for people)."""
  files.write_json_atomic(os.path.join(workdir, f'{name}.json'), result)
  files.write_text(os.path.join(workdir, f'{name}.md'), markdown)


def tables_line(workdir: str, name: str) -> str:
  """The closing summaries' pointer to what write_tables wrote."""
  return (f'  table        {os.path.join(workdir, f"{name}.md")} '
          f'(numbers: {os.path.join(workdir, f"{name}.json")})')


def define_flags() -> None:
  """--config, --workdir and --cache_dir of an experiment command.

  Called only when a module runs as a command, so importing the experiments as a library (tests,
  notebooks, beside se_resnet_jax.main) defines no flags and cannot clash with other commands'.
  """
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
  """Runs an experiment command, turning user errors into one line and a non-zero exit.

  It ends with `closing(result)` on stdout (process 0): what was chosen or found, and the table.
  """
  def command():
    result = experiment()
    if jax.process_index() == 0:
      print(closing(result))

  cli.run(argv, command)


def cache_dir_for(workdir: str, cache_dir: Optional[str]) -> str:
  """The cache an experiment uses: --cache_dir if given, else one inside its workdir."""
  return cache_dir or os.path.join(workdir, CACHE_SUBDIR)
