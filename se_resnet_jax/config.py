"""The base training config and its validation: every run goes through `validate_config` first,
so a typo or an impossible value stops it with one clear message before anything is loaded."""

import importlib.util
import math
import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from se_resnet_jax import augment
from se_resnet_jax.errors import ConfigError
from se_resnet_jax.models import IMAGE_SHAPE, MODELS, SEResNet, create_model, has_se

DATASETS = {'cifar10': 10, 'cifar100': 100, 'synthetic': None}
SCHEDULES = ('cosine', 'multistep', 'onecycle', 'constant')
MONITORS = ('val_accuracy', 'val_loss')
WEIGHT_DECAY_MASKS = ('kernels', 'all')


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults for SE-ResNet18 on CIFAR-10."""
  c = ml_collections.ConfigDict()
  c.dataset = 'cifar10'  # cifar10, cifar100, or synthetic (generated images, offline)
  c.label_key = 'label'  # CIFAR-100 labels: 'label' (100 fine classes) or 'coarse_label' (20)
  c.data_dir = ''  # tfds data directory; '' means $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.npz_path = ''  # .npz of x_train, y_train, x_test, y_test (uint8 NHWC) instead of tfds
  c.download = True  # let tfds download a dataset missing from data_dir
  c.validation_size = 5000  # examples held out of the training split for validation; 0 = none
  c.validation_seed = 0  # seed of the validation (and k-fold) split, independent of `seed`
  c.stratified_validation = True  # keep class proportions in the validation split
  # num_folds: k-fold cross-validation's number of folds; 0 = off (validation_size holds out)
  # fold: the fold that validates, in [0, num_folds)
  c.kfold = ml_collections.ConfigDict(dict(num_folds=0, fold=0))
  c.synthetic = ml_collections.ConfigDict(dict(
      # num_classes: number of classes
      # num_train: training images
      # num_test: test images
      # noise: std of the pixel noise added to each class template
      # seed: seed of the templates and the noise
      num_classes=10, num_train=2000, num_test=500, noise=0.35, seed=0))

  c.model = ml_collections.ConfigDict(dict(
      # name: a network of models.MODEL_NAMES, e.g. SEResNet18, SEResNet56, SEWRN28_10, ResNet18
      # num_filters: width of the stem and first stage, doubled by each later stage (16: CIFAR nets)
      # se_reduction: SE reduction ratio r (hidden width = channels / r), in every stage
      # se_reductions: per-stage r, e.g. (8, 16, 16, 32); None in a stage = no SE there
      # dropout_rate: dropout before the classifier
      name='SEResNet18', num_filters=64, se_reduction=16, se_reductions=(), dropout_rate=0.5,
      # A ReLU between each residual branch's last BatchNorm and its SE block. Not the paper's
      # network, but the layout of public PyTorch CIFAR SE-ResNets whose weights convert.py reads.
      relu_before_se=False,
      # Shortcut where a unit changes shape: 'A' zero-padded identity, 'B' 1x1 conv + BN, '' the
      # network's own. That is A for ResNet20...110, else B; post-activation networks only.
      shortcut='',
      se_bias=True,  # biases in the SE Dense layers (senet.pytorch's CIFAR SE-ResNets: none)
      # How weights start: lecun_normal (Flax), he_normal_fan_out (torchvision) or torch_default
      # (PyTorch's Conv2d/Linear default).
      kernel_init='lecun_normal',
      # Each residual branch's last BatchNorm scale starts at 0 (False: at 1). Every unit then
      # starts as the identity; kuangliu's and weiaicunzai's PyTorch CIFAR networks start at 1.
      zero_init_residual=True))
  c.augment = augment.default_augment_config()

  c.num_epochs = 100  # epochs to train; a larger value continues a finished run
  c.max_steps = -1  # stop early after this many steps (smoke tests); -1 runs all epochs
  c.batch_size = 128  # global training batch, over all devices and hosts
  c.eval_batch_size = 1000  # global evaluation batch (a multiple of the device count)
  c.learning_rate = 0.1  # peak learning rate (SGD)
  c.momentum = 0.9  # SGD momentum
  c.nesterov = True  # Nesterov momentum
  c.weight_decay = 5e-4  # L2, on the parameters weight_decay_mask names
  # 'kernels' (conv and dense kernels) or 'all' (BatchNorm scales and biases too). With 'all' it
  # decays what torch.optim.SGD(model.parameters(), weight_decay=...) decays.
  c.weight_decay_mask = 'kernels'
  c.schedule = 'cosine'  # learning-rate schedule: cosine, multistep, onecycle or constant
  c.warmup_epochs = 1.0  # linear warm-up from 0 to learning_rate, in epochs (fractions allowed)
  c.lr_decay_epochs = (50, 75)  # multistep: epochs where the rate is multiplied by lr_decay_factor
  c.lr_decay_factor = 0.1  # multistep: the factor at each of lr_decay_epochs
  c.label_smoothing = 0.0  # label smoothing of the cross-entropy; 0 = off
  c.ema_decay = 0.0  # EMA of weights and BatchNorm statistics, evaluated; 0 = off, else e.g. 0.999
  c.half_precision = False  # bf16 compute, fp32 parameters and optimizer state
  c.seed = 0  # seed of initialisation, batch order, augmentation and dropout

  c.log_every_steps = 100  # steps between progress lines
  # write TensorBoard summaries; False saves importing TensorFlow (seconds of start-up)
  # and leaves the per-epoch numbers to report.json alone.
  c.tensorboard = True
  c.eval_every_epochs = 1  # epochs between validations (and best-checkpoint choices)
  c.checkpoint_every_epochs = 1  # epochs between checkpoints
  c.keep_checkpoints = 3  # latest checkpoints kept (the best one is kept apart)
  c.early_stopping = ml_collections.ConfigDict(dict(
      # enabled: stop when the monitored validation metric stops improving
      # monitor: val_accuracy or val_loss
      # patience: evaluations without improvement before stopping
      # min_delta: smallest change that counts as an improvement
      enabled=False, monitor='val_accuracy', patience=10, min_delta=0.0))
  c.evaluate_test = True  # evaluate the test set once, at the end, on the best-validation weights
  c.tta_flip = False  # evaluation averages each image with its mirror
  c.measure_inference = True  # time inference (images/s, batch-1 latency) for the report
  return c


def _check_keys_and_types(config: Any, reference: Any, path: str = '') -> None:
  for key in config.keys():
    name = f'{path}{key}'
    if key not in reference:
      raise ConfigError(f'Unknown config key {name!r}. Known keys here: '
                        f'{", ".join(sorted(reference.keys()))}.')
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f'Config {name!r} must be a group of fields, got {value!r}.')
      _check_keys_and_types(value, ref, name + '.')
    elif isinstance(ref, bool) != isinstance(value, bool) or not _same_kind(value, ref):
      raise ConfigError(f'Config {name!r} should be a {type(ref).__name__} (like {ref!r}), '
                        f'got {value!r} ({type(value).__name__}).')
    elif any(isinstance(v, float) and not math.isfinite(v)
             for v in (value if isinstance(value, (tuple, list)) else (value,))):
      raise ConfigError(f'{name} must be a finite number, got {value}.')


def _same_kind(value: Any, ref: Any) -> bool:
  if isinstance(ref, float):
    return isinstance(value, (int, float))
  if isinstance(ref, (tuple, list)):  # numbers stay numbers: '--config.lr_decay_epochs=abc'
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(value, (tuple, list)) and (
        not ref or not all(map(number, ref)) or all(map(number, value)))
  return isinstance(value, type(ref))


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate_config(config: ml_collections.ConfigDict, device_count: int = 1) -> None:
  """Raises ConfigError naming the first impossible value and how to fix it."""
  _check_keys_and_types(config, base_config())
  _require(config.dataset in DATASETS, f'Unknown dataset {config.dataset!r}; choose one of '
           f'{", ".join(DATASETS)}.')
  _require(config.model.name in MODELS, f'Unknown model.name {config.model.name!r}; choose one of '
           f'{", ".join(MODELS)}.')
  try:  # the network checks its own options (no weights made); each message names the option
    build_model(config, classes=1)
  except ValueError as e:
    raise ConfigError(f'model.{e}') from None
  try:
    augment.validate_augment_config(config.augment)
  except ValueError as e:
    raise ConfigError(f'augment: {e}') from None
  size = IMAGE_SHAPE[0]
  _require(config.augment.cutout_size <= size,
           f'augment.cutout_size={config.augment.cutout_size} is larger than the {size}x{size} '
           'images: cutout would blank most or all of every image. Use at most '
           f'{size} (16 is the usual CIFAR-10 value), or 0 to disable it.')
  for key in ('learning_rate', 'weight_decay', 'label_smoothing', 'warmup_epochs'):
    _require(config[key] >= 0, f'{key} must be >= 0, got {config[key]}.')
  _require(0.0 <= config.momentum < 1.0, f'momentum must be in [0, 1), got {config.momentum}.')
  _require(0.0 <= config.ema_decay < 1.0, f'ema_decay must be in [0, 1), got {config.ema_decay}.')
  _require(config.label_smoothing < 1.0, 'label_smoothing must be below 1.')
  _require(config.weight_decay_mask in WEIGHT_DECAY_MASKS,
           f'Unknown weight_decay_mask {config.weight_decay_mask!r}; choose one of '
           f'{", ".join(WEIGHT_DECAY_MASKS)}.')
  _require(config.schedule in SCHEDULES,
           f'Unknown schedule {config.schedule!r}; choose one of {", ".join(SCHEDULES)}.')
  _require(config.num_epochs >= 1, f'num_epochs must be >= 1, got {config.num_epochs}.')
  if config.schedule == 'onecycle':
    _require(config.warmup_epochs < config.num_epochs,
             f'schedule=onecycle warms up for warmup_epochs={config.warmup_epochs} of '
             f'num_epochs={config.num_epochs}; its warm-up must end before the run does '
             f'(warmup_epochs < num_epochs; 30% of the run is usual: {0.3 * config.num_epochs:g}).')
  _require(config.warmup_epochs <= config.num_epochs,
           f'warmup_epochs={config.warmup_epochs} is longer than the run (num_epochs='
           f'{config.num_epochs}): the learning rate would never reach learning_rate. Use '
           'warmup_epochs <= num_epochs (1 to 5 is usual).')
  _require(config.batch_size >= 1 and config.eval_batch_size >= 1, 'batch sizes must be positive.')
  for key in ('batch_size', 'eval_batch_size'):
    _require(config[key] % device_count == 0,
             f'{key}={config[key]} is not divisible by the {device_count} devices; use a multiple '
             f'of {device_count} (e.g. {max(1, config[key] // device_count) * device_count}).')
  _require(config.validation_size >= 0, 'validation_size must be >= 0.')
  synthetic = config.synthetic
  if config.dataset == 'synthetic':
    _require(not config.npz_path,
             f'npz_path={config.npz_path!r} is set, but dataset=synthetic generates its images and '
             'would ignore it: set --config.dataset to what the arrays hold (cifar10 or cifar100), '
             'or clear npz_path.')
    _require(synthetic.noise >= 0,
             f'synthetic.noise must be >= 0 (the standard deviation of the noise added to the '
             f'generated images), got {synthetic.noise}.')
    _require(synthetic.num_classes >= 2 and synthetic.num_train >= 1 and synthetic.num_test >= 1,
             'synthetic needs num_classes >= 2 and num_train, num_test >= 1, got '
             f'{synthetic.num_classes}, {synthetic.num_train} and {synthetic.num_test}.')
  _require(config.kfold.num_folds == 0 or (config.kfold.num_folds >= 2
                                           and 0 <= config.kfold.fold < config.kfold.num_folds),
           f'kfold needs num_folds >= 2 and 0 <= fold < num_folds (or num_folds=0 to disable), got '
           f'{config.kfold.num_folds} and {config.kfold.fold}.')
  _require(config.log_every_steps >= 1 and config.eval_every_epochs >= 1
           and config.checkpoint_every_epochs >= 1 and config.keep_checkpoints >= 1,
           'log_every_steps, eval_every_epochs, checkpoint_every_epochs and keep_checkpoints '
           'must be >= 1.')
  es = config.early_stopping
  _require(es.monitor in MONITORS, f'early_stopping.monitor must be one of {", ".join(MONITORS)}.')
  _require(es.patience >= 1 and es.min_delta >= 0,
           'early_stopping.patience must be >= 1 and min_delta >= 0.')
  _require(not es.enabled or config.validation_size > 0 or config.kfold.num_folds,
           'early_stopping needs a validation split: set validation_size > 0.')


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, loaded by path as `--config=path` loads it."""
  name = 'config_file_' + os.path.splitext(os.path.basename(str(path)))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The classifier's width: the class count of the config's data."""
  if config.dataset == 'synthetic':
    return config.synthetic.num_classes
  if config.dataset == 'cifar100' and config.label_key == 'coarse_label':
    return 20
  return DATASETS[config.dataset]


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """bf16 with `half_precision` (parameters and optimizer state stay fp32), else fp32."""
  return jnp.bfloat16 if config.half_precision else jnp.float32


def model_options(config: ml_collections.ConfigDict, classes: int) -> dict:
  """create_model's keyword arguments (the PyTorch twin's too); options at their defaults are
  left out, so every family accepts what it is given."""
  m = config.model
  options = dict(num_classes=classes, num_filters=m.num_filters, dropout_rate=m.dropout_rate)
  if has_se(m.name):
    options['se_reduction'] = ([r or None for r in m.se_reductions] if m.se_reductions
                               else m.se_reduction or None)
  defaults = dict(relu_before_se=False, shortcut='', se_bias=True, kernel_init='lecun_normal',
                  zero_init_residual=True)
  options.update({k: m[k] for k, default in defaults.items() if m[k] != default})
  return options


def build_model(config: ml_collections.ConfigDict, classes: int) -> SEResNet:
  """The network `config.model` describes; its own checks refuse impossible options."""
  return create_model(config.model.name, dtype=compute_dtype(config),
                      **model_options(config, classes))


def architecture(config: ml_collections.ConfigDict, classes: int) -> dict:
  """What a checkpoint's weights compute; a resume or an evaluation refuses a mismatch. (The
  initialisers only decide the first weights, so they are not part of it.)"""
  m = config.model
  return dict(name=m.name, num_filters=m.num_filters, num_classes=classes,
              se_reduction=model_options(config, classes).get('se_reduction'),
              relu_before_se=m.relu_before_se, shortcut=m.shortcut, se_bias=m.se_bias)
