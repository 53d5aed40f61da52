"""The training loop: data-parallel SGD epochs with checkpoints, evaluation and the final report.

Each compiled step (see `steps.make_train_step`) draws its batch from the device-resident uint8
training set, augments it and updates the state; this module only drives it: resuming, logging,
evaluating, early stopping, the NaN guard, checkpointing and stopping on SIGTERM or SIGINT.

Whatever can be wrong is found before any compute, in this order: the config, the workdir (and its
lock: one process per run), the data, then the checkpoints (their checksums, the best one too, and
that they are this network and these data settings). Only then is anything compiled.
"""

import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from se_resnet_jax import (
  input_pipeline,
  report,
  rundir,
  sharding,
  steps,
  summary,
  writers,
)
from se_resnet_jax.checkpoints import RunCheckpoints
from se_resnet_jax.config import validate_config
from se_resnet_jax.console import Console, TrainingProgress
from se_resnet_jax.errors import ConfigError, Preempted
from se_resnet_jax.plan import plan_run
from se_resnet_jax.progress import Progress
from se_resnet_jax.stopping import Interruption, check_finite
from se_resnet_jax.workdir import prepare_workdir, workdir_lock


def _warn_if_all_warmup(config: ml_collections.ConfigDict, steps_per_epoch: int,
                        total_steps: int) -> None:
  """A run that is warm-up from end to end never trains at the full learning rate: say so."""
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule != 'constant' and warmup_steps >= total_steps:
    logging.warning(
        'warmup_epochs=%g covers the whole run (%d of %d steps): the learning rate only rises '
        'and never reaches its schedule. Lower --config.warmup_epochs (e.g. to %g) or train '
        'more epochs.', config.warmup_epochs, min(warmup_steps, total_steps), total_steps,
        config.num_epochs / 10)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       writer: Optional[Any] = None, hooks: Sequence[writers.Hook] = (),
                       allow_changed_data: bool = False,
                       console: Optional[Console] = None) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), then writes the full report.

  Returns the report. On SIGTERM or SIGINT it saves a checkpoint and raises `Preempted`; rerunning
  resumes. A finished run whose report asks for the same config is answered from its report.json
  in seconds; a larger num_epochs (or max_steps) trains it further. `writer` (default: TensorBoard
  in `workdir`) receives the epoch scalars; after every step each of `hooks` is called with (step,
  state). `console` (default: stderr of process 0) shows the progress. A resume with other data
  settings (`input_pipeline.data_identity`) than the checkpoints record is refused unless
  `allow_changed_data`.
  """
  validate_config(config, jax.device_count())
  prepare_workdir(workdir)
  console = console or Console()
  finished = summary.finished_report(workdir, config, allow_changed_data)
  if finished is not None:
    if jax.process_index() == 0:
      summary.ensure_markdown(workdir, finished)
    console.say(summary.finished_message(workdir, finished))
    return finished
  with workdir_lock(workdir, jax.process_index()), Interruption() as interruption:
    return _train_and_evaluate(config, workdir, writer, hooks, allow_changed_data, interruption,
                               console)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, writer: Optional[Any],
                        hooks: Sequence[writers.Hook], allow_changed_data: bool,
                        interruption: Interruption, console: Console) -> dict:
  data = input_pipeline.load_dataset(config)
  mesh = sharding.data_mesh()
  replicated = NamedSharding(mesh, P())
  plan = plan_run(config, len(data.train), mesh.size)
  model, schedule = plan.model, plan.schedule
  steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
  _warn_if_all_warmup(config, steps_per_epoch, total_steps)

  ckpts = RunCheckpoints(workdir, config.keep_checkpoints)
  record = rundir.read_record(workdir)
  resuming = record is not None and bool(ckpts.steps())
  if resuming:
    try:
      input_pipeline.check_same_data(record.data, plan.data, f'The run in {workdir}')
    except input_pipeline.DataSettingsChangedError as e:
      if not allow_changed_data:
        raise
      changed = ', '.join(f'{k}: {old!r} there, {new!r} now'
                          for k, (old, new) in sorted(e.differences.items()))
      logging.warning('The run in %s was made with other data settings (%s); going on, as '
                      '--allow_changed_data asks.', workdir, changed)
  # A step of another run (copied in) is set aside: its run id is not this one.
  ckpts.run_id = run_id = record.run_id if resuming else rundir.new_run_id()
  progress = Progress(plan.architecture)
  # Restored onto shapes only: a damaged or mismatched checkpoint is found before any compiling.
  state, meta = ckpts.resume(plan.abstract_state(replicated), plan.architecture)
  if interruption.before_training():  # a signal while the data loaded
    raise Preempted(0 if state is None else int(state.step), workdir, interruption.signal_name,
                    saved=False)
  console.say('Config, data and checkpoints checked; compiling.')
  if state is None:
    state = plan.init_state(replicated)
  else:
    progress = Progress.from_meta(meta)
    console.say(f'Resumed from {workdir} at step {int(state.step)} (epoch {progress.epoch}).')
  start_step = int(state.step)
  if start_step > total_steps:
    raise ConfigError(
        f'The run in {workdir} has trained {start_step} steps (epoch {progress.epoch}), more than '
        f'this config plans ({total_steps} steps: num_epochs={config.num_epochs}'
        f'{f", max_steps={config.max_steps}" if config.max_steps > 0 else ""}); a run cannot be '
        'shortened. Rerun with the num_epochs (and max_steps) it was trained with to read its '
        'result, or use a new --workdir.')
  # Only once the checkpoints are known to fit this config.
  rundir.write_record(workdir, rundir.RunRecord(
      run_id, record.started if resuming else rundir.now(), plan.architecture, plan.data,
      list(data.class_names), list(data.mean), list(data.std)),
      input_pipeline.with_data_location(config))

  train_images, train_labels = sharding.shard_train_split(data.train, mesh)
  val_chunks = (sharding.shard_eval_split(data.validation, mesh, config.eval_batch_size)
                if data.validation is not None else None)
  data_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 2)
  permutation = sharding.make_epoch_permutation(mesh, train_images.shape[1])
  eval_step = steps.make_eval_step(config, model, data.mean, data.std)
  writer = writer or writers.create_writer(workdir, config.tensorboard)
  if start_step == 0:
    writer.write_hparams(writers.hparams(config))

  compile_start = time.perf_counter()
  empty_metrics = jax.device_put(steps.Metrics.empty(), replicated)
  mean_std = jax.device_put(steps.normalization(data.mean, data.std), replicated)
  train_step = steps.make_train_step(config, steps_per_epoch, config.batch_size // mesh.size)
  trains = start_step < total_steps and progress.stopped_epoch is None  # else: evaluate only
  step_fn = (train_step.lower(state, empty_metrics, train_images, train_labels,
                              permutation(data_rng, 0), step_rng, mean_std).compile()
             if trains else None)
  compile_s = time.perf_counter() - compile_start if trains else None
  if trains:
    console.say(f'Compiled the train step in {compile_s:.1f}s; {steps_per_epoch} steps/epoch, '
                f'{mesh.size} devices, global batch {config.batch_size}.')
  if interruption.before_training():  # a signal while data loaded or the step compiled
    raise Preempted(start_step, workdir, interruption.signal_name, saved=False)
  display = TrainingProgress(console, total_steps, steps_per_epoch, config.num_epochs,
                             config.batch_size, start_step)

  epoch_metrics, perm_epoch, perm = empty_metrics, None, None
  epoch_start, epoch_first_step = time.perf_counter(), start_step
  partial = (meta or {}).get('epoch_partial')  # a save mid-epoch: that epoch's running sums
  if partial and partial.get('step') == start_step:
    epoch_metrics = _metrics_from_meta(partial['metrics'], empty_metrics, replicated)
    epoch_start -= partial['elapsed_s']
    epoch_first_step = partial['first_step']
  step = start_step
  while step < total_steps and progress.stopped_epoch is None:
    epoch = step // steps_per_epoch
    if perm_epoch != epoch:
      perm, perm_epoch = permutation(data_rng, epoch), epoch
    state, epoch_metrics = step_fn(state, epoch_metrics, train_images, train_labels, perm,
                                   step_rng, mean_std)
    step += 1
    for hook in hooks:
      hook(step, state)
    end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
    if step % config.log_every_steps == 0 and not end_of_epoch:  # else the epoch line says it
      current = epoch_metrics.scalars()  # waits for the step
      check_finite(current['loss'], step, ckpts, workdir)
      display.step(step, current)
    preempted = interruption.reached(step)
    save = best = False
    if end_of_epoch:
      train = epoch_metrics.scalars()
      check_finite(train['loss'], step, ckpts, workdir, state)
      epoch_time = time.perf_counter() - epoch_start
      row = {'epoch': epoch + 1, 'step': step, 'train_loss': train['loss'],
             'train_accuracy': train['accuracy'], 'learning_rate': float(schedule(step)),
             'epoch_time_s': epoch_time,
             'train_images_per_s': (step - epoch_first_step) * config.batch_size / epoch_time}
      is_last = step == total_steps
      if val_chunks is not None and ((epoch + 1) % config.eval_every_epochs == 0 or is_last):
        val = steps.evaluate(eval_step, steps.eval_variables(state), val_chunks)[0]
        row.update(val_loss=val['loss'], val_accuracy=val['accuracy'])
        best = progress.validated(row, config.early_stopping)
      progress.history.append(row)
      progress.epoch = epoch + 1
      writer.write_scalars(step, {k: v for k, v in row.items() if k not in ('epoch', 'step')})
      save = ((epoch + 1) % config.checkpoint_every_epochs == 0 or is_last or best
              or progress.stopped_epoch is not None)
      epoch_metrics = empty_metrics
      epoch_start, epoch_first_step = time.perf_counter(), step
    elif preempted:
      check_finite(epoch_metrics.scalars()['loss'], step, ckpts, workdir, state)
    if save or preempted:
      step_meta = progress.to_meta()
      if not end_of_epoch:  # so a resumed epoch's train metrics and timing cover all its steps
        step_meta['epoch_partial'] = {
            'step': step, 'first_step': epoch_first_step,
            'elapsed_s': time.perf_counter() - epoch_start,
            'metrics': [np.asarray(x).item() for x in jax.tree.leaves(epoch_metrics)]}
      ckpts.save(step, state, step_meta, best=best)
    if end_of_epoch:  # after the save, so the next progress line times training alone
      display.epoch(row, best)
      if progress.stopped_epoch is not None:
        console.say(f'Early stopping at epoch {progress.stopped_epoch}: '
                    f'{config.early_stopping.monitor} has not '
                    f'improved for {config.early_stopping.patience} evaluations.')
    if preempted:
      writer.flush()
      ckpts.close()
      raise Preempted(step, workdir, interruption.signal_name)
  writer.flush()
  interruption.disarm()  # from here a signal ends the command at once: there is nothing to save

  final, weights = state, {'epoch': progress.epoch, 'step': step, 'run_id': run_id,
                           'chosen_by': 'the last epoch'}
  best_step = ckpts.latest_step('best') if val_chunks is not None else None
  if best_step is not None:
    best_epoch = progress.epoch
    if best_step != step:  # else the best checkpoint holds the state in hand
      final, best_meta = ckpts.restore(state, which='best', architecture=progress.architecture)
      best_epoch = best_meta['epoch']
    weights = {'epoch': best_epoch, 'step': int(final.step), 'run_id': run_id,
               'chosen_by': 'the best validation accuracy'}
  ckpts.close()
  splits = ('validation', 'test') if config.evaluate_test else ('validation',)
  console.say(f'Evaluating the weights of epoch {weights["epoch"]} ({weights["chosen_by"]}) on '
              f'{" and ".join(s for s in splits if getattr(data, s) is not None)}'
              f'{", then timing inference" if config.measure_inference else ""}...')
  result = report.final_report(config, data, model, steps.eval_variables(final), int(final.step),
                               progress, eval_step, mesh, compile_s, splits)
  result['weights'] = weights
  result['run_id'] = run_id
  result['data'] = plan.data  # what a rerun must ask for to be answered from this report
  result['training'] = {'steps': step, 'steps_per_epoch': steps_per_epoch,
                        'planned_steps': steps_per_epoch * config.num_epochs}
  if jax.process_index() == 0:
    report.write_report(workdir, result, progress.history)
  writer.write_scalars(int(state.step), {f'final_{split}_{k}': result[split][k]
                                         for split in ('validation', 'test') if split in result
                                         for k in ('accuracy', 'loss')})
  writer.close()
  return result


def _metrics_from_meta(values: list, empty: Any, sharding: Any) -> Any:
  """The running train metrics a checkpoint recorded, as the loop's Metrics (same dtypes)."""
  leaves, treedef = jax.tree.flatten(empty)
  return jax.device_put(jax.tree.unflatten(treedef, [
      np.asarray(v, np.asarray(leaf).dtype) for v, leaf in zip(values, leaves)]), sharding)
