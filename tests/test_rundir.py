"""A run describes itself (issue 21): its record holds what restoring needs, so a run trained from
an .npz exports, predicts and shows its report after the .npz has moved away."""

import json
import os
import shutil

import numpy as np
import pytest

from se_resnet_jax import export, input_pipeline, predict, rundir, summary, train
from se_resnet_jax.evaluate import evaluate_checkpoint


@pytest.fixture
def moved_data(tiny_run_result, tmp_path):
  """The tiny run's .npz moved elsewhere for the test, then put back."""
  npz = tiny_run_result.config.npz_path
  moved = tmp_path / 'moved.npz'
  shutil.move(npz, moved)
  yield str(moved)
  shutil.move(moved, npz)


def test_a_run_whose_npz_moved_exports_predicts_and_reports(tiny_run_result, moved_data,
                                                             tmp_path):
  workdir, config = tiny_run_result.workdir, tiny_run_result.config
  assert not os.path.exists(config.npz_path)
  with open(os.path.join(workdir, 'run.json')) as f:
    record = json.load(f)
  assert record['class_names'] == [f'class_{i}' for i in range(10)]
  assert record['data']['npz_path'] == config.npz_path

  card = export.export_run(workdir, 'jax', str(tmp_path / 'm.jax'))
  assert card['check']['passed'] and card['class_names'] == record['class_names']
  assert card['preprocessing']['mean'] == record['mean']

  predict_fn, names, _, weights = predict.load_run(workdir, 'best', None)
  images = np.random.RandomState(0).randint(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  probabilities = predict.predict_probabilities(predict_fn, images)
  assert probabilities.shape == (3, 10) and names == record['class_names']
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
  assert weights['run_id'] == record['run_id']

  reported = train.train_and_evaluate(config, workdir)  # finished: answered from its report
  with open(os.path.join(workdir, 'report.json')) as f:
    assert reported == json.load(f)
  assert summary.closing_summary(workdir, reported) == tiny_run_result.command.stdout.strip()


def test_a_workdir_without_a_record_is_refused(tmp_path):
  with pytest.raises(rundir.RunRecordError) as error:
    rundir.restore_run(str(tmp_path))
  assert error.value.path == str(tmp_path / 'run.json')
  (tmp_path / 'run.json').write_text('{"run_id": 3')
  with pytest.raises(rundir.RunRecordError):
    rundir.restore_run(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['run.json']  # nothing written


def test_evaluating_the_test_split_reads_only_the_test_split(tiny_run, tmp_path, monkeypatch):
  read = []
  validate_split = input_pipeline.validate_split

  def spy(images, labels, num_classes, source, split):
    read.append(split)
    return validate_split(images, labels, num_classes, source, split)

  monkeypatch.setattr(input_pipeline, 'validate_split', spy)
  result = evaluate_checkpoint(tiny_run, split='test', output_dir=str(tmp_path / 'out'))
  assert read == ['test']
  with open(os.path.join(tiny_run, 'report.json')) as f:
    trained = json.load(f)
  # The same weights on the same images, scaled by the run's recorded constants.
  assert result['test']['accuracy'] == trained['test']['accuracy']
  assert result['test']['loss'] == pytest.approx(trained['test']['loss'], rel=1e-6)
