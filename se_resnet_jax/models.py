"""Squeeze-and-Excitation ResNets for 32x32 images (CIFAR), as Flax linen modules.

Squeeze, Excitation and SEBlock are separate modules so they can be reused in other networks. The
residual units take `conv` and `norm` constructors, as in Flax's ImageNet example, so the network
decides dtype, BatchNorm momentum and train/eval mode in one place.
"""

from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

ModuleDef = Any
Reduction = Optional[Union[int, Sequence[Optional[int]]]]


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

  @nn.compact
  def __call__(self, z):
    dense = partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype)
    z = nn.relu(dense(se_hidden_width(self.channels, self.reduction), name='reduce')(z))
    return nn.sigmoid(dense(self.channels, name='expand')(z))


class SEBlock(nn.Module):
  """Recalibrates channels: x * Excitation(Squeeze(x))[:, None, None, :]."""
  reduction: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    gates = Excitation(x.shape[-1], self.reduction, dtype=self.dtype)(Squeeze()(x))
    return x * gates[:, None, None, :].astype(x.dtype)


class ResidualBlock(nn.Module):
  """Basic unit (3x3, 3x3) with SE on the residual branch before the addition."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1
  se_reduction: Optional[int] = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), (self.strides,) * 2)(x)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.filters, (3, 3))(y))
    if self.se_reduction:
      y = SEBlock(self.se_reduction, dtype=self.dtype)(y)
    if x.shape != y.shape:
      x = self.conv(self.filters, (1, 1), (self.strides,) * 2, name='conv_proj')(x)
      x = self.norm(name='norm_proj')(x)
    return self.act(x + y)


class BottleneckBlock(nn.Module):
  """Bottleneck unit (1x1, 3x3, 1x1 x4) with SE on the residual branch before the addition."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1
  se_reduction: Optional[int] = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), (self.strides,) * 2)(y)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.filters * 4, (1, 1))(y))
    if self.se_reduction:
      y = SEBlock(self.se_reduction, dtype=self.dtype)(y)
    if x.shape != y.shape:
      x = self.conv(self.filters * 4, (1, 1), (self.strides,) * 2, name='conv_proj')(x)
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
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv

  def __post_init__(self):
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {self.dropout_rate}.')
    if self.num_classes < 1 or self.num_filters < 1:
      raise ValueError('num_classes and num_filters must be positive, got '
                       f'{self.num_classes} and {self.num_filters}.')
    expansion = 4 if self.block_cls is BottleneckBlock else 1
    for i, r in enumerate(stage_reductions(self.se_reduction, len(self.stage_sizes))):
      if r is not None:
        se_hidden_width(self.num_filters * 2**i * expansion, r)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype)
    x = self.act(norm(name='bn_init')(conv(self.num_filters, (3, 3), name='conv_init')(x)))
    reductions = stage_reductions(self.se_reduction, len(self.stage_sizes))
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.num_filters * 2**i, conv=conv, norm=norm, act=self.act,
                           strides=strides, se_reduction=reductions[i], dtype=self.dtype)(x)
    x = Squeeze()(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
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

MODELS = {name: globals()[name] for name in (
    'SEResNet18', 'SEResNet34', 'SEResNet50', 'SEResNet101', 'SEResNet152',
    'ResNet18', 'ResNet34', 'ResNet50', 'ResNet101', 'ResNet152')}


def create_model(name: str, **kwargs) -> SEResNet:
  """Builds a model by name (as written in configs); unknown names list the choices."""
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; choose one of {", ".join(MODELS)}.')
  return MODELS[name](**kwargs)


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
                dropout_rate=config.model.dropout_rate, dtype=compute_dtype(config))
  if has_se(config.model.name):
    kwargs['se_reduction'] = model_se_reduction(config)
  return create_model(config.model.name, **kwargs)


def architecture(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """What a checkpoint's weights depend on; a resume refuses a mismatch."""
  se = model_se_reduction(config)
  return dict(name=config.model.name, num_filters=config.model.num_filters,
              se_reduction=list(se) if isinstance(se, list) else se, num_classes=num_classes)
