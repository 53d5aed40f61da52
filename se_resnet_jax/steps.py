"""The train state, loss, optimizer and schedule, and the compiled train and eval steps.

Batch order, augmentation and dropout are pure functions of (seed, step), so a resumed run repeats
an uninterrupted one exactly; XLA inserts the cross-device reductions of the global batch.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics
from flax.training import train_state

from se_resnet_jax import augment, compilation
from se_resnet_jax.config import compute_dtype
from se_resnet_jax.inference import eval_logits
from se_resnet_jax.models import SEResNet
from se_resnet_jax.sharding import sample_batch, to_host


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  ema_params: Any = None  # {'params', 'batch_stats'} averaged (see `ema_variables`), or {}


@flax.struct.dataclass
class Metrics(metrics.Collection):
  """Mean loss and accuracy, accumulated on the device."""
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy

  def scalars(self) -> dict:
    """{'loss', 'accuracy'} as Python floats (waits for the steps that produced them)."""
    return {k: float(v) for k, v in self.compute().items()}


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
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay on 'kernels' (conv and dense) or 'all' parameters.
  Both masks are optax masks, so the optimizer state has one structure (a resume may change it).
  """
  if not callable(schedule):  # a number would silently become a constant learning rate
    raise TypeError('create_optimizer takes a schedule: '
                    'create_learning_rate_schedule(config, steps_per_epoch).')
  decay_all = config.weight_decay_mask == 'all'
  mask = lambda params: jax.tree.map(lambda p: decay_all or p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=mask),
      optax.sgd(schedule, config.momentum, nesterov=config.nesterov))


def ema_variables(config: ml_collections.ConfigDict, variables: dict) -> dict:
  """Where the EMA starts ({} when it is off). The BatchNorm statistics are averaged too, as
  timm's ModelEmaV2 averages buffers: live statistics would not match the averaged weights."""
  if not config.ema_decay:
    return {}
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def create_train_state(config: ml_collections.ConfigDict, model: SEResNet,
                       tx: optax.GradientTransformation, image_shape: tuple,
                       rng: Optional[jax.Array] = None) -> TrainState:
  """Fresh weights from `rng` (default: key(config.seed)). A key passed to jit, not a constant,
  lets runs differing only in seed share one compiled initialisation."""
  rng = jax.random.key(config.seed) if rng is None else rng
  variables = model.init({'params': rng}, jnp.zeros((1,) + image_shape, model.dtype), train=False)
  state = TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                            batch_stats=variables['batch_stats'],
                            ema_params=ema_variables(config, variables))
  # A strongly typed step, as a checkpoint restores it: a fresh and a resumed run then share one
  # compiled train step (a weakly typed 0 would make the resumed run compile another).
  return state.replace(step=jnp.zeros((), jnp.int32))


def init_program(config: ml_collections.ConfigDict, model: SEResNet,
                 tx: optax.GradientTransformation, image_shape: tuple,
                 sharding: jax.sharding.Sharding) -> Callable:
  """create_train_state jitted for its key, its output placed with `sharding`. On a CPU without
  backend optimisation: XLA takes longer to optimise the random draws than they take to run once."""
  return compilation.jit(functools.partial(create_train_state, config, model, tx, image_shape),
                         out_shardings=sharding,
                         cpu_options={'xla_backend_optimization_level': 0})


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, train_metrics: Metrics, images: jax.Array,
               labels: jax.Array, rng: jax.Array, *, config: ml_collections.ConfigDict,
               mean: Any, std: Any):
  """One SGD step on a uint8 batch: augment, forward, backward, update (and EMA)."""
  aug_rng, dropout_rng = jax.random.split(rng)
  x = augment.preprocess_for_train(aug_rng, images, config.augment, mean, std,
                                   compute_dtype(config))

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
        {'params': new_state.params, 'batch_stats': new_state.batch_stats}, state.ema_params,
        1.0 - config.ema_decay))
  step_metrics = Metrics.single_from_model_output(loss=loss, logits=logits, labels=labels)
  return new_state, train_metrics.merge(step_metrics)


def normalization(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """The per-channel (mean, std) of the training split as one (2, C) float32 array: the train
  step's argument, so that runs on other data of the same shapes (folds, validation seeds, another
  .npz) share one compiled step."""
  return np.stack([np.asarray(mean, np.float32), np.asarray(std, np.float32)])


def make_train_step(config: ml_collections.ConfigDict, steps_per_epoch: int, per_device: int):
  """The compiled step of the loop: draw the batch on the device(s), augment, update; the state
  is donated. The step number comes from `state.step`, so nothing is copied per step; the
  normalisation comes last, as `normalization(mean, std)`."""

  @functools.partial(compilation.jit, donate_argnums=(0,))
  def compiled_step(state, train_metrics, images, labels, perm, step_rng, mean_std):
    x, y = sample_batch(images, labels, perm, state.step % steps_per_epoch, per_device)
    return train_step(state, train_metrics, x, y, jax.random.fold_in(step_rng, state.step),
                      config=config, mean=mean_std[0], std=mean_std[1])

  return compiled_step


def make_eval_step(config: ml_collections.ConfigDict, model: SEResNet, mean: tuple, std: tuple):
  """Per-example predictions, top-5 hits and losses, plus masked clu metrics, for one chunk."""

  @compilation.jit
  def eval_step(variables, images, labels, mask):
    x = augment.preprocess_for_eval(images, mean, std, compute_dtype(config))
    logits = eval_logits(lambda v: model.apply(variables, v, train=False), x, config.tta_flip)
    loss = cross_entropy(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    in_top5 = jnp.any(top5 == labels[:, None], axis=-1)
    m = Metrics.single_from_model_output(loss=loss, logits=logits, labels=labels, mask=mask)
    return m, jnp.argmax(logits, -1), in_top5, loss

  return eval_step


def evaluate(eval_step, variables: dict, chunks: tuple) -> tuple:
  """({'loss', 'accuracy'}, per-example (predictions, in_top5, losses)) over a padded split."""
  images, labels, mask = chunks
  total, outputs = None, []
  for i in range(images.shape[0]):
    m, *per_example = eval_step(variables, images[i], labels[i], mask[i])
    total = m if total is None else total.merge(m)
    outputs.append(per_example)
  keep = to_host(mask).reshape(-1)
  per_example = [np.concatenate([to_host(o[k]) for o in outputs])[keep] for k in range(3)]
  return total.scalars(), per_example


def eval_variables(state: TrainState) -> dict:
  """The weights to evaluate: the EMA of the parameters and BatchNorm statistics when it is
  kept, else the parameters and live statistics."""
  return dict(state.ema_params or {'params': state.params, 'batch_stats': state.batch_stats})
