"""Evaluating weights: a split's metrics, the final report's content, inference timing, and a
finished run's weights restored without its data or optimizer.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from se_resnet_jax import compilation, input_pipeline, report
from se_resnet_jax.checkpoints import CheckpointError, CheckpointNotFoundError, RunCheckpoints
from se_resnet_jax.config import DATASETS, base_config, validate_config
from se_resnet_jax.errors import ConfigError
from se_resnet_jax.models import SEResNet, architecture, build_model
from se_resnet_jax.sharding import data_mesh, shard_eval_split, to_host
from se_resnet_jax.steps import (
    TrainState,
    create_learning_rate_schedule,
    create_optimizer,
    create_train_state,
)


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
  kept, else the parameters and live statistics. A state of the older layout (averaged parameters
  alone) pairs them with the live statistics, as it was evaluated then."""
  ema = state.ema_params
  if not ema:
    return {'params': state.params, 'batch_stats': state.batch_stats}
  if 'batch_stats' in ema and 'params' in ema:
    return {'params': ema['params'], 'batch_stats': ema['batch_stats']}
  return {'params': ema, 'batch_stats': state.batch_stats}


def measure_inference(model: SEResNet, variables: dict, image_shape: tuple, batch_size: int,
                      repeats: int = 10) -> dict:
  """Images/s at `batch_size` and latency at batch 1, both after compilation."""
  apply = compilation.jit(functools.partial(model.apply, train=False))
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


def final_report(config: ml_collections.ConfigDict, data: input_pipeline.Dataset, model: SEResNet,
                 variables: dict, step: int, meta: dict, eval_step, mesh: jax.sharding.Mesh,
                 compile_s: Optional[float] = None,
                 splits: Sequence[str] = ('validation', 'test')) -> dict:
  """Metrics of `variables` on `splits`, with timings: the report's content.

  `meta` is the run's record as its checkpoints hold it (epoch, best_epoch, history, early
  stopping), so a report of a restored checkpoint reads the same fields as the loop's.
  """
  result = {'config': config.to_dict(), 'dataset': data.name, 'class_names': list(data.class_names),
            'device': {'platform': jax.devices()[0].platform,
                       'kind': jax.devices()[0].device_kind, 'count': jax.device_count()},
            'epochs_completed': meta['epoch'], 'best_epoch': meta['best_epoch'], 'step': step}
  for name in splits:
    split = getattr(data, name)
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
    timing.update(measure_inference(model, variables, data.train.images.shape[1:],
                                    config.eval_batch_size))
  result['timing'] = timing
  if config.early_stopping.enabled:
    result['early_stopping'] = {'stopped_epoch': meta['stopped_epoch'],
                                'best_epoch': meta['best_epoch'],
                                'monitor': config.early_stopping.monitor,
                                'best_value': meta['es_best']}
  return result


def abstract_train_state(config: ml_collections.ConfigDict, num_classes: int,
                         sharding: jax.sharding.Sharding, image_shape: tuple = (32, 32, 3),
                         steps_per_epoch: int = 1) -> TrainState:
  """A TrainState of shapes only, placed with `sharding`: a restore target that costs nothing.

  `jax.eval_shape` traces the initialiser without compiling or running it. The optimizer state's
  structure does not depend on the schedule, but a state restored onto this target keeps its
  optimizer: to train on from it, pass the run's `steps_per_epoch` so the learning rates match.
  """
  model = build_model(config, num_classes)
  tx = create_optimizer(config, create_learning_rate_schedule(config, steps_per_epoch))
  shapes = jax.eval_shape(functools.partial(create_train_state, config, model, tx, image_shape))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, on top of today's defaults (for fields added since).

  A config.json that is not JSON, or holds a field today's config lacks or a value of the wrong
  type (edited by hand), is a ConfigError naming the file.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{path} not found: is {workdir!r} a training workdir? Pass --config=<the '
                      'config file the run used> if it was made by an older version.')
  fix = 'fix it, or pass --config=<the config file the run used>.'
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise ConfigError(f'{path} is not valid JSON ({e}): {fix}') from None
  if not isinstance(saved, dict):
    raise ConfigError(f'{path} does not hold a config (a JSON object): {fix}')
  config = base_config()
  for key, value in traverse_util.flatten_dict(saved, sep='.').items():
    try:
      config.update_from_flattened_dict({key: tuple(value) if isinstance(value, list) else value})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise ConfigError(f'{path}: field {key!r} = {value!r} does not fit the config '
                        f'({type(e).__name__}: {str(e)[:150]}): {fix}') from None
  try:
    validate_config(config, jax.device_count())
  except ConfigError as e:
    raise ConfigError(f'{path}: {e}') from None
  return config


def dataset_num_classes(config: ml_collections.ConfigDict) -> int:
  """The class count the config implies; arrays from --config.npz_path say it themselves."""
  if config.dataset == 'synthetic':
    return config.synthetic.num_classes
  if config.npz_path:
    return input_pipeline.load_dataset(config).num_classes
  if config.dataset == 'cifar100' and config.label_key == 'coarse_label':
    return 20
  return DATASETS[config.dataset]


@dataclasses.dataclass
class RestoredRun:
  config: ml_collections.ConfigDict
  model: SEResNet
  variables: dict  # the evaluated weights: see eval_variables
  step: int
  meta: dict  # the run's record at that step: epoch, best_epoch, history, ...
  run_id: Optional[str] = None  # the run the step belongs to (None: made before run ids)


def restore_run(workdir: str, which: str = 'best',
                config: Optional[ml_collections.ConfigDict] = None,
                allow_changed_data: bool = False) -> RestoredRun:
  """A run's weights at checkpoint `which` ('best', 'latest' or a step number).

  The config is the run's own (workdir/config.json) unless given. Nothing is compiled and no data
  is read: the restore target comes from `abstract_train_state`, replicated over all devices.
  Runs without a validation split keep no best checkpoint: 'best' then means the latest.
  The checkpoint's data settings must be the config's (an edited config.json, or another
  --config, would evaluate another split under the run's name), unless `allow_changed_data`.
  """
  if which not in ('best', 'latest') and not which.isdigit():
    raise CheckpointError(f"--checkpoint must be 'best', 'latest' or a step number, got "
                          f'{which!r}.')
  if not os.path.isdir(workdir):
    raise CheckpointError(f'Workdir {workdir!r} does not exist.')
  given = config is not None
  config = config or load_run_config(workdir)
  validate_config(config, jax.device_count())
  num_classes = dataset_num_classes(config)
  target = abstract_train_state(config, num_classes, NamedSharding(data_mesh(), P()))
  ckpts = RunCheckpoints(workdir, read_only=True)
  try:
    if not ckpts.steps() and ckpts.latest_step('best') is None:
      raise CheckpointNotFoundError(
          f'No checkpoints in {os.path.join(workdir, "checkpoints")} (asked for checkpoint '
          f'{which!r}): the run saved none yet; train it first.', which,
          int(which) if which.isdigit() else None, [])
    manager, step = (which, None) if not which.isdigit() else ('latest', int(which))
    if which == 'best' and ckpts.latest_step('best') is None:
      manager = 'latest'
    state, meta = ckpts.restore(target, which=manager, step=step,
                                architecture=architecture(config, num_classes))
  finally:
    ckpts.close()
  recorded = meta.get('data')
  if recorded is None and given and os.path.exists(os.path.join(workdir, 'config.json')):
    recorded = input_pipeline.data_identity(load_run_config(workdir))  # a run made before 'data'
  if not allow_changed_data:
    input_pipeline.check_same_data(recorded, input_pipeline.data_identity(config),
                                   f'Checkpoint step {int(state.step)} in {workdir}')
  return RestoredRun(config, build_model(config, num_classes), eval_variables(state),
                     int(state.step), meta, ckpts.run_id or meta.get('run_id'))
