"""The predict command on PNG and JPEG files of any size, with either export or a run."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import copy_exports, one_line_error, run_command, run_commands_forked
from PIL import Image

from se_resnet_jax import inference, predict, rundir


@pytest.fixture(scope='module')
def files(tiny_run_exports, tmp_path_factory):
  """Both exports of the tiny run, and a folder with a wide RGBA PNG and a tall greyscale JPEG."""
  directory = tmp_path_factory.mktemp('predict')
  copy_exports(tiny_run_exports, directory)
  images = directory / 'images'
  images.mkdir()
  rs = np.random.RandomState(0)
  Image.fromarray(rs.randint(0, 256, (40, 90, 4), np.uint8), 'RGBA').save(images / 'wide.png')
  Image.fromarray(rs.randint(0, 256, (300, 120), np.uint8), 'L').save(images / 'tall.jpg',
                                                                        quality=90)
  (images / 'notes.txt').write_text('not an image: folders give only their PNG/JPEG files')
  return directory


def library_probabilities(workdir: str, paths) -> np.ndarray:
  run = rundir.restore_run(workdir, 'best')
  images = np.stack([predict.load_image(str(p)) for p in paths])
  return inference.reference_outputs(run.model, run.variables, run.record.mean, run.record.std,
                                     images)[1]


def test_load_image_crops_the_centre_square_then_resizes_bicubic(tmp_path):
  """A 96x32 picture, red in its middle third: the centre crop keeps only the red."""
  pixels = np.zeros((32, 96, 3), np.uint8)
  pixels[:, :32] = (0, 0, 255)
  pixels[:, 32:64] = (255, 0, 0)
  pixels[:, 64:] = (0, 255, 0)
  Image.fromarray(pixels).save(tmp_path / 'flag.png')
  image = predict.load_image(str(tmp_path / 'flag.png'))
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image, np.broadcast_to([255, 0, 0], (32, 32, 3)))
  big = np.random.RandomState(0).randint(0, 256, (50, 80, 3), np.uint8)
  Image.fromarray(big).save(tmp_path / 'big.png')
  expected = Image.fromarray(big[:, 15:65]).resize((32, 32), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(predict.load_image(str(tmp_path / 'big.png')), np.asarray(expected))


@pytest.mark.slow  # runs the command in a subprocess
@pytest.mark.parametrize('source', ['cifar10.jax', 'cifar10.onnx', 'workdir'])
def test_png_and_jpeg_top_classes_are_the_library_s(files, tiny_run, source):
  paths = [files / 'images' / 'wide.png', files / 'images' / 'tall.jpg']
  model = f'--workdir={tiny_run}' if source == 'workdir' else f'--model={files / source}'
  result = run_command('predict', model, *map(str, paths), '--top_k=3')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert 'centre square crop, then PIL bicubic resize to 32x32' in lines[0]
  expected = library_probabilities(tiny_run, paths)
  for path, line, probabilities in zip(paths, lines[1:], expected):
    name, ranked = line.split(': ')
    assert name == str(path)
    shown = [item.rsplit(' ', 1) for item in ranked.split(', ')]
    order = np.argsort(-probabilities, kind='stable')[:3]
    assert [c for c, _ in shown] == [f'class_{i}' for i in order]
    np.testing.assert_allclose([float(p) for _, p in shown], probabilities[order], atol=6e-4)


@pytest.mark.slow  # runs the command in a subprocess
def test_a_folder_goes_to_a_csv(files, tiny_run, tmp_path):
  result = run_command('predict', f'--model={files / "cifar10.onnx"}', str(files / 'images'),
                       '--top_k=2', cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert 'Wrote the top 2 classes of 2 images to predictions.csv' in result.stdout
  with open(tmp_path / 'predictions.csv') as f:
    rows = list(csv.DictReader(f))
  assert [os.path.basename(r['image']) for r in rows] == ['tall.jpg', 'wide.png']
  expected = library_probabilities(tiny_run, [r['image'] for r in rows])
  for row, probabilities in zip(rows, expected):
    assert row['class_1'] == f'class_{np.argmax(probabilities)}'
    assert float(row['probability_1']) >= float(row['probability_2'])
    np.testing.assert_allclose(float(row['probability_1']), probabilities.max(), atol=2e-5)
  with open(files / 'cifar10.onnx.json') as f:  # each row names the weights (issue 20)
    checkpoint = json.load(f)['checkpoint']
  assert checkpoint['run_id'] and {(r['run_id'], r['step']) for r in rows} == {
      (checkpoint['run_id'], str(checkpoint['step']))}
  error = one_line_error(run_command('predict', f'--model={files / "cifar10.onnx"}',
                                     str(files / 'images'), cwd=str(tmp_path)))
  assert 'predictions.csv already exists; pass --overwrite' in error


@pytest.mark.slow  # runs the command in a subprocess
def test_bad_input_is_one_line(files, tmp_path):
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8 not really a JPEG')
  wide = str(files / 'images' / 'wide.png')
  broken, not_a_model, a_card, no_run = run_commands_forked([
      ('predict', [f'--model={files / "cifar10.jax"}', str(tmp_path / 'broken.jpg')], {}),
      ('predict', [f'--model={wide}', wide], {}),
      ('predict', [f'--model={files / "cifar10.jax.json"}', wide], {}),
      ('predict', [f'--workdir={tmp_path}', wide], {})], str(tmp_path))
  error = one_line_error(broken)
  assert 'Cannot read image' in error and 'broken.jpg' in error
  for result in (not_a_model, a_card):
    assert 'neither a jax.export artifact nor an ONNX model' in one_line_error(result)
  assert 'holds no run.json' in one_line_error(no_run)


def _picture() -> np.ndarray:
  """A 24x40 RGB picture with every channel varying, and a grey level of it."""
  rs = np.random.RandomState(1)
  return rs.randint(0, 256, (24, 40, 3), np.uint8)


@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'P', 'PA', 'RGBA', 'CMYK', 'I;16', 'I', 'F'])
def test_every_pil_mode_becomes_its_8bit_rgb_picture_or_is_refused(mode, tmp_path):
  """Issue 20 (1): PIL's convert('RGB') clipped 16-bit grey to 255, a white picture."""
  rgb = Image.fromarray(_picture(), 'RGB')
  grey8 = np.asarray(rgb.convert('L'))
  if mode in ('I;16', 'I'):  # the same grey in 16 bits: every level times 257
    wide = grey8.astype(np.uint16 if mode == 'I;16' else np.int32) * 257
    image = Image.fromarray(wide, mode if mode == 'I' else None)
    if mode == 'I;16':
      assert image.mode == 'I;16'
    expected = Image.fromarray(grey8, 'L').convert('RGB')
  elif mode == 'F':
    image = Image.fromarray(grey8.astype(np.float32), 'F')
    with pytest.raises(predict.PredictError, match="'F'"):
      predict.to_rgb8(image)
    return
  elif mode in ('1', 'L', 'CMYK', 'RGBA'):
    image = rgb.convert(mode)
    expected = image.convert('RGB')  # PIL's own conversion is right for 8-bit modes
  elif mode == 'LA':
    image = Image.merge('LA', (Image.fromarray(grey8, 'L'), Image.new('L', rgb.size, 7)))
    expected = Image.fromarray(grey8, 'L').convert('RGB')  # alpha dropped
  elif mode == 'P':
    image = rgb.quantize(64)
    expected = image.convert('RGB')
  else:  # PA: a palette picture with its own alpha
    palette = rgb.quantize(64)
    image = palette.copy()
    image.putalpha(Image.new('L', rgb.size, 9))
    assert image.mode == 'PA'
    expected = palette.convert('RGB')
  np.testing.assert_array_equal(np.asarray(predict.to_rgb8(image)), np.asarray(expected))
  if mode == 'I;16':  # and through a 16-bit PNG file, against the 8-bit PNG of the same grey
    image.save(tmp_path / 'wide.png')
    Image.fromarray(grey8, 'L').save(tmp_path / 'narrow.png')
    with Image.open(tmp_path / 'wide.png') as reopened:
      assert reopened.mode in ('I;16', 'I')
    np.testing.assert_array_equal(predict.load_image(str(tmp_path / 'wide.png')),
                                  predict.load_image(str(tmp_path / 'narrow.png')))


def test_an_image_too_large_to_decode_safely_is_a_predict_error(tmp_path, monkeypatch):
  """Issue 20 (7): a DecompressionBombError traceback; the limit is lowered instead of writing a
  15000x15000 picture."""
  Image.fromarray(_picture()).save(tmp_path / 'huge.png')
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # 24x40 is over twice this: an error
  with pytest.raises(predict.PredictError, match='too large'):
    predict.load_image(str(tmp_path / 'huge.png'))


@pytest.mark.slow  # runs the command in a subprocess (nothing is computed: it stops before)
def test_a_csv_in_a_missing_folder_is_refused_before_any_compute(tmp_path):
  """Issue 20 (8): it computed every prediction, then failed with a traceback. The model named
  does not exist: the CSV's refusal coming first shows nothing was loaded before it."""
  Image.fromarray(_picture()).save(tmp_path / 'a.png')
  result = run_command('predict', f'--model={tmp_path / "absent.jax"}', str(tmp_path / 'a.png'),
                       f'--csv={tmp_path / "missing_dir" / "p.csv"}')
  error = one_line_error(result)
  assert 'missing_dir' in error and '--csv' in error, error
  assert not [line for line in result.stderr.splitlines() if line.startswith('E')], result.stderr
