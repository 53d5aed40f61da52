"""Loads CIFAR (or generated data) once, as uint8 arrays on the host, and carves the splits.

The arrays then go to the accelerator(s) whole; batching and augmentation happen there. tfds (and so
TensorFlow) is imported only when a tfds dataset is actually read, so generated data and `.npz`
arrays work on machines without TensorFlow.
"""

import dataclasses
import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Optional, Sequence

import ml_collections
import numpy as np

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                   'truck')


class DatasetUnavailableError(RuntimeError):
  """The dataset is not on disk and cannot be fetched; the message says how to provide it."""


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
  train: Split
  validation: Optional[Split]
  test: Split
  mean: tuple  # per-channel statistics of the training images in [0, 1], for normalisation
  std: tuple

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


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
  rng = np.random.RandomState(seed)
  folds = [[] for _ in range(k)]
  offset = 0
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    for j, idx in enumerate(members):
      folds[(j + offset) % k].append(idx)
    offset += len(members)
  return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


def synthetic_splits(cfg: ml_collections.ConfigDict, image_size: int = 32):
  """A generated, learnable image set: one smooth colour template per class, plus noise and shifts.

  It ships with no files and needs no network, so smoke runs and tests train on real signal.
  """
  rng = np.random.RandomState(cfg.seed)
  coarse = rng.uniform(0, 1, (cfg.num_classes, 4, 4, 3))
  templates = coarse.repeat(image_size // 4, axis=1).repeat(image_size // 4, axis=2)

  def make(n):
    labels = rng.randint(0, cfg.num_classes, n).astype(np.int32)
    shifts = rng.randint(-3, 4, (n, 2))
    x = np.stack([np.roll(templates[y], tuple(s), axis=(0, 1)) for y, s in zip(labels, shifts)])
    x = x + rng.normal(0, cfg.noise, x.shape)
    return Split((np.clip(x, 0, 1) * 255).round().astype(np.uint8), labels)

  names = tuple(f'class_{i}' for i in range(cfg.num_classes))
  return make(cfg.num_train), make(cfg.num_test), names


def _reachable(host: str, port: int = 443, timeout: float = 10.0) -> bool:
  """Whether a TCP connection to host:port opens within `timeout` seconds.

  tfds retries a failing download with back-off for minutes; without network this answers in
  seconds. The name lookup, which a socket timeout does not bound, runs in a daemon thread.
  """
  result = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result and result[0])


def _tfds_splits(config: ml_collections.ConfigDict):
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
      raise DatasetUnavailableError(f'Dataset {config.dataset!r} is not in {where}. {how}')
    proxy = urllib.request.getproxies().get('https')  # downloads go through it when set
    url = urllib.parse.urlparse(proxy or builder.info.homepage)  # homepage: CIFAR's host
    port = url.port or (80 if url.scheme == 'http' else 443)
    if url.hostname and not _reachable(url.hostname, port):
      raise DatasetUnavailableError(
          f'Dataset {config.dataset!r} is not in {where} and '
          f'{"the proxy " if proxy else ""}{url.hostname}:{port} cannot be reached to download it '
          f'(no network?). {how}')
    try:
      builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
      raise DatasetUnavailableError(
          f'Dataset {config.dataset!r} is not in {where} and could not be downloaded '
          f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}). {how}'
      ) from None
  label_names = builder.info.features[config.label_key].names
  splits = []
  for split in ('train', 'test'):
    # One batch of the whole split, sized by the dataset's own cardinality: batch_size=-1 sizes it
    # from the split metadata, which tfds' mock data (tests) lacks, and then asks for sys.maxsize.
    ds = builder.as_dataset(split=split)
    count = int(ds.cardinality())
    count = count if count > 0 else builder.info.splits[split].num_examples
    data = next(iter(tfds.as_numpy(ds.batch(count))))
    splits.append(Split(data['image'].astype(np.uint8), data[config.label_key].astype(np.int32)))
  return splits[0], splits[1], tuple(label_names)


def _npz_splits(config: ml_collections.ConfigDict):
  if not os.path.exists(config.npz_path):
    raise DatasetUnavailableError(f'npz_path {config.npz_path!r} does not exist.')
  z = np.load(config.npz_path)
  missing = {'x_train', 'y_train', 'x_test', 'y_test'} - set(z.files)
  if missing:
    raise DatasetUnavailableError(f'{config.npz_path} lacks arrays {sorted(missing)}; it needs '
                                  'x_train, y_train, x_test, y_test (uint8 NHWC images, int '
                                  'labels).')
  names = (tuple(str(n) for n in z['classes']) if 'classes' in z.files else
           CIFAR10_CLASSES if config.dataset == 'cifar10' else
           tuple(f'class_{i}' for i in range(int(z['y_train'].max()) + 1)))
  return (Split(z['x_train'].astype(np.uint8), z['y_train'].astype(np.int32)),
          Split(z['x_test'].astype(np.uint8), z['y_test'].astype(np.int32)), names)


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Train / validation / test splits as host uint8 arrays, with normalisation statistics."""
  if config.dataset == 'synthetic':
    train, test, names = synthetic_splits(config.synthetic)
  elif config.npz_path:
    train, test, names = _npz_splits(config)
  else:
    train, test, names = _tfds_splits(config)
  validation = None
  if config.kfold.num_folds:
    folds = stratified_folds(train.labels, config.kfold.num_folds, config.validation_seed)
    held = folds[config.kfold.fold]
    train, validation = train.take(np.setdiff1d(np.arange(len(train)), held)), train.take(held)
  elif config.validation_size:
    if config.validation_size >= len(train):
      raise ValueError(f'validation_size={config.validation_size} leaves no training data '
                       f'(the training split has {len(train)} examples).')
    keep, held = stratified_holdout(train.labels, config.validation_size, config.validation_seed,
                                    config.stratified_validation)
    train, validation = train.take(keep), train.take(held)
  mean, std = channel_statistics(train.images)
  return Dataset(config.dataset, names, train, validation, test, mean, std)


def channel_statistics(images: np.ndarray, chunk: int = 4096):
  """Per-channel mean and std in [0, 1], in chunks so 50k images need no float copy."""
  total = np.zeros(images.shape[-1])
  squares = np.zeros(images.shape[-1])
  for i in range(0, len(images), chunk):
    x = images[i:i + chunk].astype(np.float64) / 255.0
    total += x.sum(axis=(0, 1, 2))
    squares += (x * x).sum(axis=(0, 1, 2))
  n = images.size // images.shape[-1]
  mean = total / n
  return tuple(mean.tolist()), tuple(np.sqrt(squares / n - mean**2).tolist())


def with_data_location(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` that names where its data is read: absolute paths, $TFDS_DATA_DIR in.

  A run's config.json holds this, so `evaluate`, run later from another directory or shell without
  the environment of the training, reads the same data.
  """
  config = config.copy_and_resolve_references()
  if config.npz_path:
    config.npz_path = os.path.abspath(os.path.expanduser(config.npz_path))
  elif config.dataset != 'synthetic':
    data_dir = config.data_dir or os.environ.get('TFDS_DATA_DIR', '')
    config.data_dir = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else ''
  return config
