"""Loads CIFAR (or generated data) once, as uint8 arrays on the host, and carves the splits.

tfds (and so TensorFlow) is imported only to read a tfds dataset. Every source is validated once:
arrays of another layout, dtype or label range would not fail downstream but train to chance.
"""

import contextlib
import dataclasses
import os
import socket
import threading
import urllib.parse
import urllib.request
import zipfile
from typing import Optional, Sequence

import ml_collections
import numpy as np

from se_resnet_jax.config import num_classes
from se_resnet_jax.errors import UserError
from se_resnet_jax.models import IMAGE_SHAPE

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                   'truck')
NPZ_ARRAYS = ('x_train', 'y_train', 'x_test', 'y_test')


def default_class_names(dataset: str, count: int) -> tuple:
  """The names of classes that data or a file does not name: CIFAR-10's own, else class_{i}."""
  return CIFAR10_CLASSES if dataset == 'cifar10' else tuple(f'class_{i}' for i in range(count))


class DatasetUnavailableError(UserError, RuntimeError):
  """The dataset is not on disk and cannot be fetched; the message says how to provide it.
  `reason`: 'missing_file', 'not_prepared' (download off), 'unreachable' or 'download_failed'."""

  def __init__(self, message: str, dataset: str, location: str, reason: str):
    super().__init__(message)
    self.dataset, self.location, self.reason = dataset, location, reason


class InvalidDataError(UserError, ValueError):
  """Arrays that would train silently wrong; the message names the source, the array and the fix.

  `location` is the source (None: a config value), `where` the array (None: the whole file),
  `reason` a tag ('dtype', ...) and `details` the numbers the message quotes.
  """

  def __init__(self, message: str, location: Optional[str], where: Optional[str], reason: str,
               **details):
    super().__init__(message)
    self.location, self.where, self.reason, self.details = location, where, reason, details


class ClassCountError(InvalidDataError):
  """A `classes` array naming `names` classes where `source` (the dataset) has `expected`."""

  def __init__(self, message: str, names: int, expected: int, source: str, location: str):
    super().__init__(message, location, 'classes', 'class_count')
    self.names, self.expected, self.source = names, expected, source


class DataSettingsChangedError(UserError, ValueError):
  """A run resumed or evaluated with settings that pick other images than it was made with:
  `differences` maps each differing setting to (recorded, current); `source` recorded them."""

  def __init__(self, message: str, differences: dict, source: str):
    super().__init__(message)
    self.differences, self.source = differences, source


@dataclasses.dataclass
class Split:
  images: np.ndarray  # uint8 (N, H, W, C)
  labels: np.ndarray  # int32 (N,)

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, index: np.ndarray) -> 'Split':
    return Split(self.images[index], self.labels[index])


@dataclasses.dataclass
class Dataset:
  name: str
  class_names: Sequence[str]
  train: Optional[Split]  # None when only the test split was read
  validation: Optional[Split]
  test: Split
  mean: Optional[tuple]  # per-channel statistics of the training images in [0, 1]
  std: Optional[tuple]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def validate_split(images, labels, num_classes: int, source: str, name: str) -> Split:
  """The split as uint8 (N, 32, 32, 3) images and int32 (N,) labels, or InvalidDataError: integer
  images in [0, 255] are cast and (N, 1) labels squeezed; nothing else is guessed at."""
  x_name, y_name = f'x_{name}', f'y_{name}'

  def fail(array, text, reason, **details):
    raise InvalidDataError(f'{source}: {array} {text}', source, array, reason, **details)

  images, labels = np.asarray(images), np.asarray(labels)
  shape = images.shape
  if images.ndim == 4 and shape[1] == IMAGE_SHAPE[2] and shape[2:] == IMAGE_SHAPE[:2]:
    fix = f'np.transpose({x_name}, (0, 2, 3, 1))'
    fail(x_name, f'has shape {shape}, channels first (NCHW); the images must be NHWC '
         f'(N, 32, 32, 3): use {fix}.', 'channels_first', shape=shape, fix=fix)
  if images.ndim != 4 or shape[1:] != IMAGE_SHAPE:
    fail(x_name, f'has shape {shape}; the images must be (N, 32, 32, 3) RGB (CIFAR-sized; '
         'grayscale or other sizes need resizing and 3 channels).', 'shape', shape=shape)
  if len(images) == 0:
    fail(x_name, f'is empty: the {name} split needs at least one image.', 'empty')
  dtype = str(images.dtype)
  if np.issubdtype(images.dtype, np.floating):
    if not np.isfinite(images).all():
      fail(x_name, f'is {dtype} and holds NaN/Inf; the images must be uint8 in [0, 255]: fix or '
           'drop those images.', 'not_finite', dtype=dtype)
    low, high = float(images.min()), float(images.max())
    fix = (f'({x_name} * 255).round().astype(np.uint8)' if high <= 1.0 else
           f'{x_name}.round().astype(np.uint8)')
    fail(x_name, f'is {dtype} with values in [{low:g}, {high:g}]; the images must be uint8 in '
         f'[0, 255]: convert with {fix}.', 'dtype', dtype=dtype, fix=fix)
  if not np.issubdtype(images.dtype, np.integer):
    fail(x_name, f'is {dtype}; the images must be uint8 in [0, 255].', 'dtype', dtype=dtype)
  if images.min() < 0 or images.max() > 255:
    fail(x_name, f'is {dtype} with values in [{images.min()}, {images.max()}]; the images must be '
         'uint8 in [0, 255].', 'dtype', dtype=dtype)
  images = images.astype(np.uint8)

  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    fix = f'{y_name}.argmax(1)'
    fail(y_name, f'has shape {labels.shape}; the labels must be one class index per image, shape '
         f'(N,) (one-hot labels: {fix}).', 'shape', shape=labels.shape, fix=fix)
  if len(labels) != len(images):
    raise InvalidDataError(f'{source}: {x_name} has {len(images)} images but {y_name} has '
                           f'{len(labels)} labels; they must pair up one to one.', source, y_name,
                           'count_mismatch', images=len(images), labels=len(labels))
  if not np.issubdtype(labels.dtype, np.integer):
    integral = (np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all()
                and (labels == labels.round()).all())
    fix = f'{y_name}.astype(np.int64)' if integral else None
    fail(y_name, f'is {labels.dtype}; the labels must be integers' +
         (f': convert with {fix}.' if fix else '.'), 'dtype', dtype=str(labels.dtype), fix=fix)
  outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if len(outside):
    i = outside[0]
    fail(y_name, f'holds label {labels[i]} at index {i}' +
         (f' ({len(outside)} labels in all)' if len(outside) > 1 else '') +
         f', outside [0, {num_classes}) for {num_classes} classes: fix the labels, or the dataset '
         '(--config.dataset, label_key, a classes array).', 'labels_range',
         label=labels[i].item(), index=int(i), outside=len(outside), num_classes=num_classes)
  return Split(images, labels.astype(np.int32))


def data_identity(config: ml_collections.ConfigDict) -> dict:
  """The settings that decide which images a run trains, validates and tests on, and its batch size:
  checkpoints record them, as a run with others would look normal."""
  identity = {'dataset': config.dataset, 'batch_size': config.batch_size}
  if config.dataset == 'synthetic':
    identity.update({f'synthetic.{k}': config.synthetic[k] for k in sorted(config.synthetic)})
  else:
    identity.update(npz_path=os.path.abspath(config.npz_path) if config.npz_path else '',
                    label_key=config.label_key)
  if config.kfold.num_folds:
    identity.update({'kfold.num_folds': config.kfold.num_folds, 'kfold.fold': config.kfold.fold,
                     'validation_seed': config.validation_seed})
  else:
    identity['validation_size'] = config.validation_size
    if config.validation_size:
      identity.update(validation_seed=config.validation_seed,
                      stratified_validation=config.stratified_validation)
  return identity


def check_same_data(recorded: dict, current: dict, source: str) -> None:
  """Refuses `current` data settings that differ from those `source` was made with."""
  keys = sorted(recorded.keys() | current.keys())
  differences = {k: (recorded.get(k), current.get(k)) for k in keys
                 if recorded.get(k) != current.get(k)}
  if differences:
    shown = ', '.join(f'{k}: {old!r} there, {new!r} now' for k, (old, new) in differences.items())
    raise DataSettingsChangedError(
        f'{source} was made with other data settings ({shown}). They decide which images are '
        'trained, validated and tested on, and the batch order: use the values it was made with, '
        'or pass --allow_changed_data to go on anyway, or use a new --workdir.',
        differences, source)


def stratified_holdout(labels: np.ndarray, size: int, seed: int, stratified: bool = True):
  """Indices (keep, holdout) with `size` held out, class proportions kept when stratified."""
  rng = np.random.RandomState(seed)
  if not stratified:
    perm = rng.permutation(len(labels))
    return np.sort(perm[size:]), np.sort(perm[:size])
  classes, counts = np.unique(labels, return_counts=True)
  quota = np.floor(counts * size / len(labels)).astype(int)
  for i in np.argsort(-(counts * size / len(labels) - quota))[:size - quota.sum()]:
    quota[i] += 1  # largest remainders get the leftover places
  holdout = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q]
                            for c, q in zip(classes, quota)])
  keep = np.setdiff1d(np.arange(len(labels)), holdout)
  return keep, np.sort(holdout)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list:
  """k disjoint, class-balanced index sets covering every example once (for cross-validation)."""
  rng = np.random.RandomState(seed)  # dealt round-robin from the examples grouped by class
  order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
  return [np.sort(order[j::k]).astype(np.int64) for j in range(k)]


def synthetic_splits(cfg: ml_collections.ConfigDict, image_size: int = 32):
  """A generated, learnable image set (one smooth colour template per class, plus noise and
  shifts): smoke runs and tests train on real signal without files or network."""
  rng = np.random.RandomState(cfg.seed)
  coarse = rng.uniform(0, 1, (cfg.num_classes, 4, 4, 3))
  templates = coarse.repeat(image_size // 4, axis=1).repeat(image_size // 4, axis=2)

  def make(n):
    labels = rng.randint(0, cfg.num_classes, n).astype(np.int32)
    shifts = rng.randint(-3, 4, (n, 2))
    x = np.stack([np.roll(templates[y], tuple(s), axis=(0, 1)) for y, s in zip(labels, shifts)])
    x = x + rng.normal(0, cfg.noise, x.shape)
    return Split((np.clip(x, 0, 1) * 255).round().astype(np.uint8), labels)

  return make(cfg.num_train), make(cfg.num_test), default_class_names('', cfg.num_classes)


def _reachable(host: str, port: int = 443, timeout: float = 10.0) -> bool:
  """Whether host:port accepts a TCP connection within `timeout` seconds (tfds retries for
  minutes); in a daemon thread, because a socket timeout does not bound the name lookup."""
  connected = threading.Event()

  def connect():
    with contextlib.suppress(OSError):
      socket.create_connection((host, port), timeout=timeout).close()
      connected.set()

  threading.Thread(target=connect, daemon=True).start()
  return connected.wait(timeout)


def _tfds_splits(config: ml_collections.ConfigDict, read: Sequence[str] = ('train', 'test')):
  import tensorflow_datasets as tfds  # heavy: only when tfds data is read

  data_dir = config.data_dir or None
  builder = tfds.builder(config.dataset, data_dir=data_dir)
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  if not builder.is_prepared():
    how = (f'Put a prepared tfds {config.dataset!r} under {where} (set TFDS_DATA_DIR or '
           f'--config.data_dir), or download it on a machine with network '
           f'(python -c "import tensorflow_datasets as tfds; tfds.load(\'{config.dataset}\')") '
           'and copy the directory over, or pass arrays with --config.npz_path.')
    if not config.download:
      raise DatasetUnavailableError(f'Dataset {config.dataset!r} is not in {where}. {how}',
                                    config.dataset, where, 'not_prepared')
    proxy = urllib.request.getproxies().get('https')  # downloads go through it when set
    url = urllib.parse.urlparse(proxy or builder.info.homepage)  # homepage: CIFAR's host
    port = url.port or (80 if url.scheme == 'http' else 443)
    if url.hostname and not _reachable(url.hostname, port):
      raise DatasetUnavailableError(
          f'Dataset {config.dataset!r} is not in {where} and '
          f'{"the proxy " if proxy else ""}{url.hostname}:{port} cannot be reached to download it '
          f'(no network?). {how}', config.dataset, where, 'unreachable')
    try:
      builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
      raise DatasetUnavailableError(
          f'Dataset {config.dataset!r} is not in {where} and could not be downloaded '
          f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}). {how}',
          config.dataset, where, 'download_failed') from None
  label_names = builder.info.features[config.label_key].names
  splits = []
  for split in read:
    # Sized by the cardinality, not batch_size=-1: that reads split metadata tfds' mock data lacks.
    ds = builder.as_dataset(split=split)
    count = int(ds.cardinality())
    count = count if count > 0 else builder.info.splits[split].num_examples
    data = next(iter(tfds.as_numpy(ds.batch(count))))
    splits.append(validate_split(data['image'], data[config.label_key], len(label_names),
                                 f'tfds {config.dataset!r} in {where}', split))
  return ((None, *splits) if len(splits) == 1 else tuple(splits)) + (tuple(label_names),)


def _npz_splits(config: ml_collections.ConfigDict, read: Sequence[str] = ('train', 'test')):
  """x_train/y_train/x_test/y_test from an `.npz` file (and `classes`, the names, if present)."""
  path = config.npz_path
  fix = f'np.savez({path!r}, x_train=..., y_train=..., x_test=..., y_test=...)'
  how = f'write it with {fix} (uint8 (N, 32, 32, 3) images, integer labels).'
  unreadable = (OSError, ValueError, zipfile.BadZipFile, EOFError)
  if not os.path.exists(path):
    raise DatasetUnavailableError(f'npz_path {path!r} does not exist.', config.dataset, path,
                                  'missing_file')
  if os.path.isdir(path):
    raise InvalidDataError(f'npz_path {path!r} is a directory; it must be an .npz file: {how}',
                           path, None, 'directory', fix=fix)
  try:
    z = np.load(path)
  except unreadable as e:
    raise InvalidDataError(f'{path} cannot be read as an .npz file ({type(e).__name__}: '
                           f'{str(e)[:120]}); it is truncated or not made by np.savez: {how}',
                           path, None, 'not_npz', fix=fix) from None
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise InvalidDataError(f'{path} holds a single array, not named arrays: {how}', path, None,
                           'single_array', fix=fix)
  missing = [k for k in NPZ_ARRAYS if k not in z.files]
  if missing:
    raise InvalidDataError(f'{path} lacks arrays {missing} (it has {sorted(z.files)}): {how}',
                           path, None, 'missing_arrays', missing=missing, present=sorted(z.files),
                           fix=fix)
  arrays = {}
  wanted = [k for k in NPZ_ARRAYS if k[2:] in read]
  for key in wanted + (['classes'] if 'classes' in z.files else []):
    try:
      arrays[key] = z[key]
    except unreadable as e:
      raise InvalidDataError(f'{path}: array {key} cannot be read ({type(e).__name__}: '
                             f'{str(e)[:120]}); the file is truncated or damaged: {how}', path,
                             key, 'damaged_array', fix=fix) from None
  expected = num_classes(config)
  if 'classes' in arrays:
    classes = tuple(str(n) for n in np.atleast_1d(arrays['classes']))
    dataset = config.dataset + (f' ({config.label_key})' if config.dataset == 'cifar100' else '')
    if len(classes) != expected:  # it would size the classifier and average metrics over it
      raise ClassCountError(
          f'{path}: the classes array names {len(classes)} classes, but dataset {dataset} has '
          f'{expected}: give {expected} names, or set --config.dataset to the data\'s.',
          len(classes), expected, f'dataset {config.dataset}', path)
  else:
    classes = default_class_names(config.dataset, expected)
  return tuple(validate_split(arrays[f'x_{s}'], arrays[f'y_{s}'], len(classes), path, s)
               if f'x_{s}' in arrays else None for s in ('train', 'test')) + (classes,)


def load_dataset(config: ml_collections.ConfigDict, test_only: bool = False) -> Dataset:
  """Train / validation / test splits as host uint8 arrays, with normalisation statistics.

  With `test_only` the training split (and so validation and the statistics) is not read: an
  evaluation of the test split scales images with the run's recorded constants.
  """
  names_read = ('test',) if test_only else ('train', 'test')
  if config.dataset == 'synthetic':
    train, test, names = synthetic_splits(config.synthetic)  # valid by construction
  elif config.npz_path:
    train, test, names = _npz_splits(config, names_read)
  else:
    train, test, names = _tfds_splits(config, names_read)
  if test_only:
    return Dataset(config.dataset, names, None, None, test, None, None)
  validation = None
  if config.kfold.num_folds:
    held = stratified_folds(train.labels, config.kfold.num_folds,
                            config.validation_seed)[config.kfold.fold]
    train, validation = train.take(np.setdiff1d(np.arange(len(train)), held)), train.take(held)
  elif config.validation_size:
    if config.validation_size >= len(train):
      raise InvalidDataError(f'validation_size={config.validation_size} leaves no training data '
                             f'(the training split has {len(train)} examples).', None, None,
                             'no_training_data', validation_size=config.validation_size,
                             train_size=len(train))
    keep, held = stratified_holdout(train.labels, config.validation_size, config.validation_seed,
                                    config.stratified_validation)
    train, validation = train.take(keep), train.take(held)
  mean, std = channel_statistics(train.images)
  return Dataset(config.dataset, names, train, validation, test, mean, std)


def channel_statistics(images: np.ndarray, chunk: int = 4096):
  """Per-channel mean and std in [0, 1], in chunks so 50k images need no float copy."""
  total, squares = np.zeros(images.shape[-1]), np.zeros(images.shape[-1])
  for i in range(0, len(images), chunk):
    x = images[i:i + chunk].astype(np.float64) / 255.0
    total += x.sum(axis=(0, 1, 2))
    squares += (x * x).sum(axis=(0, 1, 2))
  n = images.size // images.shape[-1]
  mean = total / n
  return tuple(mean.tolist()), tuple(np.sqrt(squares / n - mean**2).tolist())


def with_data_location(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with absolute data paths and $TFDS_DATA_DIR in, for a run's config.json:
  `evaluate`, run later from elsewhere, reads the same data."""
  config = config.copy_and_resolve_references()
  if config.npz_path:
    config.npz_path = os.path.abspath(os.path.expanduser(config.npz_path))
  elif config.dataset != 'synthetic':
    data_dir = config.data_dir or os.environ.get('TFDS_DATA_DIR', '')
    config.data_dir = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else ''
  return config
