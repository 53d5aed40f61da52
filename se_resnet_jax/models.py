"""Squeeze-and-Excitation ResNets for 32x32 images (CIFAR), as Flax linen modules.

Squeeze, Excitation and SEBlock are separate modules so they can be reused in other networks. The
residual units take `conv` and `norm` constructors, as in Flax's ImageNet example, so the network
decides dtype, BatchNorm momentum and train/eval mode in one place.

Every convolution pads like PyTorch's `padding=k//2`: one pixel on each side for a 3x3, none for a
1x1. Flax's default 'SAME' pads a stride-2 3x3 by (0, 1) on an even input, which shifts every
output pixel of that layer by one against the PyTorch network of the same weights
(`se_resnet_jax.torch_models`); symmetric padding makes the two the same function.
"""

from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

ModuleDef = Any
Reduction = Optional[Union[int, Sequence[Optional[int]]]]

PAD_3X3 = ((1, 1), (1, 1))  # PyTorch's padding=1
PAD_1X1 = ((0, 0), (0, 0))

# How convolution and dense weights start. 'lecun_normal' is Flax's default (truncated normal,
# variance 1/fan_in, zero biases). 'he_normal_fan_out' is torchvision's ResNet: convolutions
# kaiming_normal_(mode='fan_out', nonlinearity='relu'), i.e. N(0, 2/fan_out); torchvision leaves
# its Linear layers at PyTorch's default, and so do these dense layers. 'torch_default' is
# PyTorch's Conv2d/Linear default, kaiming_uniform_(a=sqrt(5)): weights and biases
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), a third of LeCun's variance. The PyTorch twin
# (`se_resnet_jax.torch_models`) draws from the same distributions for the same name.
KERNEL_INITS = ('lecun_normal', 'he_normal_fan_out', 'torch_default')


def _check_kernel_init(name: str) -> None:
  if name not in KERNEL_INITS:
    raise ValueError(f'Unknown kernel_init {name!r}; choose one of {", ".join(KERNEL_INITS)}.')


def conv_kernel_init(name: str) -> Callable:
  """The convolution kernel initialiser of `name` (one of KERNEL_INITS)."""
  _check_kernel_init(name)
  if name == 'lecun_normal':
    return nn.initializers.lecun_normal()
  if name == 'he_normal_fan_out':
    return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def dense_inits(name: str, fan_in: int) -> dict:
  """kernel_init and bias_init of a dense layer with `fan_in` inputs under `name`."""
  _check_kernel_init(name)
  if name == 'lecun_normal':
    return dict(kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros)
  bound = fan_in ** -0.5  # PyTorch's Linear default, which torchvision's ResNet keeps as well

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return dict(kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform'),
              bias_init=bias_init)


def residual_scale_init(zero_init_residual: bool) -> Callable:
  """Scale initialiser of a residual branch's last BatchNorm: zeros start the unit as the
  identity (Goyal et al.; the Flax ImageNet example), ones as kuangliu's CIFAR networks."""
  return nn.initializers.zeros if zero_init_residual else nn.initializers.ones


def se_hidden_width(channels: int, reduction: int) -> int:
  """Width C/r of the excitation bottleneck; refuses ratios that would silently round."""
  if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
    raise ValueError(f'SE reduction ratio must be a positive integer, got {reduction!r}.')
  if reduction > channels:
    raise ValueError(
        f'SE reduction ratio r={reduction} exceeds the {channels} channels it squeezes (hidden '
        f'width would be 0). Use r <= {channels}, a larger model.num_filters, or per-stage '
        'ratios.')
  if channels % reduction:
    raise ValueError(
        f'SE reduction ratio r={reduction} does not divide the {channels} channels it squeezes. '
        f'Use a divisor of {channels} (e.g. 8, 16 or 32 for the standard widths).')
  return channels // reduction


class Squeeze(nn.Module):
  """Global average pooling: (N, H, W, C) -> (N, C), the per-channel descriptor."""

  @nn.compact
  def __call__(self, x):
    return jnp.mean(x, axis=(1, 2))


class Excitation(nn.Module):
  """Channel gates in (0, 1): Dense(C/r) -> ReLU -> Dense(C) -> sigmoid."""
  channels: int
  reduction: int = 16
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: str = 'lecun_normal'  # one of KERNEL_INITS

  @nn.compact
  def __call__(self, z):
    dense = partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype)
    hidden = se_hidden_width(self.channels, self.reduction)
    z = nn.relu(dense(hidden, name='reduce', **dense_inits(self.kernel_init, self.channels))(z))
    return nn.sigmoid(dense(self.channels, name='expand',
                            **dense_inits(self.kernel_init, hidden))(z))


class SEBlock(nn.Module):
  """Recalibrates channels: x * Excitation(Squeeze(x))[:, None, None, :]."""
  reduction: int = 16
  dtype: Any = jnp.float32
  kernel_init: str = 'lecun_normal'  # of the excitation's dense layers; one of KERNEL_INITS

  @nn.compact
  def __call__(self, x):
    gates = Excitation(x.shape[-1], self.reduction, dtype=self.dtype,
                       kernel_init=self.kernel_init)(Squeeze()(x))
    return x * gates[:, None, None, :].astype(x.dtype)


class ResidualBlock(nn.Module):
  """Basic unit (3x3, 3x3) with SE on the residual branch before the addition.

  `relu_before_se` puts a ReLU between the branch's last BatchNorm and the SE block, the layout of
  widely used public PyTorch CIFAR SE-ResNets (not the paper's), so their weights compute the
  function they were trained as.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1
  se_reduction: Optional[int] = 16
  relu_before_se: bool = False
  dtype: Any = jnp.float32
  kernel_init: str = 'lecun_normal'  # of the SE block's dense layers (`conv` brings its own)
  zero_init_residual: bool = True  # the branch's last BatchNorm scale starts at 0 (else 1)

  @nn.compact
  def __call__(self, x):
    strides = (self.strides,) * 2
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), strides, padding=PAD_3X3)(x)))
    y = self.norm(scale_init=residual_scale_init(self.zero_init_residual))(
        self.conv(self.filters, (3, 3), padding=PAD_3X3)(y))
    if self.relu_before_se:
      y = self.act(y)
    if self.se_reduction:
      y = SEBlock(self.se_reduction, dtype=self.dtype, kernel_init=self.kernel_init)(y)
    if x.shape != y.shape:
      x = self.conv(self.filters, (1, 1), strides, padding=PAD_1X1, name='conv_proj')(x)
      x = self.norm(name='norm_proj')(x)
    return self.act(x + y)


class BottleneckBlock(nn.Module):
  """Bottleneck unit (1x1, 3x3, 1x1 x4) with SE on the residual branch before the addition.

  The stride sits on the 3x3, as in the PyTorch CIFAR ResNets; `relu_before_se` as in
  ResidualBlock.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1
  se_reduction: Optional[int] = 16
  relu_before_se: bool = False
  dtype: Any = jnp.float32
  kernel_init: str = 'lecun_normal'  # of the SE block's dense layers (`conv` brings its own)
  zero_init_residual: bool = True  # the branch's last BatchNorm scale starts at 0 (else 1)

  @nn.compact
  def __call__(self, x):
    strides = (self.strides,) * 2
    y = self.act(self.norm()(self.conv(self.filters, (1, 1), padding=PAD_1X1)(x)))
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), strides, padding=PAD_3X3)(y)))
    y = self.norm(scale_init=residual_scale_init(self.zero_init_residual))(
        self.conv(self.filters * 4, (1, 1), padding=PAD_1X1)(y))
    if self.relu_before_se:
      y = self.act(y)
    if self.se_reduction:
      y = SEBlock(self.se_reduction, dtype=self.dtype, kernel_init=self.kernel_init)(y)
    if x.shape != y.shape:
      x = self.conv(self.filters * 4, (1, 1), strides, padding=PAD_1X1, name='conv_proj')(x)
      x = self.norm(name='norm_proj')(x)
    return self.act(x + y)


def stage_reductions(se_reduction: Reduction, num_stages: int) -> list:
  """One reduction ratio (or None: no SE) per stage from a global or per-stage setting."""
  if not isinstance(se_reduction, (list, tuple)):  # one ratio; se_hidden_width refuses bad ones
    return [se_reduction] * num_stages
  ratios = list(se_reduction)
  if len(ratios) != num_stages:
    raise ValueError(f'se_reduction has {len(ratios)} entries but the network has {num_stages} '
                     'stages: give one ratio (or None) per stage, or a single int.')
  return ratios


class SEResNet(nn.Module):
  """ResNet for 32x32 inputs (3x3 stride-1 stem, no max-pool) with SE in every residual unit."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int = 10
  num_filters: int = 64
  se_reduction: Reduction = 16
  dropout_rate: float = 0.0
  relu_before_se: bool = False  # see ResidualBlock; for weights of that PyTorch layout
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv
  kernel_init: str = 'lecun_normal'  # how conv and dense weights start: one of KERNEL_INITS
  zero_init_residual: bool = True  # each residual branch's last BatchNorm scale starts at 0

  def __post_init__(self):
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {self.dropout_rate}.')
    if self.num_classes < 1 or self.num_filters < 1:
      raise ValueError('num_classes and num_filters must be positive, got '
                       f'{self.num_classes} and {self.num_filters}.')
    _check_kernel_init(self.kernel_init)
    expansion = 4 if self.block_cls is BottleneckBlock else 1
    for i, r in enumerate(stage_reductions(self.se_reduction, len(self.stage_sizes))):
      if r is not None:
        se_hidden_width(self.num_filters * 2**i * expansion, r)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(self.conv, use_bias=False, dtype=self.dtype,
                   kernel_init=conv_kernel_init(self.kernel_init))
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype)
    x = self.act(norm(name='bn_init')(
        conv(self.num_filters, (3, 3), padding=PAD_3X3, name='conv_init')(x)))
    reductions = stage_reductions(self.se_reduction, len(self.stage_sizes))
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.num_filters * 2**i, conv=conv, norm=norm, act=self.act,
                           strides=strides, se_reduction=reductions[i],
                           relu_before_se=self.relu_before_se, dtype=self.dtype,
                           kernel_init=self.kernel_init,
                           zero_init_residual=self.zero_init_residual)(x)
    x = Squeeze()(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 **dense_inits(self.kernel_init, x.shape[-1]))(x)
    return x.astype(jnp.float32)


SEResNet18 = partial(SEResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResidualBlock)
SEResNet34 = partial(SEResNet, stage_sizes=[3, 4, 6, 3], block_cls=ResidualBlock)
SEResNet50 = partial(SEResNet, stage_sizes=[3, 4, 6, 3], block_cls=BottleneckBlock)
SEResNet101 = partial(SEResNet, stage_sizes=[3, 4, 23, 3], block_cls=BottleneckBlock)
SEResNet152 = partial(SEResNet, stage_sizes=[3, 8, 36, 3], block_cls=BottleneckBlock)

ResNet18 = partial(SEResNet18, se_reduction=None)
ResNet34 = partial(SEResNet34, se_reduction=None)
ResNet50 = partial(SEResNet50, se_reduction=None)
ResNet101 = partial(SEResNet101, se_reduction=None)
ResNet152 = partial(SEResNet152, se_reduction=None)

MODEL_NAMES = ('SEResNet18', 'SEResNet34', 'SEResNet50', 'SEResNet101', 'SEResNet152',
               'ResNet18', 'ResNet34', 'ResNet50', 'ResNet101', 'ResNet152')
MODELS = {name: globals()[name] for name in MODEL_NAMES}


def lookup(registry: dict, name: str) -> Any:
  """The constructor of `name` in a registry (this one or the PyTorch twin's); lists the choices."""
  if name not in registry:
    raise ValueError(f'Unknown model {name!r}; choose one of {", ".join(registry)}.')
  return registry[name]


def create_model(name: str, **kwargs) -> SEResNet:
  """Builds a model by name (as written in configs)."""
  return lookup(MODELS, name)(**kwargs)


# The model spec: how a config names a network. Every module that builds, fingerprints or asks
# "does it have SE?" goes through these, so the answers cannot drift apart.


def has_se(name: str) -> bool:
  """Whether the registered model `name` has SE blocks (the ResNet* baselines fix r=None)."""
  return 'se_reduction' not in MODELS[name].keywords


def model_se_reduction(config: ml_collections.ConfigDict) -> Reduction:
  """The model's SE setting: per-stage ratios when given, else the global one (None: no SE)."""
  if not has_se(config.model.name):
    return None
  if config.model.se_reductions:
    return [r or None for r in config.model.se_reductions]
  return config.model.se_reduction or None


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """bf16 with `half_precision` (parameters and optimizer state stay fp32), else fp32."""
  return jnp.bfloat16 if config.half_precision else jnp.float32


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> SEResNet:
  """The network `config.model` describes; SEResNet's own checks refuse impossible SE widths."""
  kwargs = dict(num_classes=num_classes, num_filters=config.model.num_filters,
                dropout_rate=config.model.dropout_rate,
                relu_before_se=config.model.relu_before_se, dtype=compute_dtype(config),
                kernel_init=config.model.kernel_init,
                zero_init_residual=config.model.zero_init_residual)
  if has_se(config.model.name):
    kwargs['se_reduction'] = model_se_reduction(config)
  return create_model(config.model.name, **kwargs)


def architecture(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """What a checkpoint's weights depend on; a resume or an evaluation refuses a mismatch.

  `relu_before_se` changes the function, not the weights' shapes, so only the fingerprint tells
  the two apart. It is recorded only when on: checkpoints written before the option existed hold
  no such key, and they were made without the ReLU. `kernel_init` and `zero_init_residual` are
  not recorded: they decide the first weights only, not the function of a checkpoint's weights
  (the run's config.json and report keep them).
  """
  se = model_se_reduction(config)
  fingerprint = dict(name=config.model.name, num_filters=config.model.num_filters,
                     se_reduction=list(se) if isinstance(se, list) else se,
                     num_classes=num_classes)
  if config.model.relu_before_se:
    fingerprint['relu_before_se'] = True
  return fingerprint
