"""Evaluating weights: a split's metrics, the final report's content and inference timing."""

from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from se_resnet_jax import input_pipeline, report
from se_resnet_jax.inference import measure_inference
from se_resnet_jax.models import IMAGE_SHAPE, SEResNet
from se_resnet_jax.progress import Progress
from se_resnet_jax.sharding import shard_eval_split
from se_resnet_jax.steps import evaluate


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
