"""A run on disk: the record it writes when it starts, its config, and its weights read back.

The record (`run.json`) holds what every later reader needs and no checkpoint says: the run id
(each checkpoint step names it, so a step copied in from another run is never taken for this
one's), the network, the data settings, the class names and the training split's normalisation
constants. So restoring a run reads no dataset: a run exports, predicts and converts after its
data has moved. `config.json` is the config the run was made with.
"""

import dataclasses
import datetime
import glob
import json
import os
import uuid
from typing import Optional

import jax
import ml_collections
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from se_resnet_jax import files, input_pipeline
from se_resnet_jax.checkpoints import CheckpointError, CheckpointNotFoundError, RunCheckpoints
from se_resnet_jax.config import base_config, validate_config
from se_resnet_jax.errors import ConfigError
from se_resnet_jax.models import SEResNet
from se_resnet_jax.plan import plan_run
from se_resnet_jax.progress import Progress
from se_resnet_jax.sharding import data_mesh
from se_resnet_jax.steps import eval_variables

RUN_FILE = 'run.json'
CONFIG_FILE = 'config.json'


class RunRecordError(CheckpointError):
  """The workdir has no readable run record: it is not a run of this library (`path`)."""

  def __init__(self, message: str, path: str):
    super().__init__(message)
    self.path = path


@dataclasses.dataclass
class RunRecord:
  run_id: str
  started: str  # when the run was first started (ISO 8601)
  architecture: dict  # config.architecture
  data: dict  # input_pipeline.data_identity: which images are train, validation and test
  class_names: list
  mean: list  # per-channel mean and std in [0, 1] of the training split: the input scaling
  std: list


def new_run_id() -> str:
  return uuid.uuid4().hex[:12]


def now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def read_record(workdir: str) -> Optional[RunRecord]:
  """The workdir's record; None when it has none (a new run), RunRecordError when unreadable."""
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return RunRecord(**json.load(f))
  except (OSError, ValueError, TypeError) as e:
    raise RunRecordError(f'{path} is not a run record this version reads ({type(e).__name__}: '
                         f'{str(e)[:120]}); use a new --workdir.', path) from None


def write_record(workdir: str, record: RunRecord,
                 config: Optional[ml_collections.ConfigDict] = None) -> None:
  """Writes the record (and config.json) from process 0; every process returns once written."""
  if jax.process_index() == 0:
    if config is not None:
      files.write_json_atomic(os.path.join(workdir, CONFIG_FILE), config.to_dict())
    files.write_json_atomic(os.path.join(workdir, RUN_FILE), dataclasses.asdict(record))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('se_resnet_jax: run record written')


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was made with (its config.json), checked as any config is.

  A config.json that is not JSON, or holds a field the config lacks or a value of the wrong type
  (edited by hand), is a ConfigError naming the file.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f'{path} not found: is {workdir!r} a training workdir?')
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


@dataclasses.dataclass
class Run:
  """A run's weights at one checkpoint, with everything needed to use them on images."""
  config: ml_collections.ConfigDict
  model: SEResNet
  variables: dict  # eval-mode {'params', 'batch_stats'}: see steps.eval_variables
  step: int
  checkpoint: str  # what was asked for: 'best', 'latest' or a step number
  progress: Progress  # the run's record at that step: epoch, best_epoch, history, ...
  record: RunRecord

  @property
  def run_id(self) -> str:
    return self.record.run_id


def restore_run(workdir: str, checkpoint: str = 'best',
                config: Optional[ml_collections.ConfigDict] = None,
                allow_changed_data: bool = False) -> Run:
  """A run's weights at `checkpoint` ('best', 'latest' or a step number), reading no dataset.

  The config is the run's own (config.json) unless given; the checkpoint must hold its network,
  and its data settings must be the run's (another --config would evaluate other images under the
  run's name) unless `allow_changed_data`. Runs without a validation split keep no best
  checkpoint: 'best' then means the latest. Nothing is compiled.
  """
  if checkpoint not in ('best', 'latest') and not checkpoint.isdigit():
    raise CheckpointError(f"--checkpoint must be 'best', 'latest' or a step number, got "
                          f'{checkpoint!r}.')
  if not os.path.isdir(workdir):
    raise CheckpointError(f'Workdir {workdir!r} does not exist.')
  record = read_record(workdir)
  if record is None:
    raise RunRecordError(f'{workdir!r} holds no {RUN_FILE}: pass the --workdir of a training run '
                         '(or of `se_resnet_jax.convert --from_torch`).',
                         os.path.join(workdir, RUN_FILE))
  if config is None:
    config = load_run_config(workdir)  # checked as it is read
  else:
    validate_config(config, jax.device_count())
  plan = plan_run(config)
  if not allow_changed_data:
    input_pipeline.check_same_data(record.data, plan.data, f'The run in {workdir}')
  ckpts = RunCheckpoints(workdir, read_only=True, run_id=record.run_id)
  try:
    if not ckpts.steps():
      raise CheckpointNotFoundError(
          f'No checkpoints in {os.path.join(workdir, "checkpoints")} (asked for checkpoint '
          f'{checkpoint!r}): the run saved none yet; train it first.', checkpoint,
          int(checkpoint) if checkpoint.isdigit() else None, [])
    which, step = ('latest', int(checkpoint)) if checkpoint.isdigit() else (checkpoint, None)
    if which == 'best' and ckpts.latest_step('best') is None:
      which = 'latest'
    state, meta = ckpts.restore(plan.abstract_state(NamedSharding(data_mesh(), P())), which,
                                step, plan.architecture)
  finally:
    ckpts.close()
  return Run(config, plan.model, eval_variables(state), int(state.step),
             checkpoint, Progress.from_meta(meta), record)


def report_test_accuracy(workdir: str, step: int, run_id: str) -> tuple:
  """(test accuracy, its report's path in `workdir`) of these very weights, or (None, None).

  Only a report that names the same step of the same run counts (the training report, or an
  `evaluate` report under workdir/evaluation/): the best checkpoint's accuracy is no figure for
  an earlier step's weights.
  """
  candidates = [os.path.join(workdir, 'report.json')]
  candidates += sorted(glob.glob(os.path.join(workdir, 'evaluation', '*', 'report.json')))
  for path in candidates:
    try:
      with open(path) as f:
        report = json.load(f)
      accuracy = float(report['test']['accuracy'])
      weights = report['weights']
    except (OSError, ValueError, KeyError, TypeError):  # no report, or one without a test split
      continue
    if weights.get('step') == step and report.get('run_id') == run_id:
      return accuracy, os.path.relpath(path, workdir)
  return None, None
