"""Exports a trained run as a file that runs without this library: jax.export or ONNX.

  python -m se_resnet_jax.export --workdir=runs/cifar10 --format=jax --out=cifar10.jax
  python -m se_resnet_jax.export --workdir=runs/cifar10 --format=onnx --out=cifar10.onnx

Either file is `inference.inference_function`: uint8 RGB images (N, 32, 32, 3), any N, to float32
(logits, probabilities). `FILE.json` beside it is its model card. Before anything is written the
exported file is loaded back and its outputs on generated images are compared with the library's
own; outside the tolerance nothing is written. The check needs no dataset, so a run whose data has
moved still exports.
"""

import importlib.util
import json
import logging as std_logging
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import se_resnet_jax
from se_resnet_jax import cli, compilation, files, inference, rundir
from se_resnet_jax.errors import UserError
from se_resnet_jax.models import IMAGE_SHAPE

FLAGS = flags.FLAGS

FORMATS = ('jax', 'onnx')
# jax.export lowers for these where the installed jax can (a TPU lowering needs no TPU).
PLATFORMS = ('cpu', 'cuda', 'tpu')
CHECK_IMAGES = 256
# Folding BatchNorm and another runtime's kernels change float rounding only: at most 8e-7 on the
# logits of a full-width SE-ResNet18 (benchmarks/inference_cpu.py), 2e-7 on the tests' tiny run.
LOGITS_RTOL = 1e-4  # max |logits - library logits| <= LOGITS_RTOL * max(1, max |library logits|)
PROBABILITIES_ATOL = 1e-5
ONNX_OPSET = 18  # ONNX Runtime >= 1.14 reads it


class ExportError(UserError):
  """An export that cannot be made or does not compute what the library computes."""


def check_destination(out: str, overwrite: bool) -> None:
  """Refuses an --out or its OUT.json that exists (unless overwriting) or cannot be written."""
  for path in (out, out + '.json'):
    files.check_output(path, '--out', overwrite)


def compare(outputs: tuple, reference: tuple) -> dict:
  """The differences between an export's outputs and the library's, and whether they pass."""
  logits, probabilities = (np.asarray(o, np.float64) for o in outputs)
  ref_logits, ref_probabilities = (np.asarray(r, np.float64) for r in reference)
  logits_bound = LOGITS_RTOL * max(1.0, float(np.abs(ref_logits).max()))
  result = {'max_abs_diff_logits': float(np.abs(logits - ref_logits).max()),
            'max_abs_diff_probabilities': float(np.abs(probabilities - ref_probabilities).max()),
            'tolerance_logits': logits_bound, 'tolerance_probabilities': PROBABILITIES_ATOL,
            'top1_agreement': float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1)))}
  result['passed'] = bool(result['max_abs_diff_logits'] <= logits_bound
                          and result['max_abs_diff_probabilities'] <= PROBABILITIES_ATOL
                          and np.all(np.isfinite(logits)))
  return result


def lowering_platforms() -> tuple:
  """The platforms of PLATFORMS the installed jax can lower a convolution network for."""
  probe = compilation.jit(lambda x: jax.lax.conv(x, jnp.ones((1, 1, 1, 1)), (1, 1), 'SAME'))
  usable = []
  for platform in PLATFORMS:
    try:
      jax.export.export(probe, platforms=(platform,))(jax.ShapeDtypeStruct((1, 1, 2, 2),
                                                                           jnp.float32))
      usable.append(platform)
    except Exception as e:  # noqa: BLE001 - a platform this jax cannot lower for is left out
      logging.info('Not lowering for %s: %s', platform, str(e).splitlines()[0][:200])
  return tuple(usable)


def input_spec() -> jax.ShapeDtypeStruct:
  batch, = jax.export.symbolic_shape('batch')
  return jax.ShapeDtypeStruct((batch,) + IMAGE_SHAPE, jnp.uint8)


def export_jax(infer: Callable, platforms: tuple) -> tuple:
  """(serialized bytes, runner of those bytes) of a jax.export of `infer`."""
  exported = jax.export.export(compilation.jit(infer), platforms=platforms)(input_spec())
  data = bytes(exported.serialize())
  return data, load_exported(data)[0]


def load_exported(data: bytes) -> tuple:
  """(runner images -> (logits, probabilities), inputs as (dtype, shape), output shapes, metadata,
  description) of an exported file, for the check and predict; ValueError for neither format."""
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception:  # noqa: BLE001 - not a jax.export artifact: perhaps ONNX
    exported = None
  if exported is not None:
    run = compilation.jit(exported.call)
    return (lambda images: jax.device_get(run(images)),
            [(str(a.dtype), a.shape) for a in exported.in_avals],
            [a.shape for a in exported.out_avals], {},
            f'jax.export ({", ".join(exported.platforms)})')
  import onnxruntime as ort

  options = ort.SessionOptions()
  options.log_severity_level = 4  # a file that is no model ends in one line, not ORT's log
  try:
    session = ort.InferenceSession(data, options, providers=['CPUExecutionProvider'])
  except Exception as e:  # noqa: BLE001 - whatever ORT says, the file is no model to use
    raise ValueError(f'neither a jax.export artifact nor an ONNX model ({e})') from None
  return (lambda images: session.run(None, {'images': images}),
          [({'tensor(uint8)': 'uint8'}.get(i.type, i.type), i.shape) for i in session.get_inputs()],
          [o.shape for o in session.get_outputs()], session.get_modelmeta().custom_metadata_map,
          'ONNX Runtime')


def export_onnx(infer: Callable, metadata: dict) -> tuple:
  """(serialized ONNX model, runner of it in ONNX Runtime) of `infer`, via jax2onnx."""
  import onnx

  logger = std_logging.getLogger('jax2onnx')
  level = logger.level
  logger.setLevel(std_logging.ERROR)  # not a warning per absent optional plugin (equinox, dm-pix)
  try:
    from jax2onnx import to_onnx

    proto = to_onnx(infer, inputs=[input_spec()], model_name='se_resnet_jax', opset=ONNX_OPSET,
                    input_names=['images'], output_names=['logits', 'probabilities'])
  finally:
    logger.setLevel(level)
  # jax2onnx annotates some intermediate values with NCHW shapes that are NHWC; the annotations
  # are optional and ONNX Runtime warns about each, so the runtime infers them instead.
  del proto.graph.value_info[:]
  proto.doc_string = 'se_resnet_jax classifier: uint8 NHWC RGB images -> logits, probabilities'
  for key, value in metadata.items():
    proto.metadata_props.add(key=key, value=json.dumps(value))
  onnx.checker.check_model(proto)
  data = proto.SerializeToString()
  return data, load_exported(data)[0]


def model_card(run: rundir.Run, workdir: str, fmt: str, out: str, check: dict) -> dict:
  """The JSON written beside the export: what a user of the file needs to know."""
  record = run.record
  num_classes = len(record.class_names)
  accuracy, source = rundir.report_test_accuracy(workdir, run.step, run.run_id)
  return {
      'format': {'jax': 'jax.export', 'onnx': 'onnx'}[fmt],
      'file': os.path.basename(out),
      'library': {'name': 'se_resnet_jax', 'version': se_resnet_jax.__version__},
      'jax_version': jax.__version__,
      'model': record.architecture,
      'dataset': run.config.dataset,
      'checkpoint': {'which': run.checkpoint, 'step': run.step, 'run_id': run.run_id},
      'test_accuracy': accuracy,
      'test_accuracy_source': (
          f'{source} of the run (it names these weights)' if source else
          f'none: no report of step {run.step}; `python -m se_resnet_jax.evaluate '
          f'--checkpoint={run.step}` measures it'),
      'class_names': list(record.class_names),
      'input': {'name': 'images', 'dtype': 'uint8', 'shape': [None, *IMAGE_SHAPE],
                'layout': 'NHWC', 'channels': 'RGB', 'range': [0, 255]},
      'outputs': [{'name': 'logits', 'dtype': 'float32', 'shape': [None, num_classes]},
                  {'name': 'probabilities', 'dtype': 'float32', 'shape': [None, num_classes]}],
      'preprocessing': {'inside': 'x / 255, then (x - mean) / std per channel',
                        'mean': record.mean, 'std': record.std,
                        'tta_flip': bool(run.config.tta_flip)},
      'batch_norm': 'folded into the convolutions',
      'compute_dtype': 'float32',
      'check': check,
  }


def export_run(workdir: str, fmt: str, out: str, checkpoint: str = 'best',
               overwrite: bool = False, config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """Writes `out` and `out.json` once the export computes what the library does; the card."""
  if fmt not in FORMATS:
    raise ExportError(f'--format must be one of {", ".join(FORMATS)}, got {fmt!r}.')
  check_destination(out, overwrite)  # before any compute, as the ONNX packages' presence
  missing = [n for n in ('jax2onnx', 'onnx', 'onnxruntime') if importlib.util.find_spec(n) is None]
  if fmt == 'onnx' and missing:
    raise ExportError(f'--format=onnx needs {", ".join(missing)}: pip install '
                      '"se_resnet_jax[export]".')
  run = rundir.restore_run(workdir, checkpoint, config)
  tta_flip = bool(run.config.tta_flip)
  mean, std = run.record.mean, run.record.std
  infer = inference.inference_function(run.model, run.variables, mean, std, tta_flip=tta_flip)
  # Fixed random images: every pixel value and colour occurs, whatever the run's data.
  images = np.random.RandomState(0).randint(0, 256, (CHECK_IMAGES, *IMAGE_SHAPE)).astype(np.uint8)
  card = model_card(run, workdir, fmt, out, {})
  if fmt == 'jax':
    card['platforms'] = list(lowering_platforms())
    data, execute = export_jax(infer, tuple(card['platforms']))
  else:
    card['onnx_opset'] = ONNX_OPSET
    data, execute = export_onnx(infer, {
        'class_names': card['class_names'], 'test_accuracy': card['test_accuracy'],
        'library_version': se_resnet_jax.__version__, 'input_layout': 'NHWC uint8 RGB'})
  result = compare(execute(images), inference.reference_outputs(
      run.model, run.variables, mean, std, images, tta_flip))
  card['check'] = {'images': len(images), 'source': 'generated', **result}
  if not result['passed']:
    raise ExportError(
        f'The {fmt} export does not compute what the library does: on {len(images)} generated '
        f'images max |logits diff| {result["max_abs_diff_logits"]:.3g} (allowed '
        f'{result["tolerance_logits"]:.3g}), max |probabilities diff| '
        f'{result["max_abs_diff_probabilities"]:.3g} (allowed {PROBABILITIES_ATOL:g}). Nothing '
        'was written.')
  check_destination(out, overwrite)  # again: the file may have appeared while this computed
  files.write_output(out, data, '--out', overwrite)
  files.write_json_atomic(out + '.json', card)
  logging.info('Wrote %s (%d bytes) and %s', out, len(data), out + '.json')
  return card


def define_flags() -> None:
  """The command's flags; defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'The training run directory.')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest', or a step number.")
  flags.DEFINE_enum('format', None, list(FORMATS), 'jax: a jax.export serialized function '
                    '(loads with jax alone); onnx: an ONNX model (needs the export extra).')
  flags.DEFINE_string('out', None, 'The file to write; its model card goes to OUT.json.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out (and OUT.json) if they exist.')
  config_flags.DEFINE_config_file('config', None, 'Config file; default: workdir/config.json.')
  flags.mark_flags_as_required(['workdir', 'format', 'out'])


def main(argv):
  def command():
    card = export_run(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.checkpoint, FLAGS.overwrite,
                      FLAGS.config)
    check, accuracy, run_id = card['check'], card['test_accuracy'], card['checkpoint']['run_id']
    print(f'Wrote {FLAGS.out} ({card["format"]}) and {FLAGS.out}.json: '
          f'{card["model"]["name"]}, {len(card["class_names"])} classes, checkpoint '
          f'{card["checkpoint"]["which"]} (step {card["checkpoint"]["step"]}'
          f'{f", run {run_id}" if run_id else ""}), test accuracy '
          f'{"not measured for these weights" if accuracy is None else f"{accuracy:.4f}"}.')
    print(f'Checked on {check["images"]} {check["source"]} images against the library: max '
          f'|logits diff| {check["max_abs_diff_logits"]:.2g} (allowed '
          f'{check["tolerance_logits"]:.2g}), max |probabilities diff| '
          f'{check["max_abs_diff_probabilities"]:.2g} (allowed {check["tolerance_probabilities"]:g}'
          f'), top-1 agreement {check["top1_agreement"]:.2%}.')

  cli.run(argv, command)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
