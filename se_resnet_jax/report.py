"""The report a run leaves in its workdir: report.json for machines, report.md for people, pictures.

`final_report` evaluates weights on the run's splits; the metrics are then host-side numpy on the
per-example predictions, with scikit-learn's conventions (see `split_report`) but without it.
"""

import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from se_resnet_jax import files, input_pipeline
from se_resnet_jax.files import markdown_table, pyplot, save_figure
from se_resnet_jax.inference import measure_inference
from se_resnet_jax.models import IMAGE_SHAPE, SEResNet
from se_resnet_jax.progress import Progress
from se_resnet_jax.sharding import shard_eval_split
from se_resnet_jax.steps import evaluate

REPORT_JSON = 'report.json'
# The pictures a report may have, with their captions in report.md.
FIGURES = {'curves.png': 'Learning curves', 'confusion_matrix.png': 'Confusion matrix',
           'per_class_accuracy.png': 'Per-class accuracy'}
_SPLITS = ('validation', 'test')  # in the order they are rendered

_TIMING_LABELS = {
    'train_time_per_epoch_s': 'Train time per epoch (s)',
    'train_images_per_s': 'Train throughput (images/s)',
    'inference_images_per_s': 'Inference throughput (images/s)',
    'inference_latency_ms_batch1': 'Inference latency, batch 1 (ms)',
    'compile_s': 'Compilation time (s)',
    'device_kind': 'Device kind',
}

# Above this many classes, per-cell annotations and bar labels turn into noise.
_MAX_ANNOTATED_CLASSES = 20


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) int64 counts, rows true and columns predicted (as sklearn); every
  class has a row and a column, present or not, so the matrices of different splits line up. A
  class index out of range raises ValueError rather than being dropped by the bincount."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if labels.ndim != 1 or labels.shape != predictions.shape:
    raise ValueError('labels and predictions must be 1-D arrays of the same length, got shapes '
                     f'{labels.shape} and {predictions.shape}.')
  for name, values in (('labels', labels), ('predictions', predictions)):
    if values.size and not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f'{name} must hold integer class indices, got dtype {values.dtype}.')
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f'{name} must lie in [0, {num_classes}), got range '
                       f'[{values.min()}, {values.max()}].')
  pairs = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
  counts = np.bincount(pairs, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
  numerator = numerator.astype(np.float64)
  return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def split_report(labels: np.ndarray, predictions: np.ndarray, losses: np.ndarray,
                 top5_correct: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
  """One evaluated split as a JSON-serialisable dict: accuracies, loss, matrix, per-class table.

  Precision, recall and F1 match sklearn's `precision_recall_fscore_support(zero_division=0,
  labels=range(len(class_names)))`; the macro average is over all classes, present or not, so it
  compares across splits. A class's accuracy is its recall. An empty split raises ValueError."""
  labels, losses, top5_correct = np.asarray(labels), np.asarray(losses), np.asarray(top5_correct)
  cm = confusion_matrix(labels, predictions, len(class_names))
  if labels.size == 0:
    raise ValueError('Cannot report on an empty split.')
  if losses.shape != labels.shape or top5_correct.shape != labels.shape:
    raise ValueError(f'losses {losses.shape} and top5_correct {top5_correct.shape} must match '
                     f'labels {labels.shape}.')

  true_positives, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
  precision = _safe_divide(true_positives, predicted)
  recall = _safe_divide(true_positives, support)
  # support + predicted = 2TP + FN + FP, so this is the F1 formula sklearn uses.
  f1 = _safe_divide(2 * true_positives, support + predicted)

  per_class = [
      {'class': str(name), 'support': int(support[i]), 'accuracy': float(recall[i]),
       'precision': float(precision[i]), 'recall': float(recall[i]), 'f1': float(f1[i])}
      for i, name in enumerate(class_names)
  ]
  return {
      'num_examples': int(labels.size),
      'accuracy': float(true_positives.sum() / labels.size),
      'top5_accuracy': float(np.mean(top5_correct, dtype=np.float64)),
      'loss': float(np.mean(losses, dtype=np.float64)),
      'confusion_matrix': cm.tolist(),
      'per_class': per_class,
      'macro': {'precision': float(precision.mean()), 'recall': float(recall.mean()),
                'f1': float(f1.mean())},
  }


def final_report(config: ml_collections.ConfigDict, data: input_pipeline.Dataset, model: SEResNet,
                 variables: dict, step: int, progress: Progress, eval_step,
                 mesh: jax.sharding.Mesh,
                 compile_s: Optional[float] = None,
                 splits: Sequence[str] = ('validation', 'test')) -> dict:
  """Metrics of `variables` on `splits`, with timings: the report's content.

  `progress` is the run's as its checkpoint holds it, so a report of a restored checkpoint reads
  the same fields as the loop's.
  """
  result = {'config': config.to_dict(), 'dataset': data.name, 'class_names': list(data.class_names),
            'device': {'platform': jax.devices()[0].platform,
                       'kind': jax.devices()[0].device_kind, 'count': jax.device_count()},
            'epochs_completed': progress.epoch, 'best_epoch': progress.best_epoch, 'step': step}
  for name in splits:
    split = getattr(data, name)
    if split is None:
      continue
    chunks = shard_eval_split(split, mesh, config.eval_batch_size)
    _, (pred, in_top5, loss) = evaluate(eval_step, variables, chunks)
    result[name] = split_report(split.labels, pred, loss, in_top5, data.class_names)
  rows = progress.history
  timing = {'device_kind': jax.devices()[0].device_kind}
  if compile_s is not None:
    timing['compile_s'] = compile_s
  if rows:
    timed = rows[1:] or rows  # the first epoch includes warm-up
    timing['train_time_per_epoch_s'] = float(np.mean([r['epoch_time_s'] for r in timed]))
    timing['train_images_per_s'] = float(np.mean([r['train_images_per_s'] for r in timed]))
  if config.measure_inference:
    timing.update(measure_inference(model, variables, IMAGE_SHAPE, config.eval_batch_size))
  result['timing'] = timing
  if config.early_stopping.enabled:
    result['early_stopping'] = {'stopped_epoch': progress.stopped_epoch,
                                'best_epoch': progress.best_epoch,
                                'monitor': config.early_stopping.monitor,
                                'best_value': progress.monitor_best}
  return result


def _tick_fontsize(num_classes: int) -> float:
  """Tick label size that keeps 10 classes readable and 100 classes from overlapping."""
  return 10.0 if num_classes <= _MAX_ANNOTATED_CLASSES else max(5.0, 10.0 - num_classes / 30)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[Any], list[Any]]:
  """(epochs, values) of the history entries that have `key` (validation may be sparse)."""
  rows = [row for row in history if row.get(key) is not None]
  return [row['epoch'] for row in rows], [row[key] for row in rows]


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: str) -> None:
  """Loss and accuracy per epoch, train against validation, with markers: validation may be
  evaluated only every few epochs, and a 1-epoch run has one point, which a line would not show."""
  plt = pyplot()
  from matplotlib.ticker import MaxNLocator
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  train_epochs = _series(history, 'train_loss')[0]
  for ax, metric in zip(axes, ('loss', 'accuracy')):
    for prefix, label, style in (('train', 'train', 'o-' if len(train_epochs) <= 50 else '-'),
                                 ('val', 'validation', 'o-')):
      epochs, values = _series(history, f'{prefix}_{metric}')
      if epochs:
        ax.plot(epochs, values, style, label=label, markersize=4)
    ax.margins(y=0.1)
    ax.set(title=metric.capitalize(), xlabel='epoch', ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 0.96 or 1.02
    if len(set(train_epochs)) == 1:  # one epoch: a point, centred, not a 0.08-wide axis
      ax.set_xlim(train_epochs[0] - 1, train_epochs[0] + 1)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()
  save_figure(fig, path)


def plot_confusion_matrix(split: Mapping[str, Any], path: str, title: str) -> None:
  """A split's confusion matrix as a heat map, rows normalised so that cells compare across classes
  of different support; beyond 20 classes it grows instead of annotating the cells."""
  plt = pyplot()
  class_names = [entry['class'] for entry in split['per_class']]
  cm = np.asarray(split['confusion_matrix'], dtype=np.float64)
  num_classes = cm.shape[0]
  normalised = _safe_divide(cm, cm.sum(axis=1, keepdims=True))
  side = min(max(7.0, 0.16 * num_classes + 3.0), 24.0)
  fig, ax = plt.subplots(figsize=(side, side * 0.9))
  image = ax.imshow(normalised, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='fraction of true class')
  fontsize = _tick_fontsize(num_classes)
  ticks = np.arange(num_classes)
  ax.set_xticks(ticks, labels=class_names, rotation=90, fontsize=fontsize)
  ax.set_yticks(ticks, labels=class_names, fontsize=fontsize)
  ax.set(xlabel='predicted class', ylabel='true class', title=title)
  if num_classes <= _MAX_ANNOTATED_CLASSES:
    for (i, j), value in np.ndenumerate(normalised):
      ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=8,
              color='white' if value > 0.5 else 'black')
  fig.tight_layout()
  save_figure(fig, path)


def plot_per_class_accuracy(split: Mapping[str, Any], path: str, title: str) -> None:
  """A bar per class with its accuracy and the mean as a dashed line; the figure widens with the
  number of classes so 100 names stay legible."""
  plt = pyplot()
  names = [entry['class'] for entry in split['per_class']]
  accuracies = [entry['accuracy'] for entry in split['per_class']]
  num_classes = len(names)
  fig, ax = plt.subplots(figsize=(min(max(8.0, 0.2 * num_classes + 2.0), 30.0), 4.5))
  bars = ax.bar(np.arange(num_classes), accuracies, color='tab:blue')
  if num_classes <= _MAX_ANNOTATED_CLASSES:
    ax.bar_label(bars, fmt='%.2f', fontsize=8)
  mean = float(np.mean(accuracies))
  ax.axhline(mean, color='tab:red', linestyle='--', label=f'mean {mean:.3f}')
  ax.legend(loc='lower right')
  ax.set_xticks(np.arange(num_classes), labels=names, rotation=90,
                fontsize=_tick_fontsize(num_classes))
  ax.set(xlim=(-0.6, num_classes - 0.4), ylim=(0.0, 1.08), ylabel='accuracy', title=title)
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  save_figure(fig, path)


def _pct(value: float) -> str:
  return f'{100.0 * value:.2f}%'


def _fmt(value: Any, decimals: int = 2) -> str:
  """Numbers readable at a glance: thousands separators, fixed decimals."""
  if isinstance(value, (float, np.floating)):
    return f'{value:,.{decimals}f}'
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return f'{value:,}'
  return '-' if value is None else str(value)


def _split_section(title: str, split: Mapping[str, Any]) -> list[str]:
  """Per-class table and confusion matrix of one split."""
  names = [entry['class'] for entry in split['per_class']]
  lines = [f'## {title}: per class', '']
  rows = [[e['class'], f"{e['precision']:.4f}", f"{e['recall']:.4f}", f"{e['f1']:.4f}",
           _pct(e['accuracy']), e['support']] for e in split['per_class']]
  macro = split['macro']
  rows.append(['**macro**', f"{macro['precision']:.4f}", f"{macro['recall']:.4f}",
               f"{macro['f1']:.4f}", '', split['num_examples']])
  lines += markdown_table(['Class', 'Precision', 'Recall', 'F1', 'Accuracy', 'Support'], rows)
  lines += [f'## {title}: confusion matrix', '',
            'Rows are true classes, columns predicted classes (counts).', '']
  lines += markdown_table(['true \\ predicted', *names], [
      [f'**{name}**', *row] for name, row in zip(names, split['confusion_matrix'])])
  return lines


def stopped_by_max_steps(report: Mapping[str, Any]) -> bool:
  """Whether config.max_steps ended the training before its planned epochs."""
  training, max_steps = report.get('training'), report['config']['max_steps']
  return bool(training) and 0 < max_steps == training['steps'] < training['planned_steps']


def _epochs_line(report: Mapping[str, Any]) -> str:
  """Full epochs trained, of how many planned; a run stopped by max_steps says so."""
  training = report.get('training')  # an `evaluate` report has none
  if not training:
    return f"- Epochs completed: {report['epochs_completed']}"
  steps, per_epoch, planned = (training[k] for k in ('steps', 'steps_per_epoch', 'planned_steps'))
  full, rest = divmod(steps, per_epoch)
  line = f'- Epochs completed: {full} of {planned // per_epoch}'
  if rest:
    line += f', plus {rest:,} of the {per_epoch:,} steps of epoch {full + 1}'
  line += f' ({steps:,} steps'
  if stopped_by_max_steps(report):
    line += f", stopped by max_steps={report['config']['max_steps']}"
  return line + ')'


def write_markdown(report: Mapping[str, Any], path: str,
                   figures: Mapping[str, str] | None = None) -> None:
  """report.md, for people reading a run's workdir; `figures`: caption -> image path (relative to
  `path`) to embed. Parts a report lacks (a test split, timing, config, ...) are left out."""
  weights = report['weights']
  num_classes = len(report.get('class_names', ()))
  lines = ['# Evaluation report', '',
           f"- Dataset: {report['dataset']}" + (f' ({num_classes} classes)' if num_classes else ''),
           _epochs_line(report),
           f"- Weights reported: epoch {weights['epoch']} (step {weights['step']:,}, run "
           f"{weights['run_id']}), {weights['chosen_by']}"]
  if 'device' in report:
    lines.append('- Device: {count} x {kind} ({platform})'.format(**report['device']))
  if 'early_stopping' in report:
    stop = report['early_stopping']
    lines.append(f"- Early stopping: stopped at epoch {stop['stopped_epoch']}, best epoch "
                 f"{stop['best_epoch']} ({stop['monitor']} = {_fmt(stop['best_value'], 4)})")
  lines.append('')

  splits = [(name, report[name]) for name in _SPLITS if name in report]
  if splits:  # none in a run with evaluate_test=False and validation_size=0
    lines += ['## Results', '']
    lines += markdown_table(['Split', 'Examples', 'Accuracy', 'Top-5 accuracy', 'Loss'],
                            [[name, f"{s['num_examples']:,}", _pct(s['accuracy']),
                              _pct(s['top5_accuracy']), f"{s['loss']:.4f}"] for name, s in splits])
  if 'timing' in report:
    lines += ['## Timing', '']
    timing, labels = dict(report['timing']), dict(_TIMING_LABELS)
    batch = timing.pop('inference_batch_size', None)
    if batch is not None:
      labels['inference_images_per_s'] = f'Inference throughput, batch {batch:,} (images/s)'
    lines += markdown_table(['Measure', 'Value'], [[labels.get(k, k), _fmt(v)]
                                                   for k, v in timing.items()])
  if figures:
    lines += ['## Figures', '']
    for caption, image in figures.items():
      lines += [f'![{caption}]({image})', '']
  for name, split in splits:
    lines += _split_section(name.capitalize(), split)
  if 'config' in report:
    lines += ['## Config', '', '```json',
              json.dumps(files.to_jsonable(report['config']), indent=2), '```', '']
  files.write_text(path, lines)


def figures_in(directory: str) -> dict[str, str]:
  """Caption -> file name of the pictures in `directory`."""
  return {caption: name for name, caption in FIGURES.items()
          if os.path.exists(os.path.join(directory, name))}


def write_report(workdir: str, report: Mapping[str, Any],
                 history: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """Writes report.json (the report and `history`, one dict per epoch), report.md and the pictures
  (none without matplotlib; the matrix and per-class accuracy of the test split, else validation)
  into `workdir`; returns name ('json', 'markdown', 'curves', ...) -> path of what it wrote."""
  os.makedirs(workdir, exist_ok=True)
  paths = {}
  draw = files.drawing_available()
  if history and draw:
    paths['curves'] = os.path.join(workdir, 'curves.png')
    plot_learning_curves(history, paths['curves'])
  split_name = next((name for name in reversed(_SPLITS) if name in report), None)
  if split_name is not None and draw:
    for name, plot in (('confusion_matrix', plot_confusion_matrix),
                       ('per_class_accuracy', plot_per_class_accuracy)):
      paths[name] = os.path.join(workdir, f'{name}.png')
      plot(report[split_name], paths[name], f'{FIGURES[name + ".png"]} ({split_name})')
  paths['json'] = os.path.join(workdir, REPORT_JSON)
  files.write_json_atomic(paths['json'], {**report, 'history': list(history)})
  paths['markdown'] = os.path.join(workdir, 'report.md')
  write_markdown(report, paths['markdown'], figures=figures_in(workdir))
  return paths
