"""One command, one table: SE-ResNet18 training and evaluation speed in JAX against PyTorch.

From the repository root (the same command on CPU, GPU or TPU):

  python benchmarks/benchmark.py                   # the whole table
  python benchmarks/benchmark.py --quick           # batch 128, fp32, one round: a smoke run
  python -m benchmarks.benchmark --batch_sizes=128,512 --dtypes=fp32 --json_out=bench.json
  python benchmarks/benchmark.py --batch_sizes=512 --dtypes=bf16 --time_budget_s=120 \
      --jsonl_out=bench.jsonl                      # stops in time, keeps every figure so far

By default it measures batch 128 and 512 in fp32 and bf16 on a GPU or TPU, and batch 128 only on a
CPU, where one step at batch 512 takes most of a minute on 2 cores and the whole table over an
hour; --batch_sizes overrides either default. On a CPU shared with other jobs, run it with
OMP_WAIT_POLICY=PASSIVE: PyTorch's spin-waiting OpenMP threads otherwise lose several times their
speed to the other jobs, which would flatter JAX.

How it measures, and why:
- "JAX train" is the library's step as `train.train_and_evaluate` compiles it
  (`steps.make_train_step`: `sharding.sample_batch` then `steps.train_step`, the state donated) on
  the shipped CIFAR-10 recipe (configs/cifar10.py): each step draws its batch from the
  device-resident uint8 training set and augments it on the device, so the figure includes the
  input pipeline.
- "JAX pre-made" is the same step fed a pre-made uint8 batch with augmentation off (only the /255
  and normalisation remain); 1 - (pre-made step time / train step time) is the share of the step
  spent on sampling and augmentation.
- PyTorch runs exactly the same network (`se_resnet_jax.torch_models`, the same function as the
  Flax model; parameter count checked) on a pre-made float batch already on the device, so it gets
  no input pipeline at all: the JAX/PyTorch ratios are conservative.
- All contenders of one batch size and dtype are timed in interleaved rounds in one process, and
  each ratio is the median of per-round ratios: load from other processes on a shared machine then
  hits both sides alike instead of whichever happened to run while the machine was busy.
- On a CPU, the library's compile policy (`se_resnet_jax.compilation`) is timed against XLA's
  defaults in the same rounds: "JAX train (XLA defaults)" and "JAX eval (XLA defaults)" are the same
  steps compiled without the policy's options (--nocompare_xla_defaults leaves them out).
- The 1-minute load average is read at the start (and at the end, which counts the benchmark's own
  threads); above half the cores at the start the output says "machine loaded": its figures do not
  hold for a quiet machine.
- FLOPs per image come from XLA's cost analysis of the compiled pre-made step: forward, backward
  and the SGD update, whose share is below 0.1%. Utilisation is measured against a per-chip bf16
  dense peak; a CPU has no entry and shows n/a.
- Each figure is written as soon as it exists: with --jsonl_out, one JSON line per timing round
  (the configuration's figures so far) and one per finished configuration, and the table of the
  finished configurations is printed after each. With --time_budget_s no new round, torch.compile
  or configuration starts once the budget is spent: a run cut short still reports what it measured
  (a configuration with at least one round; its row says how many).
"""

import functools
import gc
import json
import math
import os
import platform
import sys
import threading
import time
from typing import Callable, Optional

if __package__ in (None, ''):  # run as a script: make `benchmarks` and `configs` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jaxlib  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import machine  # noqa: E402
from configs import cifar10  # noqa: E402
from se_resnet_jax import compilation, input_pipeline, sharding, steps  # noqa: E402
from se_resnet_jax.config import build_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('batch_sizes', None, 'Global batch sizes to measure (default: 128,512 on a '
                  'GPU/TPU, 128 on a CPU).')
flags.DEFINE_list('dtypes', ['fp32', 'bf16'], 'Compute dtypes: fp32 and/or bf16 (fp32 parameters).')
flags.DEFINE_bool('quick', False, 'One timed round, a short minimum round time; unless given, '
                  '--batch_sizes=128 --dtypes=fp32 --notorch_compile. For smoke runs, not for '
                  'quoting.')
flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds per configuration (median taken).')
flags.DEFINE_float('min_round_s', 2.0, 'Each contender runs enough steps per round to take at '
                   'least this long (at least one step).')
flags.DEFINE_bool('torch', True, 'Measure the PyTorch reference (needs the `torch` extra).')
flags.DEFINE_bool('torch_compile', True, 'Include torch.compile (slow to compile on CPU).')
flags.DEFINE_string('json_out', None, 'Also write every figure, with per-round times, as JSON.')
flags.DEFINE_string('jsonl_out', None, 'Append each measurement to this file as a JSON line as '
                    'soon as it exists (every round, every finished configuration).')
flags.DEFINE_float('time_budget_s', None, 'Start no round, torch.compile or configuration after '
                   'this many seconds; report what was measured.')
flags.DEFINE_bool('compare_xla_defaults', True, 'Where the compile policy sets options (a CPU), '
                  'also time the train and eval steps compiled with XLA\'s defaults.')
flags.DEFINE_integer('num_filters', 64, 'Base width of the network (64: SE-ResNet18 as shipped; '
                     'smaller for smoke runs).')

DTYPES = ('fp32', 'bf16')
# Dense bf16 peak FLOP/s per chip, keyed by a substring of jax's device_kind.
PEAK_BF16_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v4': 275e12,
                   'TPU v5 lite': 197e12, 'TPU v5e': 197e12}
MIB = 2**20


class PeakRSS:
  """Highest resident set size seen while active, sampled every 5 ms, above the level at entry.

  The CPU backend has no allocator statistics, and getrusage's maximum is a high-water mark for the
  whole process, so it cannot tell one configuration from the previous one.
  """

  def __init__(self):
    self._page = os.sysconf('SC_PAGE_SIZE')
    self._stop = threading.Event()
    self.base = self.peak = self._rss()

  def _rss(self) -> int:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * self._page

  def _sample(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, self._rss())

  def __enter__(self):
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._rss())

  @property
  def delta(self) -> int:
    return self.peak - self.base


class Contender:
  """A step to time: `run(n)` runs n steps and waits for them; figures kept per round."""

  def __init__(self, name: str, images_per_step: int, run: Callable[[int], None],
               warm_step_s: float):
    self.name, self.images_per_step, self.run = name, images_per_step, run
    self.warm_step_s = warm_step_s  # one step after warm-up, to size the rounds
    self.steps = 1
    self.round_s = []  # seconds per step, one entry per round

  def calibrate(self, min_round_s: float):
    self.steps = max(1, math.ceil(min_round_s / self.warm_step_s))

  def time_round(self):
    start = time.perf_counter()
    self.run(self.steps)
    self.round_s.append((time.perf_counter() - start) / self.steps)

  @property
  def images_per_s(self) -> float:
    return self.images_per_step / median(self.round_s)


def timed(run: Callable[[int], None]) -> float:
  start = time.perf_counter()
  run(1)
  return time.perf_counter() - start


def median(values):
  values = sorted(values)
  mid = len(values) // 2
  return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


class Deadline:
  """The --time_budget_s, counted from the start of the run; without one it never passes."""

  def __init__(self, budget_s: Optional[float]):
    self.end = None if budget_s is None else time.perf_counter() + budget_s

  def passed(self) -> bool:
    return self.end is not None and time.perf_counter() >= self.end


def emit(event: str, record: dict) -> None:
  """One JSON line in --jsonl_out, flushed at once, so a killed run keeps it."""
  if FLAGS.jsonl_out:
    with open(FLAGS.jsonl_out, 'a') as f:
      f.write(json.dumps({'event': event, 'time': time.time(), **record}) + '\n')


def benchmark_config(batch_size: int, dtype: str, num_filters: int = 64):
  """The shipped CIFAR-10 recipe at this batch size, compute dtype (and width)."""
  config = cifar10.get_config()
  config.model.num_filters = num_filters
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.half_precision = dtype == 'bf16'
  return config


def random_split(num_images: int, seed: int):
  rs = np.random.RandomState(seed)
  return input_pipeline.Split(rs.randint(0, 256, (num_images, 32, 32, 3), np.uint8),
                              rs.randint(0, 10, num_images).astype(np.int32))


def jax_contenders(config, mean: tuple, std: tuple) -> tuple:
  """The library's train step (with and without on-device input) and eval step, compiled."""
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  replicated = NamedSharding(mesh, P())
  batch, per_device = config.batch_size, config.batch_size // mesh.size
  steps_per_epoch = 4
  model = build_model(config, 10)
  tx = steps.create_optimizer(config, steps.create_learning_rate_schedule(config, steps_per_epoch))
  images, labels = sharding.shard_train_split(random_split(steps_per_epoch * batch, 0), mesh)
  perm = sharding.make_epoch_permutation(mesh, images.shape[1])(jax.random.key(1), 0)
  step_rng = jax.random.key(2)
  init = compilation.jit(functools.partial(steps.create_train_state, config, model, tx,
                                           (32, 32, 3)), out_shardings=replicated,
                         cpu_options={'xla_backend_optimization_level': 0})
  empty_metrics = jax.device_put(steps.Metrics.empty(), replicated)
  figures = {}

  # The training loop's own compiled step: sample and augment on the device, then update.
  sampled_step = steps.make_train_step(config, steps_per_epoch, per_device)
  mean_std = jax.device_put(steps.normalization(mean, std), replicated)

  premade_config = ml_collections.ConfigDict(config.to_dict())
  premade_config.augment.enabled = False
  x_premade, y_premade = compilation.jit(
      functools.partial(sharding.sample_batch, per_device=per_device))(images, labels, perm, 0)

  @functools.partial(compilation.jit, donate_argnums=(0,))
  def premade_step(state, train_metrics, x, y, step_rng):
    return steps.train_step(state, train_metrics, x, y, jax.random.fold_in(step_rng, state.step),
                            config=premade_config, mean=mean, std=std)

  def compiled_runner(step_fn, args, measure_memory: bool, count_flops: bool):
    state = init()
    start = time.perf_counter()
    compiled = step_fn.lower(state, empty_metrics, *args).compile()
    compile_s = time.perf_counter() - start
    with PeakRSS() as rss:
      carry = compiled(state, empty_metrics, *args)
      jax.block_until_ready(carry)
    if count_flops:  # this step is forward + backward + SGD update (+ /255 and normalise)
      analysis = compiled.cost_analysis()
      analysis = analysis[0] if isinstance(analysis, list) else analysis  # older jax: a list
      figures['train_flops_per_image'] = float(analysis['flops']) / batch
    if measure_memory:
      mem = compiled.memory_analysis()
      stats = jax.devices()[0].memory_stats()
      figures.update(
          compile_s=compile_s,
          step_memory_mib=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                           + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / MIB,
          peak_memory_mib=(stats['peak_bytes_in_use'] if stats else rss.delta) / MIB,
          peak_memory_source='device peak_bytes_in_use' if stats else 'process RSS growth')

    def run(n):
      nonlocal carry
      for _ in range(n):
        carry = compiled(*carry, *args)
      jax.block_until_ready(carry)

    return run, timed(run)

  train_runner = compiled_runner(sampled_step, (images, labels, perm, step_rng, mean_std),
                                 measure_memory=True, count_flops=False)
  premade_runner = compiled_runner(premade_step, (x_premade, y_premade, step_rng),
                                   measure_memory=False, count_flops=True)

  params = jax.eval_shape(init).params
  figures['params'] = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  eval_step = steps.make_eval_step(config, model, mean, std)
  variables = steps.eval_variables(init())
  chunk = [a[0] for a in sharding.shard_eval_split(random_split(batch, 3), mesh, batch)]
  start = time.perf_counter()
  jax.block_until_ready(eval_step(variables, *chunk))
  figures['eval_compile_s'] = time.perf_counter() - start

  def eval_runner(step):
    def run_eval(n):
      for _ in range(n):
        out = step(variables, *chunk)
      jax.block_until_ready(out)
    return run_eval, timed(run_eval)

  contenders = [Contender('jax_train', batch, *train_runner),
                Contender('jax_premade', batch, *premade_runner),
                Contender('jax_eval', batch, *eval_runner(eval_step))]
  if FLAGS.compare_xla_defaults and compilation.compiler_options():
    with compilation.xla_defaults():
      default_step = steps.make_train_step(config, steps_per_epoch, per_device)
      default_eval = steps.make_eval_step(config, model, mean, std)
    contenders += [
        Contender('jax_train_xla_defaults', batch,
                  *compiled_runner(default_step, (images, labels, perm, step_rng, mean_std),
                                   measure_memory=False, count_flops=False)),
        Contender('jax_eval_xla_defaults', batch, *eval_runner(default_eval))]
  return contenders, figures


def torch_contenders(config, dtype: str, deadline: Deadline) -> tuple:
  """PyTorch eager, channels-last and torch.compile train steps on a pre-made batch."""
  import torch

  from benchmarks import torch_step as ts
  from se_resnet_jax import torch_models

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  batch = config.batch_size
  figures = {}
  modes = [('torch_eager', False, False), ('torch_channels_last', True, False)]
  if FLAGS.torch_compile:
    modes.append(('torch_compile', True, True))
  contenders = []
  for name, channels_last, compile_model in modes:
    if compile_model and deadline.passed():
      figures[f'{name}_error'] = 'skipped: the time budget was spent'
      continue
    torch.manual_seed(0)
    model = torch_models.create_model(
        config.model.name, num_classes=10, num_filters=config.model.num_filters,
        se_reduction=config.model.se_reduction,
        dropout_rate=config.model.dropout_rate).to(device)  # before fused SGD
    figures['params'] = torch_models.count_parameters(model)  # measure() compares with JAX's
    optimizer = ts.make_optimizer(config, model)
    step = ts.make_train_step(model, optimizer, channels_last=channels_last,
                              compile_model=compile_model, bf16=dtype == 'bf16', device=device,
                              label_smoothing=config.label_smoothing)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def run(n, step=step, x=x, y=y, sync=sync):
      for _ in range(n):
        step(x, y)
      sync()

    try:
      first_s = timed(run)  # compiles under torch.compile, warms caches otherwise
      warm_s = timed(run)
    except Exception as e:  # noqa: BLE001 - a failed backend is reported, not fatal
      figures[f'{name}_error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
      continue
    figures[f'{name}_first_call_s'] = first_s
    if compile_model:
      figures['torch_compile_s'] = first_s - warm_s
    contenders.append(Contender(name, batch, run, warm_s))
  return contenders, figures


def measure(batch_size: int, dtype: str, rounds: int, min_round_s: float,
            deadline: Deadline) -> dict:
  """Every contender for one batch size and dtype, timed in interleaved rounds (at least one,
  more while the time budget lasts)."""
  mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
  config = benchmark_config(batch_size, dtype, FLAGS.num_filters)
  contenders, row = jax_contenders(config, mean, std)
  row.update(batch_size=batch_size, dtype=dtype, num_filters=FLAGS.num_filters)
  emit('compiled', row)
  if FLAGS.torch:
    torch_side, torch_figures = torch_contenders(config, dtype, deadline)
    contenders += torch_side
    row.update({f'torch_{k}' if k == 'params' else k: v for k, v in torch_figures.items()})
    if row['torch_params'] != row['params']:
      raise AssertionError(f'The JAX model has {row["params"]} parameters and the PyTorch one '
                           f'{row["torch_params"]}: they are not the same network.')
  for c in contenders:
    c.calibrate(min_round_s)
  for done in range(rounds):
    if done and deadline.passed():
      break
    for c in contenders:
      c.time_round()
    round_figures(row, contenders)
    row['rounds_done'] = done + 1
    emit('round', row)
  row['rounds_planned'] = rounds
  return row


def round_figures(row: dict, contenders: list) -> None:
  """Speeds and ratios from the rounds timed so far, into `row`."""
  by_name = {c.name: c for c in contenders}
  for c in contenders:
    row[f'{c.name}_images_per_s'] = c.images_per_s
    row[f'{c.name}_round_s'] = c.round_s
    row[f'{c.name}_steps_per_round'] = c.steps
  train_s, premade_s = by_name['jax_train'].round_s, by_name['jax_premade'].round_s
  row['input_share'] = median([1 - p / t for t, p in zip(train_s, premade_s)])
  for kind in ('train', 'eval'):
    if f'jax_{kind}_xla_defaults' in by_name:
      row[f'policy_speedup_{kind}'] = median(
          [d / p for p, d in zip(by_name[f'jax_{kind}'].round_s,
                                 by_name[f'jax_{kind}_xla_defaults'].round_s)])
  torch_names = [n for n in by_name if n.startswith('torch_')]
  if torch_names:
    best = max(torch_names, key=lambda n: by_name[n].images_per_s)
    row['torch_best'] = best
    for label, name in (('eager', 'torch_eager'), ('best', best)):
      if name in by_name:
        row[f'ratio_vs_torch_{label}'] = median(
            [o / j for j, o in zip(train_s, by_name[name].round_s)])
    row['ratio_premade_vs_torch_best'] = median(
        [o / p for p, o in zip(premade_s, by_name[best].round_s)])


def peak_flops() -> Optional[float]:
  kind, count = jax.devices()[0].device_kind, jax.device_count()
  for key, flops in PEAK_BF16_FLOPS.items():
    if key.lower() in kind.lower():
      return flops * count
  return None


def environment() -> dict:
  env = {'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind,
         'device_count': jax.device_count(), 'python': platform.python_version(),
         'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
         'optax': optax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'cpu_cores': machine.cores(), 'cpu_model': machine.cpu_model(),
         'cpu_vector_extensions': machine.cpu_vector_extensions(),
         'compile_policy': compilation.compiler_options(),
         'load_average_1min': machine.load_average(),
         'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', '(default)'),
         'command': ' '.join(['python'] + sys.argv)}
  try:
    import torch
    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  except ImportError:
    env['torch'] = 'not installed'
  return env


def fmt(value, digits: int = 1) -> str:
  if value is None:
    return 'n/a'
  return f'{value:,.{digits}f}'


def markdown(env: dict, rows: list) -> str:
  peak = peak_flops()
  flops = rows[0]['train_flops_per_image'] if rows else None
  lines = [
      f'Device: {env["device_count"]} x {env["device_kind"]} ({env["platform"]}); '
      f'CPU: {env["cpu_model"]} ({env["cpu_vector_extensions"]}), {env["cpu_cores"]} cores',
      f'jax {env["jax"]}, jaxlib {env["jaxlib"]}, flax {env["flax"]}, optax {env["optax"]}, '
      f'torch {env["torch"]} ({env.get("torch_threads", "-")} threads), '
      f'Python {env["python"]}',
      f'XLA_FLAGS: {env["xla_flags"] or "(none)"}; OMP_WAIT_POLICY: {env["omp_wait_policy"]}; '
      f'1-minute load average at start: {env["load_average_1min"]:.1f}'
      + (f', at end: {env["load_average_1min_end"]:.1f}' if 'load_average_1min_end' in env
         else '')
      + f' ({machine.load_verdict(env["load_average_1min"])})',
      f'Compile policy (se_resnet_jax.compilation): {env["compile_policy"] or "XLA defaults"}',
      f'Command: {env["command"]}',
      f'Train-step FLOPs per image (forward + backward + update, XLA cost analysis, batch '
      f'{rows[0]["batch_size"]} {rows[0]["dtype"]}): '
      f'{fmt(flops / 1e9, 2) if flops else "n/a"} GFLOP',
      f'Peak (bf16 dense, all devices): {fmt(peak / 1e12, 0) + " TFLOP/s" if peak else "n/a"}',
      '',
      '| batch | dtype | JAX train img/s | JAX pre-made img/s | input+aug share | JAX eval img/s '
      '| compile s | step memory MiB (XLA) | peak MiB | utilisation |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    util = (f'{100 * r["train_flops_per_image"] * r["jax_train_images_per_s"] / peak:.1f}%'
            if peak else 'n/a')
    lines.append(
        f'| {r["batch_size"]} | {r["dtype"]} | {fmt(r["jax_train_images_per_s"])} '
        f'| {fmt(r["jax_premade_images_per_s"])} | {100 * r["input_share"]:.1f}% '
        f'| {fmt(r["jax_eval_images_per_s"])} | {fmt(r["compile_s"])} '
        f'| {fmt(r["step_memory_mib"], 0)} | {fmt(r["peak_memory_mib"], 0)} | {util} |')
  if rows:
    lines.append(f'\npeak MiB: {rows[0]["peak_memory_source"]} during compile and first step.')
  if any('policy_speedup_train' in r for r in rows):
    lines += ['', '| batch | dtype | JAX train img/s, XLA defaults | policy / defaults (train) '
              '| JAX eval img/s, XLA defaults | policy / defaults (eval) |',
              '|---|---|---|---|---|---|']
    lines += [f'| {r["batch_size"]} | {r["dtype"]} '
              f'| {fmt(r["jax_train_xla_defaults_images_per_s"])} '
              f'| {fmt(r["policy_speedup_train"], 2)}x '
              f'| {fmt(r["jax_eval_xla_defaults_images_per_s"])} '
              f'| {fmt(r["policy_speedup_eval"], 2)}x |' for r in rows
              if 'policy_speedup_train' in r]
  if any('torch_eager_images_per_s' in r for r in rows):
    lines += [
        '',
        '| batch | dtype | PyTorch eager img/s | channels_last img/s | torch.compile img/s '
        '| torch.compile compile s | JAX / PyTorch eager | JAX / PyTorch best | pre-made JAX / '
        'PyTorch best |',
        '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
      compile_cell = (fmt(r.get('torch_compile_images_per_s')) if 'torch_compile_error' not in r
                      else 'failed')
      lines.append(
          f'| {r["batch_size"]} | {r["dtype"]} | {fmt(r.get("torch_eager_images_per_s"))} '
          f'| {fmt(r.get("torch_channels_last_images_per_s"))} | {compile_cell} '
          f'| {fmt(r.get("torch_compile_s"))} '
          f'| {fmt(r.get("ratio_vs_torch_eager"), 2)}x '
          f'| {fmt(r.get("ratio_vs_torch_best"), 2)}x ({r.get("torch_best", "-")}) '
          f'| {fmt(r.get("ratio_premade_vs_torch_best"), 2)}x |')
    for r in rows:
      for key in ('torch_eager_error', 'torch_channels_last_error', 'torch_compile_error'):
        if key in r:
          lines.append(f'\n{key} at batch {r["batch_size"]} {r["dtype"]}: {r[key]}')
  for r in rows:
    if r['rounds_done'] < r['rounds_planned']:
      lines.append(f'\nBatch {r["batch_size"]} {r["dtype"]}: {r["rounds_done"]} of '
                   f'{r["rounds_planned"]} timing rounds (the time budget ran out).')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  batch_sizes, dtypes = FLAGS.batch_sizes, FLAGS.dtypes
  if batch_sizes is None:
    batch_sizes = ['128'] if jax.default_backend() == 'cpu' else ['128', '512']
  rounds, min_round_s = FLAGS.rounds, FLAGS.min_round_s
  if FLAGS.quick:
    rounds, min_round_s = 1, 0.0
    batch_sizes = batch_sizes if FLAGS['batch_sizes'].present else ['128']
    dtypes = dtypes if FLAGS['dtypes'].present else ['fp32']
    if not FLAGS['torch_compile'].present:
      FLAGS.torch_compile = False
  if any(d not in DTYPES for d in dtypes):
    raise app.UsageError(f'--dtypes must be from {", ".join(DTYPES)}, got {dtypes}.')
  if FLAGS.torch:
    try:
      from benchmarks import torch_step
    except ImportError:
      sys.exit('PyTorch is not installed: pip install -e ".[torch]", or pass --notorch.')
    torch_step.set_threads()
    if jax.default_backend() != 'cpu' and not torch_step.torch.cuda.is_available():
      print(f'PyTorch sees no GPU while JAX runs on {jax.default_backend()}: a ratio against the '
            'host CPU would mean nothing, so the PyTorch columns are skipped.', file=sys.stderr)
      FLAGS.torch = False

  deadline = Deadline(FLAGS.time_budget_s)
  env = environment()
  emit('environment', env)
  rows, skipped = [], []
  # Smallest footprint first, so device peak statistics (never reset) stay per configuration.
  for batch_size in sorted(int(b) for b in batch_sizes):
    for dtype in sorted(dtypes, key=lambda d: d != 'bf16'):
      if deadline.passed():
        skipped.append(f'batch {batch_size} {dtype}')
        continue
      print(f'measuring batch {batch_size} {dtype} ...', file=sys.stderr, flush=True)
      rows.append(measure(batch_size, dtype, rounds, min_round_s, deadline))
      env['load_average_1min_end'] = machine.load_average()
      emit('row', rows[-1])
      print(markdown(env, rows) + '\n', flush=True)
      jax.clear_caches()
      gc.collect()
  if skipped:
    emit('skipped', {'configurations': skipped})
    print(f'Not measured (--time_budget_s={FLAGS.time_budget_s}): {", ".join(skipped)}',
          file=sys.stderr, flush=True)
  table = markdown(env, rows)
  if len(rows) > 1 or skipped:  # else the running table above is already the final one
    print(table, flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as f:
      json.dump({'environment': env, 'rows': rows, 'table': table}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
