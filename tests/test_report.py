"""Tests for the evaluation report: metrics, files and their contents."""

import json
import os

import numpy as np
import pytest

from se_resnet_jax import files, report

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PICTURES = ('curves.png', 'confusion_matrix.png', 'per_class_accuracy.png')
# What train.py and evaluate.py write into every report.
RUN = {'weights': {'epoch': 1, 'step': 30, 'run_id': 'run0', 'chosen_by': 'the last epoch'},
       'run_id': 'run0', 'epochs_completed': 1}


def _split_arrays(num_classes: int, num_examples: int, seed: int = 0):
  """Random labels with ~70% correct predictions, losses and top-5 hits."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_examples)
  predictions = np.where(rng.random(num_examples) < 0.7, labels,
                         rng.integers(0, num_classes, num_examples))
  losses = rng.random(num_examples)
  top5 = (predictions == labels) | (rng.random(num_examples) < 0.5)
  return labels, predictions, losses, top5


def _assert_png(path: str, min_width: int = 300) -> tuple[int, int]:
  import matplotlib.image

  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  height, width = matplotlib.image.imread(path).shape[:2]
  assert width >= min_width and height >= 200
  return width, height


def test_confusion_matrix_matches_hand_counted_matrix():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  predictions = np.array([0, 1, 0, 1, 1, 2, 0, 2, 1])
  expected = np.array([
      [2, 1, 0, 0],
      [0, 2, 0, 0],
      [1, 1, 2, 0],
      [0, 0, 0, 0],  # Class 3: never present, never predicted.
  ])
  cm = report.confusion_matrix(labels, predictions, num_classes=4)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, expected)


@pytest.mark.parametrize('labels, predictions', [
    ([0, 3], [0, 1]),  # Label out of range.
    ([0, 1], [0, -1]),  # Negative prediction.
    ([0, 1, 2], [0, 1]),  # Length mismatch.
])
def test_confusion_matrix_rejects_bad_input(labels, predictions):
  with pytest.raises(ValueError):
    report.confusion_matrix(np.array(labels), np.array(predictions), num_classes=3)


def test_split_report_agrees_with_sklearn():
  metrics = pytest.importorskip('sklearn.metrics')
  names = ['airplane', 'bird', 'cat', 'deer', 'frog']
  # cat (2): predicted but never present; deer (3): present, never predicted;
  # frog (4): neither present nor predicted.
  labels = np.array([0, 0, 0, 1, 1, 1, 3, 3, 0, 1])
  predictions = np.array([0, 1, 0, 1, 1, 2, 0, 1, 0, 2])
  losses = np.linspace(0.1, 1.0, 10)
  top5 = np.array([1, 1, 1, 1, 1, 0, 1, 0, 1, 1], dtype=bool)

  result = report.split_report(labels, predictions, losses, top5, names)

  assert result['num_examples'] == 10
  assert result['accuracy'] == pytest.approx(0.5)
  assert result['top5_accuracy'] == pytest.approx(0.8)
  assert result['loss'] == pytest.approx(0.55)
  assert result['confusion_matrix'] == report.confusion_matrix(labels, predictions, 5).tolist()
  all_classes = list(range(len(names)))
  precision, recall, f1, support = metrics.precision_recall_fscore_support(
      labels, predictions, labels=all_classes, average=None, zero_division=0)
  per_class = result['per_class']
  assert [c['class'] for c in per_class] == names
  np.testing.assert_allclose([c['precision'] for c in per_class], precision, atol=1e-6)
  np.testing.assert_allclose([c['recall'] for c in per_class], recall, atol=1e-6)
  np.testing.assert_allclose([c['accuracy'] for c in per_class], recall, atol=1e-6)
  np.testing.assert_allclose([c['f1'] for c in per_class], f1, atol=1e-6)
  assert [c['support'] for c in per_class] == support.tolist()
  macro = metrics.precision_recall_fscore_support(
      labels, predictions, labels=all_classes, average='macro', zero_division=0)
  np.testing.assert_allclose(
      [result['macro'][k] for k in ('precision', 'recall', 'f1')], macro[:3], atol=1e-6)
  frog = per_class[4]
  assert (frog['support'], frog['precision'], frog['recall'], frog['f1']) == (0, 0.0, 0.0, 0.0)
  # Plain Python types only, so the trainer can json.dump it as is.
  assert json.loads(json.dumps(result)) == result


def test_split_report_rejects_empty_and_mismatched_splits():
  empty = np.array([], dtype=np.int64)
  with pytest.raises(ValueError):
    report.split_report(empty, empty, np.array([]), np.array([], dtype=bool), ['a', 'b'])
  with pytest.raises(ValueError):
    report.split_report(np.array([0, 1]), np.array([0, 1]), np.array([0.5]),
                        np.array([True, True]), ['a', 'b'])


def test_write_report_writes_complete_report(tmp_path):
  names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
           'truck']
  full_report = {
      'config': {'model': 'SEResNet18', 'optimizer': {'name': 'sgd', 'learning_rate': 0.1}},
      'dataset': 'cifar10',
      'class_names': names,
      'device': {'platform': 'gpu', 'kind': 'NVIDIA H200', 'count': 1},
      'validation': report.split_report(*_split_arrays(10, 200, seed=1), names),
      'test': report.split_report(*_split_arrays(10, 300, seed=2), names),
      'timing': {'train_time_per_epoch_s': 12.5, 'train_images_per_s': 4000.0,
                 'inference_images_per_s': 20000.0, 'inference_latency_ms_batch1': 1.7,
                 'compile_s': 30.2, 'device_kind': 'NVIDIA H200'},
      'early_stopping': {'stopped_epoch': 4, 'best_epoch': 2, 'monitor': 'val_accuracy',
                         'best_value': 0.75},
      **RUN, 'epochs_completed': 4,
  }
  history = [
      {'epoch': 1, 'train_loss': 2.0, 'train_accuracy': 0.3, 'val_loss': 1.8,
       'val_accuracy': 0.4},
      {'epoch': 2, 'train_loss': 1.5, 'train_accuracy': 0.5},  # No validation this epoch.
      {'epoch': 3, 'train_loss': 1.2, 'train_accuracy': 0.6, 'val_loss': 1.3,
       'val_accuracy': 0.55},
      {'epoch': 4, 'train_loss': 1.0, 'train_accuracy': 0.7},
  ]

  paths = report.write_report(str(tmp_path), full_report, history)

  assert set(paths) == {'json', 'markdown', 'curves', 'confusion_matrix', 'per_class_accuracy'}
  # Exactly the report files: no temporary files left behind.
  assert sorted(os.listdir(tmp_path)) == sorted(['report.json', 'report.md', *PICTURES])
  for name in PICTURES:
    _assert_png(str(tmp_path / name))
  with open(paths['json']) as f:
    assert json.load(f) == {**full_report, 'history': history}
  assert 'history' not in full_report  # The caller's dict is not modified.
  markdown = (tmp_path / 'report.md').read_text()
  for name in names:
    assert name in markdown
  for text in ('cifar10', 'Top-5', 'macro', 'Early stopping', 'best epoch 2', 'Timing',
               'Inference latency', 'confusion matrix', '```json', '"learning_rate": 0.1',
               '![Learning curves](curves.png)'):
    assert text in markdown, text
  test_cm_row = '| **cat** | ' + ' | '.join(map(str, full_report['test']['confusion_matrix'][3]))
  assert test_cm_row in markdown


def test_write_report_for_100_class_checkpoint_without_history(tmp_path):
  # What `evaluate` of a bare checkpoint passes: validation only, no history, no extras.
  names = [f'class_{i:03d}' for i in range(100)]
  minimal_report = {
      **RUN, 'dataset': 'cifar100',
      'class_names': names,
      'validation': report.split_report(*_split_arrays(100, 300), names),
  }

  paths = report.write_report(str(tmp_path / 'run'), minimal_report, history=[])

  assert set(paths) == {'json', 'markdown', 'confusion_matrix', 'per_class_accuracy'}
  cm_width, _ = _assert_png(paths['confusion_matrix'], min_width=1000)
  bars_width, _ = _assert_png(paths['per_class_accuracy'], min_width=1000)
  markdown = (tmp_path / 'run' / 'report.md').read_text()
  for name in names:
    assert f'| **{name}** |' in markdown  # A confusion-matrix row per class.
    assert f'| {name} |' in markdown  # A per-class table row per class.
  assert 'Timing' not in markdown and 'Config' not in markdown
  with open(paths['json']) as f:
    assert json.load(f)['history'] == []


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
  path = tmp_path / 'report.md'
  path.write_text('previous report\n')

  def fail(*args):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError):
    report.write_markdown({**RUN, 'dataset': 'cifar10'}, str(path))
  assert path.read_text() == 'previous report\n'
  assert os.listdir(tmp_path) == ['report.md']


def test_markdown_says_which_weights_how_far_the_run_got_and_names_every_timing(tmp_path):
  path = tmp_path / 'report.md'
  report.write_markdown({
      **RUN, 'dataset': 'cifar10', 'config': {'max_steps': 30},
      'training': {'steps': 30, 'steps_per_epoch': 351, 'planned_steps': 351},
      'timing': {'inference_images_per_s': 2000.0, 'inference_batch_size': 1000}}, str(path))
  markdown = path.read_text()
  assert ('- Epochs completed: 0 of 1, plus 30 of the 351 steps of epoch 1 (30 steps, stopped by '
          'max_steps=30)') in markdown
  assert '- Weights reported: epoch 1 (step 30, run run0), the last epoch' in markdown
  assert '| Inference throughput, batch 1,000 (images/s) | 2,000.00 |' in markdown
  assert 'inference_batch_size' not in markdown.split('## Config')[0]


def test_one_epoch_curves_show_a_marked_point_on_an_integer_epoch_axis(tmp_path, monkeypatch):
  drawn = []
  monkeypatch.setattr(report, 'save_figure', lambda fig, path: drawn.append(fig))
  report.plot_learning_curves([{'epoch': 1, 'train_loss': 2.0, 'train_accuracy': 0.3,
                                'val_loss': 1.9, 'val_accuracy': 0.35}], str(tmp_path / 'c.png'))
  for ax in drawn[0].axes:
    assert all(line.get_marker() not in ('None', '', None) for line in ax.lines)
    assert ax.get_xlim() == (0.0, 2.0)
    assert all(float(t).is_integer() for t in ax.get_xticks())
  files.pyplot().close(drawn[0])
