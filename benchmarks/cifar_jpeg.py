"""The CIFAR-10 JPEG copy as the uint8 arrays `--config.npz_path` reads, decoded without TensorFlow.

  python benchmarks/cifar_jpeg.py decode data/cifar10_jpeg.npz /tmp/cifar10.npz [--workers=16]
  python benchmarks/cifar_jpeg.py synthesize /tmp/fake_jpeg.npz   # a small stand-in, for --quick

The source npz holds each split's JPEG files concatenated (`{split}_jpeg`), their boundaries
(`{split}_offsets`), labels (`{split}_labels`) and `classes`. Decoding uses pillow on all cores.
Each split is then shuffled with the fixed permutation of the shared `build_tfds_cifar10.py --npz`
(seed 0 for train, 1 for test; the source is sorted by class), so the library's validation split,
drawn from the training order, holds the same images whichever of the two decoded it.
`synthesize` writes the library's generated images in the same JPEG layout, so the whole device
pipeline can be rehearsed without the real copy.
"""

import argparse
import io
import multiprocessing
import os
import sys

import numpy as np

if __package__ in (None, ''):  # run as a script: make `se_resnet_jax` importable from the tree
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHUFFLE_SEEDS = {'train': 0, 'test': 1}


def _decode_chunk(blobs: list) -> np.ndarray:
  from PIL import Image
  return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert('RGB')) for b in blobs])


def decode_split(z, split: str, pool=None, chunk: int = 1000):
  """(images uint8 NHWC, labels int64) of one split, in the shuffled order."""
  blob, offsets, labels = z[f'{split}_jpeg'], z[f'{split}_offsets'], z[f'{split}_labels']
  files = [blob[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(labels))]
  chunks = [files[i:i + chunk] for i in range(0, len(files), chunk)]
  images = np.concatenate(list((pool.map if pool else map)(_decode_chunk, chunks)))
  perm = np.random.RandomState(SHUFFLE_SEEDS[split]).permutation(len(labels))
  return images[perm], np.asarray(labels)[perm].astype(np.int64)


def decode(source: str, destination: str, workers: int = 0) -> dict:
  """Writes x_train, y_train, x_test, y_test, classes; returns the split sizes."""
  z = np.load(source)
  missing = {f'{s}_{k}' for s in ('train', 'test') for k in ('jpeg', 'offsets', 'labels')}
  missing -= set(z.files)
  if missing:
    raise SystemExit(f'{source} lacks {sorted(missing)}: it is not the CIFAR JPEG npz.')
  workers = workers or len(os.sched_getaffinity(0))
  with multiprocessing.get_context('fork').Pool(workers) as pool:
    x_train, y_train = decode_split(z, 'train', pool)
    x_test, y_test = decode_split(z, 'test', pool)
  classes = z['classes'] if 'classes' in z.files else np.array([])
  tmp = destination + '.tmp.npz'
  np.savez(tmp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=classes)
  os.replace(tmp, destination)
  return {'train': len(y_train), 'test': len(y_test), 'workers': workers}


def encode_split(images: np.ndarray, labels: np.ndarray, quality: int = 75) -> dict:
  """One split in the JPEG copy's layout (the inverse of decode_split, before shuffling)."""
  from PIL import Image
  files = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', quality=quality)
    files.append(np.frombuffer(buffer.getvalue(), np.uint8))
  offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
  return {'jpeg': np.concatenate(files), 'offsets': offsets, 'labels': labels.astype(np.int64)}


def synthesize(destination: str, num_train: int = 1500, num_test: int = 300) -> dict:
  """A small JPEG npz of the library's generated 10-class images, standing in for the copy."""
  import ml_collections

  from se_resnet_jax import input_pipeline

  cfg = ml_collections.ConfigDict(dict(num_classes=10, num_train=num_train, num_test=num_test,
                                       noise=0.25, seed=0))
  train, test, _ = input_pipeline.synthetic_splits(cfg)
  arrays = {'classes': np.array(input_pipeline.CIFAR10_CLASSES)}
  for name, split in (('train', train), ('test', test)):
    arrays.update({f'{name}_{k}': v for k, v in encode_split(split.images, split.labels).items()})
  np.savez(destination, **arrays)
  return {'train': num_train, 'test': num_test}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  d = commands.add_parser('decode', help='JPEG npz -> uint8 npz for --config.npz_path')
  d.add_argument('source')
  d.add_argument('destination')
  d.add_argument('--workers', type=int, default=0, help='processes (default: all cores)')
  s = commands.add_parser('synthesize', help='a small generated JPEG npz, for rehearsals')
  s.add_argument('destination')
  s.add_argument('--num_train', type=int, default=1500)
  s.add_argument('--num_test', type=int, default=300)
  args = parser.parse_args(argv)
  if args.command == 'decode':
    print(decode(args.source, args.destination, args.workers), flush=True)
  else:
    print(synthesize(args.destination, args.num_train, args.num_test), flush=True)


if __name__ == '__main__':
  main()
