"""Data-parallel training and evaluation of SE-ResNets with the data resident on the accelerator.

The training set is split evenly over all devices of all hosts and stays there as uint8. Each
compiled step has every device draw its share of the global batch from its own shard (a per-epoch
permutation), augment it, and run forward and backward; XLA computes BatchNorm statistics and
gradients over the global batch. Batch order, augmentation and dropout are pure functions of
(seed, step), so a resumed run repeats an uninterrupted one exactly.
"""

import functools
import os
import signal
import tempfile
import time
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from se_resnet_jax import augment, input_pipeline, report
from se_resnet_jax.checkpoints import RunCheckpoints
from se_resnet_jax.config import model_se_reduction, validate_config
from se_resnet_jax.models import SEResNet, create_model


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  ema_params: Any = None  # {} when the EMA of weights is off


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> SEResNet:
  kwargs = dict(num_classes=num_classes, num_filters=config.model.num_filters,
                dropout_rate=config.model.dropout_rate,
                dtype=jnp.bfloat16 if config.half_precision else jnp.float32)
  if not config.model.name.startswith('ResNet'):
    kwargs['se_reduction'] = model_se_reduction(config)
  return create_model(config.model.name, **kwargs)


def architecture(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """What a checkpoint's weights depend on; a resume refuses a mismatch."""
  se = model_se_reduction(config)
  return dict(name=config.model.name, num_filters=config.model.num_filters,
              se_reduction=list(se) if isinstance(se, list) else se, num_classes=num_classes)


def create_learning_rate_schedule(config: ml_collections.ConfigDict,
                                  steps_per_epoch: int) -> optax.Schedule:
  total = config.num_epochs * steps_per_epoch
  warmup = int(config.warmup_epochs * steps_per_epoch)
  lr = config.learning_rate
  if config.schedule == 'onecycle':
    return optax.cosine_onecycle_schedule(total, lr, pct_start=max(warmup, 1) / total)
  if config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  elif config.schedule == 'multistep':
    main = optax.piecewise_constant_schedule(lr, {
        e * steps_per_epoch - warmup: config.lr_decay_factor for e in config.lr_decay_epochs})
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay on kernels only (not BatchNorm, not biases)."""
  kernels_only = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=kernels_only),
      optax.sgd(create_learning_rate_schedule(config, steps_per_epoch), config.momentum,
                nesterov=config.nesterov))


def create_train_state(config: ml_collections.ConfigDict, model: SEResNet,
                       tx: optax.GradientTransformation, image_shape: tuple,
                       rng: Optional[jax.Array] = None) -> TrainState:
  """Fresh weights from `rng` (default: key(config.seed)).

  Passing the key as a jit argument, not a constant, lets runs that differ only in seed share one
  compiled initialisation (the experiments' seeds reuse it from JAX's compilation cache).
  """
  rng = jax.random.key(config.seed) if rng is None else rng
  variables = model.init({'params': rng}, jnp.zeros((1,) + image_shape, model.dtype), train=False)
  params = variables['params']
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           batch_stats=variables['batch_stats'],
                           ema_params=params if config.ema_decay else {})


def init_train_state(config: ml_collections.ConfigDict, model: SEResNet,
                     tx: optax.GradientTransformation, image_shape: tuple,
                     sharding: NamedSharding) -> TrainState:
  """create_train_state compiled once, its output placed with `sharding`.

  On CPU the initialiser is compiled without backend optimisation: its random draws take XLA
  longer to optimise (about 2.5x at full width) than the unoptimised program takes to run once.
  """
  init = jax.jit(functools.partial(create_train_state, config, model, tx, image_shape),
                 out_shardings=sharding)
  rng = jax.random.key(config.seed)
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return init.lower(rng).compile(compiler_options=options)(rng)


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, train_metrics: TrainMetrics, images: jax.Array,
               labels: jax.Array, rng: jax.Array, *, config: ml_collections.ConfigDict,
               mean: tuple, std: tuple):
  """One SGD step on a uint8 batch: augment, forward, backward, update (and EMA)."""
  aug_rng, dropout_rng = jax.random.split(rng)
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  x = augment.preprocess_for_train(aug_rng, images, config.augment, mean, std, dtype)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss = cross_entropy(logits, labels, config.label_smoothing)
    return loss.mean(), (loss, logits, updates['batch_stats'])

  grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if config.ema_decay:
    new_state = new_state.replace(ema_params=optax.incremental_update(
        new_state.params, state.ema_params, 1.0 - config.ema_decay))
  step_metrics = TrainMetrics.single_from_model_output(loss=loss, logits=logits, labels=labels)
  return new_state, train_metrics.merge(step_metrics)


def make_train_step(config: ml_collections.ConfigDict, steps_per_epoch: int, per_device: int,
                    mean: tuple, std: tuple):
  """The compiled step of the training loop: draw the batch on the device(s), augment, update.

  Its arguments are (state, train_metrics, images, labels, perm, step_rng); the state is donated.
  The seed's key is an argument, not a constant, so runs differing only in seed compile alike, and
  the step number is read from `state.step`, already on the device, so nothing is copied per step.
  """

  @functools.partial(jax.jit, donate_argnums=(0,))
  def compiled_step(state, train_metrics, images, labels, perm, step_rng):
    x, y = sample_batch(images, labels, perm, state.step % steps_per_epoch, per_device)
    return train_step(state, train_metrics, x, y, jax.random.fold_in(step_rng, state.step),
                      config=config, mean=mean, std=std)

  return compiled_step


def sample_batch(images: jax.Array, labels: jax.Array, perm: jax.Array, step_in_epoch: jax.Array,
                 per_device: int):
  """Each device's slice of the epoch permutation indexes its own shard: no data moves."""
  idx = jax.lax.dynamic_slice_in_dim(perm, step_in_epoch * per_device, per_device, axis=1)
  x = jax.vmap(lambda im, i: im[i])(images, idx)
  y = jax.vmap(lambda lb, i: lb[i])(labels, idx)
  return x.reshape((-1,) + x.shape[2:]), y.reshape(-1)


def epoch_permutation(rng: jax.Array, epoch: jax.Array, num_shards: int, shard_size: int):
  keys = jax.random.split(jax.random.fold_in(rng, epoch), num_shards)
  return jax.vmap(lambda k: jax.random.permutation(k, shard_size))(keys)


def data_mesh() -> jax.sharding.Mesh:
  """All devices of all processes on one 'data' axis.

  Auto axes (GSPMD): recent JAX makes mesh axes Explicit by default, and then the augmentation's
  vmap over a 'data'-sharded batch with replicated per-example keys fails on > 1 device.
  """
  return jax.make_mesh((jax.device_count(),), ('data',), (jax.sharding.AxisType.Auto,))


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A device array from a host array every process holds; each device takes only its part."""
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_train_split(split: input_pipeline.Split, mesh: jax.sharding.Mesh):
  """(D, N/D, H, W, C) images and (D, N/D) labels, shard d on device d (remainder dropped)."""
  d = mesh.size
  n = len(split) // d
  sharding = NamedSharding(mesh, P('data'))
  images = split.images[:n * d].reshape((d, n) + split.images.shape[1:])
  return global_array(images, sharding), global_array(split.labels[:n * d].reshape(d, n), sharding)


def shard_eval_split(split: input_pipeline.Split, mesh: jax.sharding.Mesh, batch_size: int):
  """Chunks of `batch_size`, the last padded, with a mask so each example counts exactly once."""
  n = len(split)
  chunks = -(-n // batch_size)
  pad = chunks * batch_size - n
  images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
  labels = np.concatenate([split.labels, np.zeros(pad, np.int32)])
  mask = np.arange(chunks * batch_size) < n
  sharding = NamedSharding(mesh, P(None, 'data'))
  shape = lambda a: a.reshape((chunks, batch_size) + a.shape[1:])
  return tuple(global_array(shape(a), sharding) for a in (images, labels, mask))


def make_eval_step(config: ml_collections.ConfigDict, model: SEResNet, mean: tuple, std: tuple):
  """Per-example predictions, top-5 hits and losses, plus masked clu metrics, for one chunk."""
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32

  @jax.jit
  def eval_step(variables, images, labels, mask):
    x = augment.preprocess_for_eval(images, mean, std, dtype)
    logits = model.apply(variables, x, train=False)
    if config.tta_flip:  # average the two views' probabilities
      flipped = model.apply(variables, x[:, :, ::-1], train=False)
      logits = jnp.logaddexp(jax.nn.log_softmax(logits), jax.nn.log_softmax(flipped)) - jnp.log(2)
    loss = cross_entropy(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    in_top5 = jnp.any(top5 == labels[:, None], axis=-1)
    m = EvalMetrics.single_from_model_output(loss=loss, logits=logits, labels=labels, mask=mask)
    return m, jnp.argmax(logits, -1), in_top5, loss

  return eval_step


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def evaluate(eval_step, variables: dict, chunks: tuple) -> tuple:
  """({'loss', 'accuracy'}, per-example (predictions, in_top5, losses)) over a padded split."""
  images, labels, mask = chunks
  total, outputs = None, []
  for i in range(images.shape[0]):
    m, *per_example = eval_step(variables, images[i], labels[i], mask[i])
    total = m if total is None else total.merge(m)
    outputs.append(per_example)
  keep = _to_host(mask).reshape(-1)
  per_example = [np.concatenate([_to_host(o[k]) for o in outputs])[keep] for k in range(3)]
  return {k: float(v) for k, v in total.compute().items()}, per_example


def eval_variables(state: TrainState) -> dict:
  return {'params': state.ema_params or state.params, 'batch_stats': state.batch_stats}


def measure_inference(model: SEResNet, variables: dict, image_shape: tuple, batch_size: int,
                      repeats: int = 10) -> dict:
  """Images/s at `batch_size` and latency at batch 1, both after compilation."""
  apply = jax.jit(functools.partial(model.apply, train=False))
  figures = {}
  for batch in (batch_size, 1):
    x = jnp.zeros((batch,) + image_shape, model.dtype)
    apply(variables, x).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      apply(variables, x).block_until_ready()
      times.append(time.perf_counter() - start)
    figures[batch] = float(np.median(times))
  return {'inference_images_per_s': batch_size / figures[batch_size],
          'inference_batch_size': batch_size,
          'inference_latency_ms_batch1': 1000 * figures[1]}


class _LogOnlyWriter:
  """Stands in for clu's writers where TensorBoard/TensorFlow are not installed."""

  def write_scalars(self, step, scalars):
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))

  def write_hparams(self, hparams):
    logging.info('hparams: %s', hparams)

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str, total_steps: int):
  """clu's TensorBoard + log writer and progress hook; the log alone where TensorFlow is absent."""
  try:  # clu's writers import TensorBoard and TensorFlow
    from clu import metric_writers, periodic_actions
  except ImportError:
    logging.warning('TensorBoard/TensorFlow not installed: metrics go to the log only.')
    return _LogOnlyWriter(), []
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  return writer, [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)]


def prepare_workdir(workdir: str) -> None:
  """Fails early, with advice, when the workdir cannot be written.

  A URL is refused: os.makedirs would quietly make a local directory named 'gs:' on every host.
  """
  if '://' in workdir:
    raise PermissionError(f'--workdir {workdir!r} is a URL; the workdir must be a local or mounted '
                          'path (on a TPU pod slice: a shared filesystem, or the bucket mounted '
                          'with gcsfuse).')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise PermissionError(f'Cannot write to workdir {workdir!r} ({e.strerror}). Choose a '
                          'writable --workdir or fix its permissions.') from None


class _Preemption:
  """Remembers a SIGTERM so the loop can checkpoint and exit between steps.

  With several processes the SIGTERMs reach them at different steps, and a process that starts a
  (collective) save while the others run another step deadlocks; there JAX's preemption service
  (which jax.distributed installs on SIGTERM) agrees on one step for all of them instead.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def __enter__(self):
    if self._multiprocess:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, as for any library call
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; called after every step, by every process."""
    if self._multiprocess:
      try:
        self.requested = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # jax_enable_preemption_service=False
        logging.warning('No preemption checkpoints: %s', e)
        self._multiprocess = False
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def _improved(value: float, best: Optional[float], monitor: str, min_delta: float) -> bool:
  if best is None:
    return True
  return value > best + min_delta if monitor == 'val_accuracy' else value < best - min_delta


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), then writes the full report."""
  validate_config(config, jax.device_count())
  prepare_workdir(workdir)
  data = input_pipeline.load_dataset(config)
  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())
  num_devices = mesh.size
  per_device = config.batch_size // num_devices
  steps_per_epoch = (len(data.train) // num_devices) // per_device
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size={config.batch_size} is larger than the {len(data.train)} '
                     'training examples; lower batch_size.')
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  image_shape = data.train.images.shape[1:]

  model = build_model(config, data.num_classes)
  tx = create_optimizer(config, steps_per_epoch)
  state = init_train_state(config, model, tx, image_shape, replicated)
  arch = architecture(config, data.num_classes)
  meta = {'epoch': 0, 'history': [], 'best_val_accuracy': None, 'best_epoch': None,
          'es_best': None, 'es_bad_epochs': 0, 'stopped_epoch': None, 'architecture': arch}
  ckpts = RunCheckpoints(workdir, config.keep_checkpoints)
  if ckpts.latest_step() is not None:
    state, meta = ckpts.restore(state, architecture=arch)
    logging.info('Resumed from %s at step %d (epoch %d).', workdir, int(state.step), meta['epoch'])
  start_step = int(state.step)
  if jax.process_index() == 0:  # only once the checkpoints are known to fit this config
    report.write_json_atomic(os.path.join(workdir, 'config.json'), config.to_dict())

  train_images, train_labels = shard_train_split(data.train, mesh)
  shard_size = train_images.shape[1]
  val_chunks = (shard_eval_split(data.validation, mesh, config.eval_batch_size)
                if data.validation is not None else None)
  data_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 2)

  compiled_step = make_train_step(config, steps_per_epoch, per_device, data.mean, data.std)

  permutation = jax.jit(functools.partial(epoch_permutation, num_shards=num_devices,
                                          shard_size=shard_size),
                        out_shardings=NamedSharding(mesh, P('data')))
  eval_step = make_eval_step(config, model, data.mean, data.std)
  schedule = create_learning_rate_schedule(config, steps_per_epoch)
  writer, hooks = create_writer(workdir, total_steps)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})

  compile_start = time.perf_counter()
  empty_metrics = jax.device_put(TrainMetrics.empty(), replicated)
  step_fn = compiled_step.lower(state, empty_metrics, train_images, train_labels,
                                permutation(data_rng, 0), step_rng).compile()
  compile_s = time.perf_counter() - compile_start
  logging.info('Compiled the train step in %.1fs; %d steps/epoch, %d devices, global batch %d.',
               compile_s, steps_per_epoch, num_devices, config.batch_size)

  history = meta['history']
  epoch_metrics, perm_epoch, perm = empty_metrics, None, None
  epoch_start, epoch_first_step = time.perf_counter(), start_step
  log_time, log_step = time.perf_counter(), start_step
  step = start_step
  with _Preemption() as preemption:
    while step < total_steps and meta['stopped_epoch'] is None:
      epoch = step // steps_per_epoch
      if perm_epoch != epoch:
        perm, perm_epoch = permutation(data_rng, epoch), epoch
      state, epoch_metrics = step_fn(state, epoch_metrics, train_images, train_labels, perm,
                                     step_rng)
      step += 1
      for hook in hooks:
        hook(step)
      if step % config.log_every_steps == 0:
        current = {k: float(v) for k, v in epoch_metrics.compute().items()}  # waits for the step
        now = time.perf_counter()
        rate = (step - log_step) / (now - log_time)
        logging.info('step %d/%d  epoch %d  loss %.4f  acc %.4f  |  %.2f steps/s  %.0f img/s  '
                     'ETA %s',
                     step, total_steps, epoch + 1, current['loss'], current['accuracy'], rate,
                     rate * config.batch_size, _format_eta((total_steps - step) / rate))
        _check_finite(current['loss'], step, ckpts, workdir)
        log_time, log_step = now, step
      end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
      preempted = preemption.reached(step)
      if preempted and not end_of_epoch:
        current = {k: float(v) for k, v in epoch_metrics.compute().items()}
        _check_finite(current['loss'], step, ckpts, workdir, state)
        ckpts.save(step, state, meta)
        logging.warning('SIGTERM: saved a checkpoint at step %d in %s; rerun the same command '
                        'to resume.', step, workdir)
        return {'preempted': True, 'step': step}
      if not end_of_epoch:
        continue

      train = {k: float(v) for k, v in epoch_metrics.compute().items()}
      epoch_time = time.perf_counter() - epoch_start
      _check_finite(train['loss'], step, ckpts, workdir, state)
      epoch_number = epoch + 1
      row = {'epoch': epoch_number, 'step': step, 'train_loss': train['loss'],
             'train_accuracy': train['accuracy'],
             'learning_rate': float(schedule(step)),
             'epoch_time_s': epoch_time,
             'train_images_per_s': (step - epoch_first_step) * config.batch_size / epoch_time}
      is_last = step == total_steps
      best = False
      if val_chunks is not None and (epoch_number % config.eval_every_epochs == 0 or is_last):
        val, _ = evaluate(eval_step, eval_variables(state), val_chunks)
        row.update(val_loss=val['loss'], val_accuracy=val['accuracy'])
        if meta['best_val_accuracy'] is None or val['accuracy'] > meta['best_val_accuracy']:
          meta.update(best_val_accuracy=val['accuracy'], best_epoch=epoch_number)
          best = True
        es = config.early_stopping
        value = row[es.monitor]
        if _improved(value, meta['es_best'], es.monitor, es.min_delta):
          meta.update(es_best=value, es_bad_epochs=0)
        else:
          meta['es_bad_epochs'] += 1
          if es.enabled and meta['es_bad_epochs'] >= es.patience:
            meta['stopped_epoch'] = epoch_number
            logging.info('Early stopping at epoch %d: %s has not improved for %d evaluations.',
                         epoch_number, es.monitor, es.patience)
      history.append(row)
      writer.write_scalars(step, {k: v for k, v in row.items() if k not in ('epoch', 'step')})
      meta['epoch'] = epoch_number
      if (epoch_number % config.checkpoint_every_epochs == 0 or is_last or best
          or meta['stopped_epoch'] is not None or preempted):
        ckpts.save(step, state, meta, best=best)
      if preempted:
        logging.warning('SIGTERM: saved a checkpoint at step %d; rerun to resume.', step)
        return {'preempted': True, 'step': step}
      logging.info('epoch %d: %s', epoch_number,
                   ', '.join(f'{k}={v:.4g}' for k, v in row.items() if k != 'epoch'))
      epoch_metrics = empty_metrics
      epoch_start, epoch_first_step = time.perf_counter(), step
  writer.flush()

  final = state
  if val_chunks is not None and ckpts.latest_step('best') is not None:
    final, _ = ckpts.restore(state, which='best', architecture=arch)
  ckpts.close()
  result = final_report(config, data, model, final, meta, eval_step, mesh, compile_s, image_shape,
                        ('validation', 'test') if config.evaluate_test else ('validation',))
  if jax.process_index() == 0:
    report.write_report(workdir, result, history)
  writer.write_scalars(int(state.step), {f'final_{split}_{k}': result[split][k]
                                         for split in ('validation', 'test') if split in result
                                         for k in ('accuracy', 'loss')})
  writer.close()
  return result


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _check_finite(loss: float, step: int, ckpts: RunCheckpoints, workdir: str,
                  state: Optional[TrainState] = None) -> None:
  """Raises before any save once the loss or the weights are NaN/Inf.

  The loss of a step is computed before its update, so an update that overflows leaves a finite
  loss and non-finite weights: with `state` the weights are checked too, so no checkpoint (which a
  resume would trust) ever holds NaN.
  """
  if np.isfinite(loss) and (state is None or bool(_all_finite(
      (state.params, state.batch_stats, state.opt_state, state.ema_params)))):
    return
  last = ckpts.latest_step()
  what = f'Training loss became {loss}' if not np.isfinite(loss) else 'The weights became NaN/Inf'
  raise FloatingPointError(
      f'{what} by step {step}. Nothing was saved after this; the last good checkpoint '
      f'({"step " + str(last) if last is not None else "none yet"}) in {workdir} is intact. Lower '
      '--config.learning_rate (or add warmup) and rerun with the same --workdir to resume from it.')


def final_report(config: ml_collections.ConfigDict, data: input_pipeline.Dataset, model: SEResNet,
                 state: TrainState, meta: dict, eval_step, mesh: jax.sharding.Mesh,
                 compile_s: Optional[float], image_shape: tuple,
                 splits: Sequence[str] = ('validation', 'test')) -> dict:
  """Metrics of the given weights on `splits`, with timings: the report's content."""
  variables = eval_variables(state)
  splits = {name: getattr(data, name) for name in splits}
  result = {'config': config.to_dict(), 'dataset': data.name, 'class_names': list(data.class_names),
            'device': {'platform': jax.devices()[0].platform,
                       'kind': jax.devices()[0].device_kind, 'count': jax.device_count()},
            'epochs_completed': meta['epoch'], 'best_epoch': meta['best_epoch'],
            'step': int(state.step)}
  for name, split in splits.items():
    if split is None:
      continue
    chunks = shard_eval_split(split, mesh, config.eval_batch_size)
    _, (pred, in_top5, loss) = evaluate(eval_step, variables, chunks)
    result[name] = report.split_report(split.labels, pred, loss, in_top5, data.class_names)
  rows = meta['history']
  timing = {'device_kind': jax.devices()[0].device_kind}
  if compile_s is not None:
    timing['compile_s'] = compile_s
  if rows:
    timed = rows[1:] or rows  # the first epoch includes warm-up
    timing['train_time_per_epoch_s'] = float(np.mean([r['epoch_time_s'] for r in timed]))
    timing['train_images_per_s'] = float(np.mean([r['train_images_per_s'] for r in timed]))
  if config.measure_inference:
    timing.update(measure_inference(model, variables, image_shape, config.eval_batch_size))
  result['timing'] = timing
  if config.early_stopping.enabled:
    result['early_stopping'] = {'stopped_epoch': meta['stopped_epoch'],
                                'best_epoch': meta['best_epoch'],
                                'monitor': config.early_stopping.monitor,
                                'best_value': meta['es_best']}
  return result
