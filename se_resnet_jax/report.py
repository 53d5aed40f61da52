"""Evaluation reports written into a run's workdir.

After every training run, and from the `evaluate` command for any checkpoint,
the library leaves a self-contained report next to the checkpoints so a run can
be judged without re-running anything: `report.json` for machines,
`report.md` for people, and three pictures (learning curves, confusion matrix,
per-class accuracy).

The trainer computes on the accelerator, per example, the top-1 prediction,
whether the label is in the top 5 and the loss, and hands those over as numpy
arrays. Everything here is plain host-side numpy, so the metrics need neither
TensorFlow nor scikit-learn (whose conventions they follow: see
`split_report`). matplotlib is imported only when a picture is drawn, so
importing this module stays cheap.

Every file is written atomically (see `files`), so a run killed mid-write
leaves the previous report intact rather than a truncated `report.json`.
"""

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from se_resnet_jax.files import (
    drawing_available,
    markdown_table,
    pyplot,
    save_figure,
    to_jsonable,
    write_json_atomic,
    write_text,
)

# Splits a report may hold, in the order they are rendered.
_SPLITS = ('validation', 'test')

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
  """Counts (true class, predicted class) pairs.

  Args:
    labels: int array (N,) of true classes in [0, num_classes).
    predictions: int array (N,) of top-1 predicted classes in [0, num_classes).
    num_classes: size of the class set; classes absent from both arrays still
      get a (zero) row and column, so matrices of different splits line up.

  Returns:
    int64 array (num_classes, num_classes): rows are true classes, columns
    predicted classes (the sklearn convention).

  Raises:
    ValueError: on mismatched shapes or a class index out of range, which
      would otherwise be silently dropped or miscounted by the bincount.
  """
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  if num_classes < 1:
    raise ValueError(f'num_classes must be positive, got {num_classes}.')
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
  return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                   where=denominator > 0)


def split_report(labels: np.ndarray, predictions: np.ndarray, losses: np.ndarray,
                 top5_correct: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
  """Summarises one evaluated split as a JSON-serialisable dict.

  Precision, recall and F1 match sklearn's `precision_recall_fscore_support`
  with `zero_division=0` and `labels=range(len(class_names))`: a class that is
  never predicted has precision 0, one with no support has recall 0, and F1 is
  2TP / (2TP + FP + FN). The macro average is taken over *all* classes of
  `class_names` (not only those present), so it is the plain mean of the
  per-class table and comparable across splits and checkpoints.

  Args:
    labels: int array (N,) of true classes.
    predictions: int array (N,) of top-1 predictions.
    losses: float array (N,) of per-example losses.
    top5_correct: bool array (N,), whether the label is among the top 5.
    class_names: names of the classes, indexed by class id.

  Returns:
    {"num_examples", "accuracy", "top5_accuracy", "loss", "confusion_matrix",
     "per_class": [{"class", "support", "accuracy", "precision", "recall",
     "f1"}, ...], "macro": {"precision", "recall", "f1"}}. A class's accuracy
    is its recall (the fraction of its examples classified correctly).

  Raises:
    ValueError: for an empty split or arrays of different lengths, where the
      report would otherwise hold NaNs or misaligned numbers.
  """
  labels = np.asarray(labels)
  losses = np.asarray(losses)
  top5_correct = np.asarray(top5_correct)
  cm = confusion_matrix(labels, predictions, len(class_names))
  if labels.size == 0:
    raise ValueError('Cannot report on an empty split.')
  if losses.shape != labels.shape or top5_correct.shape != labels.shape:
    raise ValueError(f'losses {losses.shape} and top5_correct {top5_correct.shape} must match '
                     f'labels {labels.shape}.')

  true_positives = np.diag(cm)
  support = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
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


def _tick_fontsize(num_classes: int) -> float:
  """Tick label size that keeps 10 classes readable and 100 classes from overlapping."""
  return 10.0 if num_classes <= _MAX_ANNOTATED_CLASSES else max(5.0, 10.0 - num_classes / 30)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[Any], list[Any]]:
  """(epochs, values) of the history entries that have `key` (validation may be sparse)."""
  epochs, values = [], []
  for i, entry in enumerate(history):
    if entry.get(key) is not None:
      epochs.append(entry.get('epoch', i + 1))
      values.append(entry[key])
  return epochs, values


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: str) -> None:
  """Plots loss and accuracy per epoch, train vs validation, side by side.

  Validation is drawn with markers because it may be evaluated only every few
  epochs (or missing for some); a lone point would be invisible as a line. Train
  has markers too unless there are many epochs, so a 1-epoch run shows its point.
  The epoch axis has integer ticks.

  Args:
    history: one dict per epoch with "epoch", "train_loss", "train_accuracy"
      and optionally "val_loss", "val_accuracy".
    path: PNG file to write.
  """
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
    ax.set_title(metric.capitalize())
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 0.96 or 1.02
    if len(set(train_epochs)) == 1:  # one epoch: a point, centred, not a 0.08-wide axis
      ax.set_xlim(train_epochs[0] - 1, train_epochs[0] + 1)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()
  save_figure(fig, path)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str,
                          title: str = 'Confusion matrix') -> None:
  """Draws the row-normalised confusion matrix as a heat map.

  Rows are normalised so each cell reads as "fraction of class i predicted as
  j", which stays comparable across classes of different support. Classes with
  no examples get an all-zero row. Values are written into the cells only for
  up to 20 classes; beyond that the figure grows and the fonts shrink instead.

  Args:
    cm: (C, C) counts, rows true class, columns predicted class.
    class_names: C names for both axes.
    path: PNG file to write.
    title: figure title, e.g. naming the split.
  """
  plt = pyplot()
  cm = np.asarray(cm, dtype=np.float64)
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
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title)
  if num_classes <= _MAX_ANNOTATED_CLASSES:
    for i in range(num_classes):
      for j in range(num_classes):
        value = normalised[i, j]
        ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=8,
                color='white' if value > 0.5 else 'black')
  fig.tight_layout()
  save_figure(fig, path)


def plot_per_class_accuracy(per_class: Sequence[Mapping[str, Any]], path: str,
                            title: str = 'Per-class accuracy') -> None:
  """Draws one bar per class with its accuracy, plus the mean as a dashed line.

  The figure widens with the number of classes so 100 names stay legible.

  Args:
    per_class: `split_report(...)["per_class"]`.
    path: PNG file to write.
    title: figure title, e.g. naming the split.
  """
  plt = pyplot()
  names = [entry['class'] for entry in per_class]
  accuracies = [entry['accuracy'] for entry in per_class]
  num_classes = len(names)
  fig, ax = plt.subplots(figsize=(min(max(8.0, 0.2 * num_classes + 2.0), 30.0), 4.5))
  bars = ax.bar(np.arange(num_classes), accuracies, color='tab:blue')
  if num_classes <= _MAX_ANNOTATED_CLASSES:
    ax.bar_label(bars, fmt='%.2f', fontsize=8)
  if accuracies:
    ax.axhline(float(np.mean(accuracies)), color='tab:red', linestyle='--',
               label=f'mean {np.mean(accuracies):.3f}')
    ax.legend(loc='lower right')
  ax.set_xticks(np.arange(num_classes), labels=names, rotation=90,
                fontsize=_tick_fontsize(num_classes))
  ax.set_xlim(-0.6, num_classes - 0.4)
  ax.set_ylim(0.0, 1.08)
  ax.set_ylabel('accuracy')
  ax.set_title(title)
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  save_figure(fig, path)


def _pct(value: float) -> str:
  return f'{100.0 * value:.2f}%'


def _fmt(value: Any, decimals: int = 2) -> str:
  """Numbers readable at a glance: thousands separators, fixed decimals."""
  if value is None:
    return '-'
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    return str(value)
  if isinstance(value, (int, np.integer)):
    return f'{value:,}'
  return f'{value:,.{decimals}f}'


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
  lines += markdown_table(['true \\ predicted', *names],
                     [[f'**{name}**', *row] for name, row in zip(names, split['confusion_matrix'])])
  return lines


def _epochs_line(report: Mapping[str, Any]) -> str:
  """Full epochs trained, of how many planned; a run stopped by max_steps says so."""
  training = report.get('training')
  if not training:
    return f"- Epochs completed: {report['epochs_completed']}"
  steps, per_epoch, planned = (training[k] for k in ('steps', 'steps_per_epoch', 'planned_steps'))
  full, rest = divmod(steps, per_epoch)
  line = f'- Epochs completed: {full} of {planned // per_epoch}'
  if rest:
    line += f', plus {rest:,} of the {per_epoch:,} steps of epoch {full + 1}'
  line += f' ({steps:,} steps'
  max_steps = report.get('config', {}).get('max_steps', -1)
  if steps < planned and max_steps > 0 and steps == max_steps:
    line += f', stopped by max_steps={max_steps}'
  return line + ')'


def write_markdown(report: Mapping[str, Any], path: str,
                   figures: Mapping[str, str] | None = None) -> None:
  """Renders the report as Markdown for people reading a run's workdir.

  Optional parts (test split, timing, early stopping, config, device) are
  skipped when absent, so the same function serves training runs and
  `evaluate` of a bare checkpoint.

  Args:
    report: the report dict described in `write_report`.
    path: Markdown file to write.
    figures: optional caption -> image path (relative to `path`) to embed.
  """
  lines = ['# Evaluation report', '']
  if 'dataset' in report:
    num_classes = len(report.get('class_names', ()))
    lines.append(f"- Dataset: {report['dataset']}"
                 + (f' ({num_classes} classes)' if num_classes else ''))
  if 'epochs_completed' in report:
    lines.append(_epochs_line(report))
  if 'weights' in report:
    weights = report['weights']
    run_id = weights.get('run_id') or report.get('run_id')
    lines.append(f"- Weights reported: epoch {weights['epoch']} (step {weights['step']:,}"
                 f"{f', run {run_id}' if run_id else ''}), {weights['chosen_by']}")
  if 'device' in report:
    device = report['device']
    lines.append(f"- Device: {device.get('count', '?')} x {device.get('kind', '?')} "
                 f"({device.get('platform', '?')})")
  if 'early_stopping' in report:
    stop = report['early_stopping']
    lines.append(f"- Early stopping: stopped at epoch {stop.get('stopped_epoch', '?')}, "
                 f"best epoch {stop.get('best_epoch', '?')} "
                 f"({stop.get('monitor', '?')} = {_fmt(stop.get('best_value'), decimals=4)})")
  lines.append('')

  splits = [(name, report[name]) for name in _SPLITS if name in report]
  if splits:
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
              json.dumps(to_jsonable(report['config']), indent=2), '```', '']

  write_text(path, lines)


def write_report(workdir: str, report: Mapping[str, Any],
                 history: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """Writes the full evaluation report of a run into `workdir`.

  Files: report.json (the report plus "history"), report.md, curves.png (only
  when there is a history; `evaluate` of a checkpoint may have none), and
  confusion_matrix.png / per_class_accuracy.png of the test split, or of the
  validation split when there is no test split. Each file is replaced
  atomically, so a killed process never leaves a half-written one.

  Args:
    workdir: run directory; created if missing.
    report: {"config", "dataset", "class_names", "device", "validation",
      "test" (optional), "timing" (optional), "early_stopping" (optional),
      "epochs_completed"}, splits as returned by `split_report`.
    history: one dict per epoch, see `plot_learning_curves`.

  Returns:
    Name ("json", "markdown", "curves", "confusion_matrix",
    "per_class_accuracy") -> path, for the files actually written.
  """
  os.makedirs(workdir, exist_ok=True)
  paths = {}
  draw = drawing_available()
  if history and draw:
    paths['curves'] = os.path.join(workdir, 'curves.png')
    plot_learning_curves(history, paths['curves'])
  split_name = next((name for name in reversed(_SPLITS) if name in report), None)
  if split_name is not None and draw:
    split = report[split_name]
    names = [entry['class'] for entry in split['per_class']]
    paths['confusion_matrix'] = os.path.join(workdir, 'confusion_matrix.png')
    plot_confusion_matrix(np.asarray(split['confusion_matrix']), names,
                          paths['confusion_matrix'], title=f'Confusion matrix ({split_name})')
    paths['per_class_accuracy'] = os.path.join(workdir, 'per_class_accuracy.png')
    plot_per_class_accuracy(split['per_class'], paths['per_class_accuracy'],
                            title=f'Per-class accuracy ({split_name})')

  paths['json'] = os.path.join(workdir, 'report.json')
  write_json_atomic(paths['json'], {**report, 'history': list(history)})

  captions = {'curves': 'Learning curves', 'confusion_matrix': 'Confusion matrix',
              'per_class_accuracy': 'Per-class accuracy'}
  paths['markdown'] = os.path.join(workdir, 'report.md')
  write_markdown(report, paths['markdown'],
                 figures={captions[k]: os.path.basename(p) for k, p in paths.items()
                          if k in captions})
  return paths
