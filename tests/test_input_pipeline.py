"""Splits and loading: stratified holdout and folds, generated data, tfds CIFAR via mock data,
and the validation every source goes through."""

import os

import numpy as np
import pytest

from se_resnet_jax import config as config_lib
from se_resnet_jax import input_pipeline
from se_resnet_jax.input_pipeline import (
  DatasetUnavailableError,
  stratified_folds,
  stratified_holdout,
)


def _imbalanced_labels(seed=0):
  """1,000 labels over 4 classes in proportions 50/25/15/10%, shuffled."""
  labels = np.repeat(np.arange(4), [500, 250, 150, 100])
  return np.random.RandomState(seed).permutation(labels)


def test_stratified_holdout_keeps_class_proportions():
  labels = _imbalanced_labels()
  keep, held = stratified_holdout(labels, 200, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[held]), [100, 50, 30, 20])
  np.testing.assert_array_equal(np.bincount(labels[keep]), [400, 200, 120, 80])


def test_stratified_holdout_quota_rounding_still_gives_exact_size():
  labels = _imbalanced_labels()
  _, held = stratified_holdout(labels, 7, seed=0)  # 3.5 / 1.75 / 1.05 / 0.7 per class
  assert len(held) == 7
  assert np.all(np.abs(np.bincount(labels[held], minlength=4) - [3.5, 1.75, 1.05, 0.7]) < 1)


@pytest.mark.parametrize('stratified', [True, False])
def test_holdout_is_a_disjoint_seeded_partition(stratified):
  labels = _imbalanced_labels()
  keep, held = stratified_holdout(labels, 150, seed=3, stratified=stratified)
  assert len(held) == 150 and len(keep) == 850
  assert not np.intersect1d(keep, held).size
  np.testing.assert_array_equal(np.union1d(keep, held), np.arange(1000))
  again = stratified_holdout(labels, 150, seed=3, stratified=stratified)
  np.testing.assert_array_equal(again[1], held)
  other = stratified_holdout(labels, 150, seed=4, stratified=stratified)
  assert not np.array_equal(other[1], held)


def test_stratified_folds_are_disjoint_balanced_and_cover_everything():
  labels = _imbalanced_labels()
  folds = stratified_folds(labels, 5, seed=0)
  assert len(folds) == 5
  everything = np.concatenate(folds)
  np.testing.assert_array_equal(np.sort(everything), np.arange(1000))  # each index exactly once
  for fold in folds:
    np.testing.assert_array_equal(np.bincount(labels[fold]), [100, 50, 30, 20])
  np.testing.assert_array_equal(stratified_folds(labels, 5, seed=0)[2], folds[2])
  assert not np.array_equal(stratified_folds(labels, 5, seed=1)[2], folds[2])


def _config(**changes):
  config = config_lib.base_config()
  for key, value in changes.items():
    config[key] = value
  return config


def test_synthetic_data_is_uint8_with_labels_in_range():
  config = _config(dataset='synthetic', validation_size=100)
  config.synthetic.num_classes = 7
  config.synthetic.num_train, config.synthetic.num_test = 400, 150
  data = input_pipeline.load_dataset(config)
  assert data.num_classes == 7
  for split, n in ((data.train, 300), (data.validation, 100), (data.test, 150)):
    assert split.images.dtype == np.uint8 and split.images.shape == (n, 32, 32, 3)
    assert split.labels.min() >= 0 and split.labels.max() < 7
  assert len(np.unique(data.train.labels)) == 7
  assert 0.2 < np.mean(data.mean) < 0.8 and 0.1 < np.mean(data.std) < 0.5
  # the normalisation statistics are the training split's own, per channel
  np.testing.assert_allclose(data.mean, data.train.images.reshape(-1, 3).mean(0) / 255, rtol=1e-6)
  np.testing.assert_allclose(data.std, data.train.images.reshape(-1, 3).std(0) / 255, rtol=1e-5)


def test_synthetic_data_is_reproducible_from_its_seed():
  config = _config(dataset='synthetic', validation_size=0)
  config.synthetic.num_train, config.synthetic.num_test = 50, 20
  a, b = input_pipeline.load_dataset(config), input_pipeline.load_dataset(config)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  config.synthetic.seed = 1
  assert not np.array_equal(input_pipeline.load_dataset(config).train.images, a.train.images)


@pytest.mark.parametrize('dataset, label_key, num_classes', [
  ('cifar10', 'label', 10), ('cifar100', 'label', 100), ('cifar100', 'coarse_label', 20)])
def test_tfds_cifar_through_mock_data(dataset, label_key, num_classes, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _config(dataset=dataset, label_key=label_key, validation_size=40)
  # mock_data fakes the records but not the prepared directory: say it is there, as for a user
  # whose TFDS_DATA_DIR holds the dataset (otherwise the loader would try to download it).
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  with tfds.testing.mock_data(num_examples=240):
    data = input_pipeline.load_dataset(config)
  assert data.num_classes == num_classes
  assert len(data.class_names) == num_classes
  for split, n in ((data.train, 200), (data.validation, 40), (data.test, 240)):
    assert split.images.dtype == np.uint8 and split.images.shape == (n, 32, 32, 3)
    assert split.labels.dtype == np.int32
    assert 0 <= split.labels.min() and split.labels.max() < num_classes
  if num_classes <= 20:  # random mock labels: 200 draws hit every one of 10 or 20 classes
    assert len(np.unique(data.train.labels)) == num_classes


def test_missing_dataset_without_download_says_where_to_put_it(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  config = _config(dataset='cifar10', data_dir=str(tmp_path), download=False)
  with pytest.raises(DatasetUnavailableError) as error:
    input_pipeline.load_dataset(config)
  assert (error.value.dataset, error.value.location, error.value.reason) == (
      'cifar10', str(tmp_path), 'not_prepared')
  assert not any(tmp_path.iterdir()), 'a failed load must not leave files behind'


def test_npz_arrays_load_without_tfds(tmp_path):
  rs = np.random.RandomState(0)
  path = tmp_path / 'cifar.npz'
  np.savez(path, x_train=rs.randint(0, 256, (60, 32, 32, 3)).astype(np.uint8),
           y_train=np.arange(60) % 10, x_test=np.zeros((20, 32, 32, 3), np.uint8),
           y_test=np.arange(20) % 10)
  data = input_pipeline.load_dataset(_config(dataset='cifar10', npz_path=str(path),
                                             validation_size=10))
  assert (len(data.train), len(data.validation), len(data.test)) == (50, 10, 20)
  assert data.class_names[9] == 'truck' and data.train.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(data.validation.labels), np.ones(10))


def test_validation_larger_than_train_is_refused():
  config = _config(dataset='synthetic', validation_size=100)
  config.synthetic.num_train = 100
  with pytest.raises(input_pipeline.InvalidDataError) as error:
    input_pipeline.load_dataset(config)
  assert error.value.reason == 'no_training_data'
  assert error.value.details == {'validation_size': 100, 'train_size': 100}


def _arrays(**changes) -> dict:
  """Valid CIFAR-10-shaped arrays (60 train, 20 test), with `changes` applied."""
  rs = np.random.RandomState(0)
  arrays = dict(x_train=rs.randint(0, 256, (60, 32, 32, 3)).astype(np.uint8),
                y_train=np.arange(60) % 10,
                x_test=rs.randint(0, 256, (20, 32, 32, 3)).astype(np.uint8),
                y_test=np.arange(20) % 10)
  arrays.update(changes)
  return {k: v for k, v in arrays.items() if v is not None}


def _float_images():
  return np.random.RandomState(0).uniform(0, 1, (60, 32, 32, 3)).astype(np.float32)


def _nan_images():
  x = _float_images()
  x[3, 4, 5, 0] = np.nan
  return x


def _truncated(path):
  np.savez(path, **_arrays())
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)


def _single_array(path):
  with open(path, 'wb') as f:
    np.save(f, _arrays()['x_train'])


def _savez_fix(path):
  return f'np.savez({path!r}, x_train=..., y_train=..., x_test=..., y_test=...)'


# (id, how to make the file: arrays for np.savez or a function of the path, the array at fault,
# the reason, the details the error must carry: a value, or a function of the path)
BAD_NPZ = [
    ('NCHW images', _arrays(x_train=np.zeros((60, 3, 32, 32), np.uint8)), 'x_train',
     'channels_first', {'shape': (60, 3, 32, 32), 'fix': 'np.transpose(x_train, (0, 2, 3, 1))'}),
    ('float images in [0, 1]', _arrays(x_train=_float_images()), 'x_train', 'dtype',
     {'dtype': 'float32', 'fix': '(x_train * 255).round().astype(np.uint8)'}),
    ('float images in [0, 255]', _arrays(x_train=_float_images() * 255), 'x_train', 'dtype',
     {'dtype': 'float32', 'fix': 'x_train.round().astype(np.uint8)'}),
    ('NaN images', _arrays(x_train=_nan_images()), 'x_train', 'not_finite', {'dtype': 'float32'}),
    ('label 10 of 10 classes', _arrays(y_train=np.r_[np.arange(59) % 10, 10]), 'y_train',
     'labels_range', {'label': 10, 'index': 59, 'outside': 1, 'num_classes': 10}),
    ('label -1', _arrays(y_test=np.r_[-1, np.arange(19) % 10]), 'y_test', 'labels_range',
     {'label': -1, 'index': 0, 'outside': 1, 'num_classes': 10}),
    ('fewer labels than images', _arrays(y_train=np.arange(59) % 10), 'y_train',
     'count_mismatch', {'images': 60, 'labels': 59}),
    ('grayscale 28x28', _arrays(x_train=np.zeros((60, 28, 28), np.uint8)), 'x_train', 'shape',
     {'shape': (60, 28, 28)}),
    ('one-hot labels', _arrays(y_train=np.eye(10)[np.arange(60) % 10]), 'y_train', 'shape',
     {'shape': (60, 10), 'fix': 'y_train.argmax(1)'}),
    ('float labels', _arrays(y_train=(np.arange(60) % 10).astype(np.float32)), 'y_train', 'dtype',
     {'dtype': 'float32', 'fix': 'y_train.astype(np.int64)'}),
    ('empty test split', _arrays(x_test=np.zeros((0, 32, 32, 3), np.uint8),
                                 y_test=np.zeros(0, np.int64)), 'x_test', 'empty', {}),
    ('wrong keys', _arrays(x_test=None, y_test=None, x_val=np.zeros((20, 32, 32, 3), np.uint8)),
     None, 'missing_arrays', {'missing': ['x_test', 'y_test'],
                              'present': ['x_train', 'x_val', 'y_train'], 'fix': _savez_fix}),
    ('truncated file', _truncated, None, 'not_npz', {'fix': _savez_fix}),
    ('a directory', os.makedirs, None, 'directory', {'fix': _savez_fix}),
    ('a single array', _single_array, None, 'single_array', {'fix': _savez_fix}),
]


@pytest.mark.parametrize('make, where, reason, details', [case[1:] for case in BAD_NPZ],
                         ids=[case[0] for case in BAD_NPZ])
def test_bad_npz_is_refused_naming_file_array_and_fix(tmp_path, make, where, reason, details):
  path = str(tmp_path / 'data.npz')
  if callable(make):
    make(path)
  else:
    np.savez(path, **make)
  config = _config(dataset='cifar10', npz_path=path, validation_size=10)
  with pytest.raises(input_pipeline.InvalidDataError) as error:
    input_pipeline.load_dataset(config)
  e = error.value
  assert (e.location, e.where, e.reason) == (path, where, reason), (e.location, e.where, e.reason)
  for key, value in details.items():
    assert e.details[key] == (value(path) if callable(value) else value), (key, e.details)
  message = str(e)
  assert path in message and '\n' not in message, message
  if 'fix' in e.details:  # the message offers the fix the error carries
    assert e.details['fix'] in message, message
  print(f'\n{message}')


def test_keras_style_labels_and_integer_images_are_accepted(tmp_path):
  """(N, 1) labels are squeezed; int64 images within [0, 255] are cast losslessly."""
  arrays = _arrays()
  path = tmp_path / 'keras.npz'
  np.savez(path, x_train=arrays['x_train'].astype(np.int64), y_train=arrays['y_train'][:, None],
           x_test=arrays['x_test'], y_test=arrays['y_test'][:, None])
  data = input_pipeline.load_dataset(_config(dataset='cifar10', npz_path=str(path),
                                             validation_size=0))
  np.testing.assert_array_equal(data.train.images, arrays['x_train'])
  np.testing.assert_array_equal(data.train.labels, arrays['y_train'])
  assert data.train.images.dtype == np.uint8 and data.test.labels.shape == (20,)


def test_cifar100_npz_labels_are_checked_against_its_classes(tmp_path):
  path = tmp_path / 'c100.npz'
  np.savez(path, **_arrays(y_train=np.arange(60) % 25))  # 25 classes: fine for the fine labels
  config = _config(dataset='cifar100', npz_path=str(path), validation_size=0)
  assert input_pipeline.load_dataset(config).num_classes == 100
  config.label_key = 'coarse_label'  # 20 classes: labels 20-24 are outside
  with pytest.raises(input_pipeline.InvalidDataError) as error:
    input_pipeline.load_dataset(config)
  assert (error.value.where, error.value.reason) == ('y_train', 'labels_range')
  assert error.value.details == {'label': 20, 'index': 20, 'outside': 10, 'num_classes': 20}


def test_data_identity_holds_what_picks_the_images_and_the_batch_size():
  config = _config(dataset='cifar10', npz_path='data.npz', validation_size=100)
  identity = input_pipeline.data_identity(config)
  assert identity == {'dataset': 'cifar10', 'batch_size': 128, 'label_key': 'label',
                      'npz_path': os.path.abspath('data.npz'), 'validation_size': 100,
                      'validation_seed': 0, 'stratified_validation': True}
  config.learning_rate, config.data_dir = 0.5, '/elsewhere'  # neither picks images
  assert input_pipeline.data_identity(config) == identity
  config.kfold.num_folds, config.kfold.fold = 5, 2  # folds replace the held-out split
  assert input_pipeline.data_identity(config) == {
      'dataset': 'cifar10', 'batch_size': 128, 'label_key': 'label',
      'npz_path': os.path.abspath('data.npz'), 'kfold.num_folds': 5, 'kfold.fold': 2,
      'validation_seed': 0}
  synthetic = input_pipeline.data_identity(_config(dataset='synthetic', validation_size=0))
  assert synthetic['synthetic.noise'] == 0.35 and 'npz_path' not in synthetic
  assert 'validation_seed' not in synthetic  # no validation split: the seed picks nothing


def test_changed_data_settings_are_named():
  recorded = {'dataset': 'cifar10', 'batch_size': 128, 'validation_seed': 0}
  input_pipeline.check_same_data(recorded, dict(recorded), 'The run')
  with pytest.raises(input_pipeline.DataSettingsChangedError) as error:
    input_pipeline.check_same_data(recorded, dict(recorded, batch_size=64, validation_seed=7),
                                   'The run')
  assert error.value.differences == {'batch_size': (128, 64), 'validation_seed': (0, 7)}
  assert error.value.source == 'The run'
  assert '--allow_changed_data' in str(error.value)  # the way to go on anyway is named
  with pytest.raises(input_pipeline.DataSettingsChangedError) as error:  # a setting added since
    input_pipeline.check_same_data(recorded, dict(recorded, label_key='label'), 'The run')
  assert error.value.differences == {'label_key': (None, 'label')}


@pytest.mark.parametrize('dataset, label_key, count, expected', [
    ('cifar10', 'label', 15, 10), ('cifar10', 'label', 9, 10),
    ('cifar100', 'coarse_label', 100, 20),
])
def test_a_classes_array_of_another_count_than_the_dataset_is_refused(tmp_path, dataset,
                                                                      label_key, count, expected):
  """Issue 20 (12): 15 names with cifar10 built a 15-output network and averaged the macro
  metrics over 5 empty classes."""
  path = tmp_path / 'named.npz'
  np.savez(path, classes=np.array([f'c{i}' for i in range(count)]), **_arrays())
  config = _config(dataset=dataset, npz_path=str(path), validation_size=0, label_key=label_key)
  with pytest.raises(input_pipeline.ClassCountError) as error:
    input_pipeline.load_dataset(config)
  assert (error.value.names, error.value.expected) == (count, expected)
  assert (error.value.source, error.value.location) == (f'dataset {dataset}', str(path))
  assert (error.value.where, error.value.reason) == ('classes', 'class_count')
  np.savez(path, classes=np.array([f'c{i}' for i in range(expected)]), **_arrays())
  assert input_pipeline.load_dataset(config).num_classes == expected
