"""Evaluating weights: a split's metrics, the final report's content and inference timing."""

import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from se_resnet_jax import compilation, input_pipeline, report
from se_resnet_jax.models import IMAGE_SHAPE, SEResNet
from se_resnet_jax.progress import Progress
from se_resnet_jax.sharding import shard_eval_split, to_host
from se_resnet_jax.steps import TrainState


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
                 variables: dict, step: int, progress: Progress, eval_step,
                 mesh: jax.sharding.Mesh,
                 compile_s: Optional[float] = None,
                 splits: Sequence[str] = ('validation', 'test')) -> dict:
  """Metrics of `variables` on `splits`, with timings: the report's content.

  `progress` is the run's as its checkpoint holds it, so a report of a restored checkpoint reads
  the same fields as the loop's.
  """
  result = {'config': config.to_dict(), 'dataset': data.name, 'class_names': list(data.class_names),
            'device': {'platform': jax.devices()[0].platform,
                       'kind': jax.devices()[0].device_kind, 'count': jax.device_count()},
            'epochs_completed': progress.epoch, 'best_epoch': progress.best_epoch, 'step': step}
  for name in splits:
    split = getattr(data, name)
    if split is None:
      continue
    chunks = shard_eval_split(split, mesh, config.eval_batch_size)
    _, (pred, in_top5, loss) = evaluate(eval_step, variables, chunks)
    result[name] = report.split_report(split.labels, pred, loss, in_top5, data.class_names)
  rows = progress.history
  timing = {'device_kind': jax.devices()[0].device_kind}
  if compile_s is not None:
    timing['compile_s'] = compile_s
  if rows:
    timed = rows[1:] or rows  # the first epoch includes warm-up
    timing['train_time_per_epoch_s'] = float(np.mean([r['epoch_time_s'] for r in timed]))
    timing['train_images_per_s'] = float(np.mean([r['train_images_per_s'] for r in timed]))
  if config.measure_inference:
    timing.update(measure_inference(model, variables, IMAGE_SHAPE, config.eval_batch_size))
  result['timing'] = timing
  if config.early_stopping.enabled:
    result['early_stopping'] = {'stopped_epoch': progress.stopped_epoch,
                                'best_epoch': progress.best_epoch,
                                'monitor': config.early_stopping.monitor,
                                'best_value': progress.monitor_best}
  return result
