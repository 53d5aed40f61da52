"""Inference speed on this CPU: the library, its exported files, and PyTorch, on the same weights.

From the repository root:

  OMP_WAIT_POLICY=PASSIVE python benchmarks/inference_cpu.py --json_out=inference_cpu.json
  python benchmarks/inference_cpu.py --workdir=runs/cifar10      # a run's weights, not random ones

Every contender maps the same uint8 NHWC batch to logits with the same SE-ResNet18 weights
(the outputs are compared, and the script stops if any differs by more than 1e-4 of the largest
logit), in one process, in interleaved rounds; each figure is the median over rounds and each ratio
the median of per-round ratios, so load from other processes hits all contenders alike.

- jax_eval_step: the library's evaluation step (`steps.make_eval_step`: forward plus loss, top-5
  and metrics), the "JAX eval" column of BENCHMARKS.md's training tables (101.6 img/s there).
- jax_jit: plain `jax.jit` of the eval-mode network (BatchNorm as BatchNorm, XLA's default CPU
  compilation, not the library's compile policy), uint8 in.
- jax_jit_folded: the same with BatchNorm folded into the convolutions (`inference_function`).
- jax_jit_tuned: the folded function compiled by `inference.compile_inference`, with the library's
  compile policy (`se_resnet_jax.compilation`): the library's inference path (predict uses it).
- jax_export: the `--format=jax` file loaded with jax alone and called as the README shows.
- jax_export_tuned: the same file compiled with the compile policy (what
  `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` gives the README's snippet).
- onnxruntime: the `--format=onnx` file in ONNX Runtime (one intra-op thread per core, no
  spin-waiting, as OMP_WAIT_POLICY=PASSIVE asks of PyTorch).
- torch: `se_resnet_jax.torch_models.SEResNet18` with the converted weights, eager, channels-last,
  `inference_mode`, one thread per core; it gets the uint8 batch too (the NHWC array is a
  channels-last NCHW view) and normalises it, as the others do inside their function.

Batch 1 is latency: milliseconds per single-image call. PyTorch and onnxruntime are optional
(`pip install -e .[torch,export]`); a missing one is skipped with a note.
"""

import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from typing import Callable

if __package__ in (None, ''):  # run as a script: make `se_resnet_jax` importable from the checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import se_resnet_jax  # noqa: E402
from benchmarks import machine  # noqa: E402
from se_resnet_jax import compilation, export, inference, models, rundir, steps  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('batch_sizes', ['128', '1'], 'Batch sizes; 1 is reported as latency.')
flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds (the median is reported).')
flags.DEFINE_float('min_round_s', 2.0, 'Each contender runs enough calls per round to take at '
                   'least this long.')
flags.DEFINE_string('workdir', None, "A run's checkpoint instead of random SE-ResNet18 weights.")
flags.DEFINE_string('checkpoint', 'best', 'With --workdir: which checkpoint.')
flags.DEFINE_string('json_out', None, 'Also write every figure, with per-round times, as JSON.')

AGREEMENT = 1e-4  # max |logits - jax_jit logits| allowed, relative to the largest logit


def weights() -> tuple:
  """(model, eval variables, mean, std, where they came from)."""
  if FLAGS.workdir:
    run = rundir.restore_run(FLAGS.workdir, FLAGS.checkpoint)
    return (run.model, run.variables, run.record.mean, run.record.std,
            f'{FLAGS.workdir} ({FLAGS.checkpoint})')
  model = models.SEResNet18(num_classes=10, se_reduction=16, dropout_rate=0.3)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                         train=False))()
  rs = np.random.RandomState(1)  # BatchNorm statistics and scales away from their initial 0/1

  def perturb(path, x):
    if path[-1].key in ('scale', 'mean', 'var', 'bias') and x.ndim == 1:
      return x * rs.uniform(0.5, 1.5, x.shape).astype(x.dtype) + rs.uniform(0, 0.1, x.shape)
    return x

  variables = jax.tree_util.tree_map_with_path(perturb, jax.device_get(variables))
  return (model, variables, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
          'random SE-ResNet18 weights (BatchNorm statistics perturbed)')


def jax_contenders(model, variables, mean, std, batch: int) -> dict:
  x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8)
  unfolded = inference.inference_function(model, variables, mean, std, fold=False)
  folded = inference.inference_function(model, variables, mean, std)
  data, _ = export.export_jax(folded, ('cpu',))
  exported = jax.export.deserialize(bytearray(data))
  config = ml_collections.ConfigDict({'half_precision': False, 'tta_flip': False})
  eval_step = steps.make_eval_step(config, model, mean, std)
  labels, mask = np.zeros(batch, np.int32), np.ones(batch, bool)

  def run_eval_step(images):  # the evaluation's predictions, not logits: checked by argmax
    return jax.block_until_ready(eval_step(variables, images, labels, mask)[1])

  compiled = {'jax_jit': jax.jit(unfolded).lower(x).compile(),
              'jax_jit_folded': jax.jit(folded).lower(x).compile(),
              'jax_jit_tuned': inference.compile_inference(folded, batch),
              'jax_export': jax.jit(exported.call).lower(x).compile(),
              'jax_export_tuned': inference.compile_inference(exported.call, batch)}
  return {'jax_eval_step': run_eval_step,
          **{name: (lambda images, c=c: jax.block_until_ready(c(images)[0]))
             for name, c in compiled.items()}}


def onnx_contender(model, variables, mean, std) -> Callable:
  import onnxruntime as ort

  data, _ = export.export_onnx(inference.inference_function(model, variables, mean, std), {})
  options = ort.SessionOptions()
  options.intra_op_num_threads = machine.cores()
  options.log_severity_level = 3
  options.add_session_config_entry('session.intra_op.allow_spinning', '0')
  session = ort.InferenceSession(data, options, providers=['CPUExecutionProvider'])
  return lambda images: session.run(['logits'], {'images': images})[0]


def torch_contender(model, variables, mean, std) -> Callable:
  import torch

  from se_resnet_jax import convert, torch_models

  torch.set_num_threads(machine.cores())
  options = {k: getattr(model, k) for k in ('num_classes', 'num_filters', 'se_reduction',
                                             'dropout_rate')}
  twin = torch_models.create_model(convert._model_name(model), **options)  # noqa: SLF001
  twin.load_state_dict(convert.flax_to_torch(variables, model))
  twin.eval().to(memory_format=torch.channels_last)
  mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std))

  def run(images):
    with torch.inference_mode():
      x = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC memory: channels-last NCHW
      return twin(x.float().div_(255).sub_(mean_t).div_(std_t)).numpy()

  return run


def measure(contenders: dict, images: np.ndarray) -> dict:
  """Seconds per call of every contender, per round, in interleaved rounds."""
  for run in contenders.values():
    run(images)  # warm-up
  calls = {}
  for name, run in contenders.items():
    start = time.perf_counter()
    run(images)
    calls[name] = max(1, math.ceil(FLAGS.min_round_s / (time.perf_counter() - start)))
  per_round = {name: [] for name in contenders}
  for _ in range(FLAGS.rounds):
    for name, run in contenders.items():
      start = time.perf_counter()
      for _ in range(calls[name]):
        run(images)
      per_round[name].append((time.perf_counter() - start) / calls[name])
  return per_round


def environment() -> dict:
  versions = {'jax': jax.__version__, 'se_resnet_jax': se_resnet_jax.__version__,
              'python': platform.python_version()}
  for name in ('torch', 'onnxruntime', 'jax2onnx'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {'cpu': machine.cpu_model(), 'vector_extensions': machine.cpu_vector_extensions(),
          'cores': machine.cores(), 'versions': versions,
          'load_average_1min': machine.load_average(),
          'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
          'OMP_WAIT_POLICY': os.environ.get('OMP_WAIT_POLICY', ''),
          'compile_policy': compilation.compiler_options(),
          'date': time.strftime('%Y-%m-%d'), 'command': ' '.join(sys.argv)}


def main(argv):
  del argv
  model, variables, mean, std, source = weights()
  env = environment()
  others, notes = {}, []
  for name, make in (('onnxruntime', onnx_contender), ('torch', torch_contender)):
    try:
      others[name] = make(model, variables, mean, std)
    except ImportError as e:
      notes.append(f'{name} skipped: {e}')
  rows = []
  for batch in (int(b) for b in FLAGS.batch_sizes):
    images = np.random.RandomState(batch).randint(0, 256, (batch, 32, 32, 3), np.uint8)
    contenders = {**jax_contenders(model, variables, mean, std, batch), **others}
    outputs = {name: np.asarray(run(images)) for name, run in contenders.items()}
    reference = outputs['jax_jit']
    if not np.array_equal(outputs.pop('jax_eval_step'), reference.argmax(-1)):
      raise AssertionError('The evaluation step predicts other classes than jax_jit.')
    scale = max(1.0, float(np.abs(reference).max()))
    agreement = {name: float(np.abs(out - reference).max()) for name, out in outputs.items()}
    bad = {k: v for k, v in agreement.items() if v > AGREEMENT * scale}
    if bad:
      raise AssertionError(f'Contenders disagree with jax_jit at batch {batch}: {bad}')
    per_round = measure(contenders, images)
    row = {'batch': batch, 'max_abs_logit_diff_vs_jax_jit': agreement, 'round_s': per_round,
           'images_per_s': {n: batch / np.median(t) for n, t in per_round.items()},
           'ms_per_call': {n: 1000 * np.median(t) for n, t in per_round.items()}}
    if 'torch' in per_round:
      row['vs_torch'] = {n: float(np.median(np.array(per_round['torch']) / np.array(t)))
                         for n, t in per_round.items()}
    rows.append(row)
  env['load_average_1min_end'] = machine.load_average()
  print(f'CPU: {env["cpu"]} ({env["vector_extensions"]}), {env["cores"]} cores; '
        f'weights: {source}')
  print(f'Versions: {env["versions"]}; XLA_FLAGS={env["XLA_FLAGS"]!r}, OMP_WAIT_POLICY='
        f'{env["OMP_WAIT_POLICY"]!r}; compile policy {env["compile_policy"]}; load average '
        f'{env["load_average_1min"]:.1f} at start, {env["load_average_1min_end"]:.1f} at end ('
        f'{machine.load_verdict(env["load_average_1min"])})')
  names = list(rows[0]['ms_per_call'])
  print('\n| batch | figure | ' + ' | '.join(names) + ' |')
  print('|---|---|' + '---|' * len(names))
  for row in rows:
    if row['batch'] == 1:
      cells = [f'{row["ms_per_call"][n]:.1f} ms' for n in names]
      figure = 'latency'
    else:
      cells = [f'{row["images_per_s"][n]:.1f} img/s' for n in names]
      figure = 'throughput'
    print(f'| {row["batch"]} | {figure} | ' + ' | '.join(cells) + ' |')
    if 'vs_torch' in row:
      print(f'| {row["batch"]} | vs torch | '
            + ' | '.join(f'{row["vs_torch"][n]:.2f}x' for n in names) + ' |')
  for note in notes:
    print(note)
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as f:
      json.dump({'environment': env, 'weights': source, 'rows': rows, 'notes': notes}, f,
                indent=2, default=float)


if __name__ == '__main__':
  app.run(main)
