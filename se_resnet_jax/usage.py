"""The commands' --help: what the command does, its own flags, and every config field.

`FIELD_MEANINGS` is the one place that says what each field of `config.base_config()` means; a test
keeps its keys equal to base_config's, so a new field cannot reach --help without a meaning.
"""

import sys
from typing import Optional, Sequence

import ml_collections
from absl import flags
from flax import traverse_util

from se_resnet_jax.config import base_config, load_config_file

FIELD_MEANINGS = {
    'dataset': 'cifar10, cifar100, or synthetic (generated images, offline)',
    'label_key': "CIFAR-100 labels: 'label' (100 fine classes) or 'coarse_label' (20)",
    'data_dir': "tfds data directory; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets",
    'npz_path': '.npz with x_train, y_train, x_test, y_test (uint8 NHWC) instead of tfds',
    'download': 'let tfds download a dataset missing from data_dir',
    'validation_size': 'examples held out of the training split for validation; 0 = none',
    'validation_seed': 'seed of the validation (and k-fold) split, independent of `seed`',
    'stratified_validation': 'keep class proportions in the validation split',
    'kfold.num_folds': 'k-fold cross-validation: number of folds; 0 = off (use validation_size)',
    'kfold.fold': 'k-fold cross-validation: the fold that validates',
    'synthetic.num_classes': 'generated data: number of classes',
    'synthetic.num_train': 'generated data: training images',
    'synthetic.num_test': 'generated data: test images',
    'synthetic.noise': 'generated data: std of the pixel noise added to each class template',
    'synthetic.seed': 'generated data: seed',
    'model.name': ('SEResNet18/34/50/101/152, SEResNet20/32/44/56/110/164, SEWRN16_8, '
                   'SEWRN28_10, or the same without SE (ResNet..., WRN...)'),
    'model.num_filters': ('width of the stem and first stage; later stages double it (16 for '
                          "He et al.'s CIFAR ResNets and WRNs)"),
    'model.se_reduction': 'SE reduction ratio r (hidden width = channels / r), all stages',
    'model.se_reductions': 'per-stage r, e.g. (8, 16, 16, 32); None in a stage = no SE there',
    'model.dropout_rate': 'dropout before the classifier',
    'model.relu_before_se': 'a ReLU before each SE block (public PyTorch CIFAR SE-ResNets)',
    'model.shortcut': "where a unit changes shape: 'A' zero-pad, 'B' 1x1 conv + BN, '' = default",
    'model.se_bias': 'biases in the SE Dense layers (False: senet.pytorch CIFAR weights)',
    'model.kernel_init': 'first weights: lecun_normal (Flax), he_normal_fan_out (torchvision) '
                         'or torch_default (PyTorch Conv2d/Linear)',
    'model.zero_init_residual': "each residual branch's last BatchNorm scale starts at 0 (else 1)",
    'augment.enabled': 'augment training images at all (False: scale to [0, 1] only)',
    'augment.random_crop': 'random crop of the zero-padded image',
    'augment.crop_padding': 'padding (pixels) of the random crop',
    'augment.flip': 'random horizontal flip',
    'augment.brightness': 'brightness jitter strength s: factor in [1-s, 1+s]; 0 = off',
    'augment.contrast': 'contrast jitter strength; 0 = off',
    'augment.saturation': 'saturation jitter strength; 0 = off',
    'augment.hue': 'hue rotation, fraction of a turn in [0, 0.5]; 0 = off',
    'augment.cutout_size': 'side of the cutout square (pixels); 0 = off',
    'num_epochs': 'epochs to train; a larger value continues a finished run',
    'max_steps': 'stop after this many steps (smoke tests); -1 = all epochs',
    'batch_size': 'global training batch, over all devices and hosts',
    'eval_batch_size': 'global evaluation batch (a multiple of the device count)',
    'learning_rate': 'peak learning rate (SGD)',
    'momentum': 'SGD momentum',
    'nesterov': 'Nesterov momentum',
    'weight_decay': 'L2 weight decay, on the parameters weight_decay_mask names',
    'weight_decay_mask': "'kernels' (conv and dense kernels) or 'all' (BatchNorm, biases too)",
    'schedule': 'learning-rate schedule: cosine, multistep, onecycle or constant',
    'warmup_epochs': 'linear warm-up from 0 to learning_rate, in epochs (fractions allowed)',
    'lr_decay_epochs': 'multistep: the epochs where the rate is multiplied by lr_decay_factor',
    'lr_decay_factor': 'multistep: the factor at each of lr_decay_epochs',
    'label_smoothing': 'label smoothing of the cross-entropy; 0 = off',
    'ema_decay': 'moving average of the weights and BatchNorm statistics, evaluated; 0 = off',
    'half_precision': 'bf16 compute (fp32 parameters and optimizer state)',
    'seed': 'seed of initialisation, batch order, augmentation and dropout',
    'log_every_steps': 'steps between progress lines',
    'eval_every_epochs': 'epochs between validations (and best-checkpoint choices)',
    'checkpoint_every_epochs': 'epochs between checkpoints',
    'keep_checkpoints': 'latest checkpoints kept (the best one is kept apart)',
    'early_stopping.enabled': 'stop when the monitored validation metric stops improving',
    'early_stopping.monitor': 'val_accuracy or val_loss',
    'early_stopping.patience': 'evaluations without improvement before stopping',
    'early_stopping.min_delta': 'smallest change that counts as an improvement',
    'evaluate_test': 'evaluate the test set once, at the end, on the best-validation weights',
    'tta_flip': 'evaluation averages each image with its mirror',
    'measure_inference': 'time inference (images/s, batch-1 latency) for the report',
}

HELP_ARGUMENTS = ('--help', '-h', '-?', '--helpshort', '--help=true', '--helpshort=true')


def config_fields_help(config: Optional[ml_collections.ConfigDict] = None) -> list:
  """One line per config field: `--config.name=value  meaning`, values of `config` if given."""
  flat = traverse_util.flatten_dict((config or base_config()).to_dict(), sep='.')
  settings = [f'--config.{name}={_show(value)}' for name, value in flat.items()]
  width = min(max(map(len, settings)), 48)
  return [f'  {setting.ljust(width)}  {FIELD_MEANINGS.get(name, "")}'.rstrip()
          for setting, name in zip(settings, flat)]


def _show(value) -> str:
  if isinstance(value, str):
    return repr(value) if not value or ' ' in value else value
  return str(value).replace(' ', '')


def command_help(argv: Sequence[str], doc: Optional[str]) -> str:
  """--help of a command: its docstring, its own flags and, when it takes --config, the fields."""
  config_path = next((a.split('=', 1)[1] for a in reversed(argv) if a.startswith('--config=')),
                     None)
  lines = [(doc or '').strip(), '', 'Flags (--helpfull lists every library\'s flags too):',
           flags.FLAGS.main_module_help().strip().split('\n', 1)[-1], '']
  if 'config' in flags.FLAGS:
    config, source = None, 'defaults of se_resnet_jax.config.base_config()'
    if config_path:
      try:
        config, source = load_config_file(config_path), f'values of {config_path}'
      except Exception as e:  # noqa: BLE001 - help still shows the defaults
        source += f' ({config_path} does not load: {type(e).__name__}: {e})'
    lines += [f'Config fields, set with --config.<field>=<value> ({source}):',
              *config_fields_help(config), '',
              '-v 1 (or --verbosity=1) also shows the libraries\' INFO logs (JAX, orbax, ...).']
  return '\n'.join(lines)


def exit_with_help_if_asked(argv: Sequence[str]) -> None:
  """Prints the command's help on stdout and exits 0 when argv asks for it."""
  if any(arg in HELP_ARGUMENTS for arg in argv[1:]):
    print(command_help(argv, getattr(sys.modules.get('__main__'), '__doc__', None)))
    sys.exit(0)
