"""Classifies PNG/JPEG images with an exported model or a training run.

  python -m se_resnet_jax.predict --model=cifar10.jax cat.jpg dog.png
  python -m se_resnet_jax.predict --model=cifar10.onnx photos/ --csv=predictions.csv
  python -m se_resnet_jax.predict --workdir=runs/cifar10 cat.jpg --top_k=5

Named files get their top-k classes printed; a folder's PNG/JPEG files (not its subfolders) go to
a CSV, --csv or ./predictions.csv.
"""

import csv
import io
import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
from absl import app, flags

from se_resnet_jax import cli, files
from se_resnet_jax.errors import UserError

FLAGS = flags.FLAGS

RESIZE = 'centre square crop, then PIL bicubic resize to 32x32, RGB'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
BATCH = 256


class PredictError(UserError):
  """Input the command cannot use; the message says what to give instead."""


def to_rgb8(image: Any) -> Any:
  """`image` as the 8-bit RGB picture it shows (alpha dropped), or PredictError for a mode without
  an agreed 8-bit scale (float pixels). 16-bit values ('I' too, when they fit) are scaled by
  255/65535: PIL's convert('RGB') clips them to 255, a white picture.
  """
  from PIL import Image

  mode = image.mode
  if mode == 'RGB':
    return image
  if mode.startswith('I;16') or mode == 'I':
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise PredictError(f'mode {mode!r} image with values in [{values.min()}, {values.max()}], '
                         'beyond 16 bits: no 8-bit scale for it; save it as an 8-bit PNG/JPEG')
    grey = np.round(values * (255 / 65535)).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), 'RGB')
  if mode == 'F':
    raise PredictError("mode 'F' image (32-bit float pixels) has no agreed 8-bit scale; save it "
                       'as an 8-bit PNG/JPEG')
  if mode in ('LA', 'La', 'PA', 'RGBa') or (mode == 'P' and 'transparency' in image.info):
    image = image.convert('RGBA')  # via RGBA, so every palette entry and grey level maps as shown
  try:
    return image.convert('RGB')
  except (ValueError, OSError) as e:
    raise PredictError(f'mode {mode!r} cannot be converted to RGB ({e}); save it as an 8-bit '
                       'RGB PNG/JPEG') from None


def load_image(path: str, size: int = 32) -> np.ndarray:
  """uint8 (size, size, 3): the 8-bit RGB picture (`to_rgb8`), centre square crop, PIL bicubic."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as image:
      image.load()
      image = to_rgb8(image)
  except FileNotFoundError:
    raise PredictError(f'Image {path} does not exist.') from None
  except PredictError as e:
    raise PredictError(f'Image {path}: {e}.') from None
  except Image.DecompressionBombError as e:
    raise PredictError(f'Image {path} is too large to read safely ({e}); give a smaller image.'
                       ) from None
  except (UnidentifiedImageError, OSError, ValueError) as e:
    reason = str(e).split(' (')[0] if str(e) else type(e).__name__
    raise PredictError(f'Cannot read image {path} ({reason}): give PNG or JPEG files, or '
                       'folders of them.') from None
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  image = image.crop((left, top, left + side, top + side))
  return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.uint8)


def expand_inputs(paths: Sequence[str]) -> tuple:
  """(image paths, whether any came from a folder); folders give their PNG/JPEG files, sorted."""
  images, from_folder = [], False
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, name) for name in os.listdir(path)
                     if name.lower().endswith(IMAGE_EXTENSIONS)
                     and os.path.isfile(os.path.join(path, name)))
      if not found:
        raise PredictError(f'Folder {path} has no {"/".join(IMAGE_EXTENSIONS)} files.')
      images += found
      from_folder = True
    else:
      images.append(path)
  return images, from_folder


def load_exported(path: str) -> tuple:
  """(predict function uint8 images -> probabilities, class names, a description, {'run_id',
  'step'} of its weights from its model card) of an exported file."""
  if not os.path.isfile(path):
    raise PredictError(f'--model {path} does not exist.')
  with open(path, 'rb') as f:
    data = f.read()
  from se_resnet_jax import export, input_pipeline

  try:
    run, inputs, outputs, metadata, source = export.load_exported(data)
  except ImportError:
    raise PredictError(f'--model {path} is not a jax.export artifact; if it is an ONNX model, '
                       'install onnxruntime (pip install "se_resnet_jax[export]").') from None
  except ValueError:
    raise PredictError(f'--model {path} is neither a jax.export artifact nor an ONNX model: '
                       'give a file written by `python -m se_resnet_jax.export`.') from None
  inputs = [(dtype, tuple(d if isinstance(d, int) else None for d in shape))
            for dtype, shape in inputs]
  if inputs != [('uint8', (None, 32, 32, 3))] or len(outputs) != 2:
    raise PredictError(f'{path} is a model, but not one made by `python -m se_resnet_jax.export` '
                       f'(inputs {inputs}, {len(outputs)} outputs; expected one uint8 '
                       '(batch, 32, 32, 3) input and logits, probabilities).')
  try:  # the export's model card, FILE.json, where there is one
    with open(path + '.json') as f:
      card = json.load(f)
  except (OSError, ValueError):
    card = {}
  card = card if isinstance(card, dict) else {}
  names = (card.get('class_names') or json.loads(metadata.get('class_names', 'null'))
           or input_pipeline.default_class_names('', outputs[1][-1]))
  checkpoint = card.get('checkpoint') if isinstance(card.get('checkpoint'), dict) else {}
  return (lambda images: np.asarray(run(images)[1]), list(names), source,
          {'run_id': checkpoint.get('run_id'), 'step': checkpoint.get('step')})


def load_run(workdir: str, checkpoint: str, config) -> tuple:
  """(predict function, class names, description, {'run_id', 'step'}) of a run's checkpoint."""
  from se_resnet_jax import compilation, inference, rundir

  run = rundir.restore_run(workdir, checkpoint, config)
  infer = inference.inference_function(run.model, run.variables, run.record.mean,
                                       run.record.std, tta_flip=bool(run.config.tta_flip))
  run_infer = compilation.jit(infer)
  return (lambda images: np.asarray(run_infer(images)[1]), list(run.record.class_names),
          f'{workdir} ({checkpoint} checkpoint, step {run.step}, run {run.run_id})',
          {'run_id': run.run_id, 'step': run.step})


def predict_probabilities(predict: Callable, images: np.ndarray) -> np.ndarray:
  """Probabilities in chunks of one size (the last padded), so a compiled model compiles once."""
  size = min(len(images), BATCH)
  padded = np.concatenate([images, np.zeros((-len(images) % size, *images.shape[1:]), np.uint8)])
  return np.concatenate([np.asarray(predict(padded[start:start + size]))
                         for start in range(0, len(padded), size)])[:len(images)]


def top_k(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list:
  """Per image, the k most probable (class name, probability), most probable first."""
  order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
  return [[(class_names[i], float(p[i])) for i in row] for row, p in zip(order, probabilities)]


def write_csv(path: str, image_paths: Sequence[str], ranked: list, weights: Optional[dict] = None,
              overwrite: bool = False) -> None:
  """The ranked classes per image; the last two columns name the weights (run id, step)."""
  weights = weights or {}
  ranks = [f'{what}_{r}' for r in range(1, len(ranked[0]) + 1) for what in ('class', 'probability')]
  out = io.StringIO()
  writer = csv.writer(out)  # it writes None as an empty field
  writer.writerow(['image'] + ranks + ['run_id', 'step'])
  for image, row in zip(image_paths, ranked):
    writer.writerow([image] + [v for name, p in row for v in (name, f'{p:.6f}')]
                    + [weights.get('run_id'), weights.get('step')])
  files.write_output(path, out.getvalue(), '--csv', overwrite)


def define_flags() -> None:
  """The command's flags; defined only when it runs, so importing this module defines none."""
  from ml_collections import config_flags

  flags.DEFINE_string('model', None, 'A file written by `python -m se_resnet_jax.export` (jax or '
                      'onnx format; its class names are read from MODEL.json when present).')
  flags.DEFINE_string('workdir', None, 'Or a training run directory: its checkpoint is used.')
  flags.DEFINE_string('checkpoint', 'best', "With --workdir: 'best', 'latest' or a step number.")
  flags.DEFINE_integer('top_k', 3, 'How many classes to show per image.', lower_bound=1)
  flags.DEFINE_string('csv', None, 'Write every image\'s top-k classes to this CSV (default for '
                      'a folder argument: ./predictions.csv).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing CSV.')
  config_flags.DEFINE_config_file('config', None, 'With --workdir: config file; default: '
                                  'workdir/config.json.')


def main(argv):
  inputs = argv[1:]

  def command():
    if bool(FLAGS.model) == bool(FLAGS.workdir):
      raise PredictError('Give exactly one of --model=FILE (an export) or --workdir=DIR (a run).')
    if not inputs:
      raise PredictError('Give one or more images (PNG/JPEG) or folders of them after the flags.')
    paths, from_folder = expand_inputs(inputs)
    csv_path = FLAGS.csv or ('predictions.csv' if from_folder else None)
    if csv_path:
      files.check_output(csv_path, '--csv', FLAGS.overwrite)  # before any compute
    images = np.stack([load_image(p) for p in paths])  # every image is read before any compute
    predict, names, source, weights = (
        load_exported(FLAGS.model) if FLAGS.model else
        load_run(FLAGS.workdir, FLAGS.checkpoint, FLAGS.config))
    ranked = top_k(predict_probabilities(predict, images), names, min(FLAGS.top_k, len(names)))
    print(f'Model: {source}. Images: {RESIZE}.')
    if csv_path:
      write_csv(csv_path, paths, ranked, weights, FLAGS.overwrite)
      print(f'Wrote the top {len(ranked[0])} classes of {len(paths)} images to {csv_path}.')
    if not from_folder:
      for path, row in zip(paths, ranked):
        print(f'{path}: ' + ', '.join(f'{name} {p:.3f}' for name, p in row))

  cli.run(argv[:1], command)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
