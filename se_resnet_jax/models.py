"""Squeeze-and-Excitation ResNets for 32x32 images (CIFAR), as Flax linen modules.

Every convolution pads like PyTorch's `padding=k//2`: Flax's 'SAME' pads a stride-2 3x3 by (0, 1)
on an even input, which would shift every output pixel against the PyTorch twin of the same weights.
"""

from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

ModuleDef = Any
Reduction = Optional[Union[int, Sequence[Optional[int]]]]

IMAGE_SHAPE = (32, 32, 3)  # CIFAR's: what these networks are built for
PAD_3X3 = ((1, 1), (1, 1))  # PyTorch's padding=1
PAD_1X1 = ((0, 0), (0, 0))

# How conv and dense weights start (the PyTorch twin draws alike): Flax's default; torchvision's
# ResNet (convolutions N(0, 2/fan_out), dense layers at PyTorch's default); PyTorch's Conv2d/Linear
# default, weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_TORCH_DEFAULT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
_CONV_INITS = {'lecun_normal': nn.initializers.lecun_normal(),
               'he_normal_fan_out': nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
               'torch_default': _TORCH_DEFAULT}
KERNEL_INITS = tuple(_CONV_INITS)


def _check_kernel_init(name: str) -> None:
  if name not in KERNEL_INITS:
    raise ValueError(f'kernel_init {name!r} is unknown; choose one of {", ".join(KERNEL_INITS)}.')


def dense_inits(name: str, fan_in: int) -> dict:
  """kernel_init and bias_init of a dense layer with `fan_in` inputs."""
  _check_kernel_init(name)
  if name == 'lecun_normal':
    return dict(kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros)
  bound = fan_in ** -0.5
  return dict(kernel_init=_TORCH_DEFAULT,
              bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                  key, shape, dtype, -bound, bound))


def se_hidden_width(channels: int, reduction: int) -> int:
  """Width C/r of the excitation bottleneck; refuses ratios that would silently round."""
  if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
    raise ValueError(f'se_reduction: the ratio must be a positive integer, got {reduction!r}.')
  if reduction > channels:
    raise ValueError(
        f'se_reduction: SE reduction ratio r={reduction} exceeds the {channels} channels it '
        f'squeezes (hidden width would be 0). Use r <= {channels}, a larger model.num_filters, '
        'or per-stage ratios.')
  if channels % reduction:
    raise ValueError(
        f'se_reduction: SE reduction ratio r={reduction} does not divide the {channels} channels. '
        f'Use a divisor of {channels} (e.g. 8, 16 or 32 for the standard widths).')
  return channels // reduction


class Squeeze(nn.Module):
  """Global average pooling: (N, H, W, C) -> (N, C)."""

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
  """x * Excitation(Squeeze(x)). The gates are sown into the 'se_gates' collection, so
  `apply(..., mutable=['se_gates'])` returns them without their being parameters."""
  reduction: int = 16
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: str = 'lecun_normal'  # of the excitation's dense layers

  @nn.compact
  def __call__(self, x):
    gates = Excitation(x.shape[-1], self.reduction, use_bias=self.use_bias, dtype=self.dtype,
                       kernel_init=self.kernel_init)(Squeeze()(x))
    if not self.is_initializing():  # init returns only params and batch statistics
      self.sow('se_gates', 'gates', gates)
    return x * gates[:, None, None, :].astype(x.dtype)


def gates_by_block(se_gates: Mapping) -> dict:
  """{'ResidualBlock_3': gates (N, C), ...} from the 'se_gates' collection an apply returned,
  keyed by the path of the unit holding the SE block, in the order the network runs them."""
  flat = traverse_util.flatten_dict(dict(se_gates))
  return {'/'.join(path[:-2]): values[-1] for path, values in flat.items()}


class _Unit(nn.Module):
  """`conv` and `norm` constructors, as in Flax's ImageNet example, and the SE block's options."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1
  se_reduction: Optional[int] = 16
  se_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: str = 'lecun_normal'  # of the SE block's dense layers (`conv` brings its own)
  expansion = 1  # output channels per `filters`

  @nn.nowrap
  def se(self, y: jax.Array) -> jax.Array:
    """SE on the residual branch, before the addition (the SENet paper's standard placement)."""
    if not self.se_reduction:
      return y
    return SEBlock(self.se_reduction, self.se_bias, dtype=self.dtype,
                   kernel_init=self.kernel_init)(y)


class ResidualBlock(_Unit):
  """Basic unit (3x3, 3x3). `relu_before_se` (a ReLU before SE) is the layout of public PyTorch
  CIFAR SE-ResNets, so their weights convert. Where the shape changes, `shortcut='B'` projects
  (1x1 conv + BN) and `'A'` subsamples and zero-pads."""
  relu_before_se: bool = False
  shortcut: str = 'B'
  zero_init_residual: bool = True  # the branch's last BatchNorm scale starts at 0 (else 1)

  @nn.nowrap
  def branch(self, x):
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), (self.strides,) * 2,
                                       padding=PAD_3X3)(x)))
    return self.conv(self.filters, (3, 3), padding=PAD_3X3)(y)

  @nn.compact
  def __call__(self, x):
    channels = self.filters * self.expansion
    y = self.branch(x)  # before the last norm is built, which takes the next BatchNorm name
    y = self.norm(scale_init=nn.initializers.zeros if self.zero_init_residual
                  else nn.initializers.ones)(y)
    y = self.se(self.act(y) if self.relu_before_se else y)
    if x.shape != y.shape and self.shortcut == 'A':
      # He et al.'s option A: zero channels after the input's, as in fb.resnet.torch.
      x = x[:, ::self.strides, ::self.strides, :]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, channels - x.shape[-1])))
    elif x.shape != y.shape:
      x = self.conv(channels, (1, 1), (self.strides,) * 2, padding=PAD_1X1, name='conv_proj')(x)
      x = self.norm(name='norm_proj')(x)
    return self.act(x + y)


class BottleneckBlock(ResidualBlock):
  """Bottleneck unit (1x1, 3x3, 1x1 x4), the stride on the 3x3 as in the PyTorch CIFAR ResNets."""
  expansion = 4

  @nn.nowrap
  def branch(self, x):
    y = self.act(self.norm()(self.conv(self.filters, (1, 1), padding=PAD_1X1)(x)))
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), (self.strides,) * 2,
                                       padding=PAD_3X3)(y)))
    return self.conv(self.filters * 4, (1, 1), padding=PAD_1X1)(y)


class PreActBlock(_Unit):
  """Pre-activation basic unit (He et al. 2016; Zagoruyko & Komodakis). Where the shape changes,
  the shortcut is a 1x1 conv (no BN) of the pre-activated input, as in both papers' code."""

  @nn.nowrap
  def branch(self, out):
    y = self.conv(self.filters, (3, 3), (self.strides,) * 2, padding=PAD_3X3)(out)
    return self.conv(self.filters, (3, 3), padding=PAD_3X3)(self.act(self.norm()(y)))

  @nn.compact
  def __call__(self, x):
    out = self.act(self.norm()(x))
    channels = self.filters * self.expansion
    shortcut = x
    if self.strides != 1 or x.shape[-1] != channels:
      shortcut = self.conv(channels, (1, 1), (self.strides,) * 2, padding=PAD_1X1,
                           name='conv_proj')(out)
    return shortcut + self.se(self.branch(out))


class PreActBottleneck(PreActBlock):
  """Pre-activation bottleneck unit (ResNet-164), the stride on the 3x3 as in the PyTorch ports."""
  expansion = 4

  @nn.nowrap
  def branch(self, out):
    y = self.conv(self.filters, (1, 1), padding=PAD_1X1)(out)
    y = self.conv(self.filters, (3, 3), (self.strides,) * 2,
                  padding=PAD_3X3)(self.act(self.norm()(y)))
    return self.conv(self.filters * 4, (1, 1), padding=PAD_1X1)(self.act(self.norm()(y)))


def stage_reductions(se_reduction: Reduction, num_stages: int) -> list:
  """One reduction ratio (or None: no SE) per stage from a global or per-stage setting."""
  if not isinstance(se_reduction, (list, tuple)):  # one ratio; se_hidden_width refuses bad ones
    return [se_reduction] * num_stages
  ratios = list(se_reduction)
  if len(ratios) != num_stages:
    raise ValueError(f'se_reduction: {len(ratios)} entries but the network has {num_stages} '
                     'stages; give one ratio (or None) per stage, or a single int.')
  return ratios


class SEResNet(nn.Module):
  """ResNet for 32x32 inputs (3x3 stride-1 stem, no max-pool) with SE in every residual unit;
  stage i has `num_filters * 2**i` filters (times the expansion). Every network is a backbone:
  `features`, `num_classes=0`, the 'se_gates' collection and `replace_head`."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int = 10  # 0: no head, the output is the pre-logit vector
  num_filters: int = 64
  se_reduction: Reduction = 16
  dropout_rate: float = 0.0
  relu_before_se: bool = False  # see ResidualBlock; for weights of that PyTorch layout
  shortcut: str = 'B'  # where a unit changes shape: 'B' 1x1 conv + BN, 'A' zero-padded identity
  se_bias: bool = True  # biases in the SE Dense layers (senet.pytorch has none)
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv
  kernel_init: str = 'lecun_normal'  # how conv and dense weights start: one of KERNEL_INITS
  zero_init_residual: bool = True  # each residual branch's last BatchNorm scale starts at 0
  pre_activation = False  # PreActResNet: no BN after the stem, a BN-ReLU before pooling

  def __post_init__(self):
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {self.dropout_rate}.')
    if self.num_classes < 0 or self.num_filters < 1:
      raise ValueError('num_filters must be positive and num_classes >= 0 (0: no head), got '
                       f'{self.num_filters} and {self.num_classes}.')
    if self.shortcut not in ('A', 'B'):
      raise ValueError(f"shortcut must be 'A' (zero-padded identity) or 'B' (projection), got "
                       f'{self.shortcut!r}.')
    _check_kernel_init(self.kernel_init)
    for width, r in zip(self.stage_widths(),
                        stage_reductions(self.se_reduction, len(self.stage_sizes))):
      if r is not None:
        se_hidden_width(width, r)
    super().__post_init__()

  @nn.nowrap
  def stage_widths(self) -> list:
    """Output channels of each stage (what its SE blocks squeeze)."""
    return [self.num_filters * 2**i * self.block_cls.expansion
            for i in range(len(self.stage_sizes))]

  def __call__(self, x, train: bool = True):
    """Logits (N, num_classes) in float32; with num_classes=0 the pre-logit vector (N, C)."""
    return self.forward(x, train)[0]

  def features(self, x, train: bool = True, stages: bool = False):
    """The pre-logit vector (N, C) in float32; with `stages=True`, also each stage's output map
    ({'stem': ..., 'stage1': ...}). `model.apply(variables, x, train=False, method='features')`."""
    pooled, maps = self.forward(x, train, head=False)
    return (pooled, maps) if stages else pooled

  @nn.compact
  def forward(self, x, train: bool = True, head: bool = True) -> tuple:
    """(logits, or the pre-logit vector without a head; {name: stage output map})."""
    conv = partial(self.conv, use_bias=False, dtype=self.dtype,
                   kernel_init=_CONV_INITS[self.kernel_init])
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype)
    x = conv(self.num_filters, (3, 3), padding=PAD_3X3, name='conv_init')(x)
    if not self.pre_activation:
      x = self.act(norm(name='bn_init')(x))
    maps = {'stem': x}
    options = {} if self.pre_activation else dict(
        relu_before_se=self.relu_before_se, shortcut=self.shortcut,
        zero_init_residual=self.zero_init_residual)
    reductions = stage_reductions(self.se_reduction, len(self.stage_sizes))
    for i, (block_size, width) in enumerate(zip(self.stage_sizes, self.stage_widths())):
      for j in range(block_size):
        x = self.block_cls(width // self.block_cls.expansion, conv=conv, norm=norm, act=self.act,
                           strides=2 if i > 0 and j == 0 else 1, se_reduction=reductions[i],
                           se_bias=self.se_bias, dtype=self.dtype, kernel_init=self.kernel_init,
                           **options)(x)
      maps[f'stage{i + 1}'] = x
    if self.pre_activation:
      x = self.act(norm(name='bn_final')(x))
    pooled = Squeeze()(x)
    if not head or not self.num_classes:
      return pooled.astype(jnp.float32), maps
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    return nn.Dense(self.num_classes, dtype=self.dtype,
                    **dense_inits(self.kernel_init, x.shape[-1]))(x).astype(jnp.float32), maps


class PreActResNet(SEResNet):
  """Pre-activation ResNet: no BN after the stem, a final BN-ReLU; stage i has `num_filters *
  widen_factor * 2**i` filters. WRN's dropout between a unit's convolutions is not built."""
  widen_factor: int = 1
  pre_activation = True

  def __post_init__(self):
    if self.relu_before_se or self.shortcut != 'B':
      raise ValueError('relu_before_se and shortcut apply to post-activation units only; '
                       f'{type(self).__name__} has pre-activation units.')
    if self.widen_factor < 1:
      raise ValueError(f'widen_factor must be positive, got {self.widen_factor}.')
    super().__post_init__()

  @nn.nowrap
  def stage_widths(self) -> list:
    return [w * self.widen_factor for w in super().stage_widths()]


def replace_head(model: SEResNet, variables: Mapping, num_classes: int,
                 rng: jax.Array) -> tuple:
  """(model for `num_classes`, its variables): the backbone's weights and statistics kept, the
  head new (the network's own initialiser, from `rng`), or none for 0. For fine-tuning."""
  new = model.clone(num_classes=num_classes)
  params = {k: v for k, v in variables['params'].items() if k != 'Dense_0'}
  if num_classes:
    sample = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
    # Only the head's initial values are kept: jit lets XLA drop the rest of the network's init.
    params['Dense_0'] = jax.jit(
        lambda key: new.init(key, sample, train=False)['params']['Dense_0'])(rng)
  return new, {**variables, 'params': params}


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

# He et al. 2015 (Sec. 4.2), the SENet paper's CIFAR table: 6n+2 layers at 16-32-64 filters, option
# A shortcuts. senet.pytorch and pytorchcv project instead: shortcut='B' (and se_bias=False for
# senet.pytorch) computes their function.
_CIFAR = partial(SEResNet, block_cls=ResidualBlock, num_filters=16, shortcut='A')
SEResNet20 = partial(_CIFAR, stage_sizes=[3, 3, 3])
SEResNet32 = partial(_CIFAR, stage_sizes=[5, 5, 5])
SEResNet44 = partial(_CIFAR, stage_sizes=[7, 7, 7])
SEResNet56 = partial(_CIFAR, stage_sizes=[9, 9, 9])
SEResNet110 = partial(_CIFAR, stage_sizes=[18, 18, 18])
# He et al. 2016 (Identity Mappings): 9n+2 layers of pre-activation bottleneck units, 1.7M.
SEResNet164 = partial(PreActResNet, stage_sizes=[18, 18, 18], block_cls=PreActBottleneck,
                      num_filters=16)
# Zagoruyko & Komodakis 2016: WRN-d-k, (d-4)/6 pre-activation basic units per stage, widen k.
SEWRN16_8 = partial(PreActResNet, stage_sizes=[2, 2, 2], block_cls=PreActBlock, num_filters=16,
                    widen_factor=8)
SEWRN28_10 = partial(PreActResNet, stage_sizes=[4, 4, 4], block_cls=PreActBlock, num_filters=16,
                     widen_factor=10)

ResNet20 = partial(SEResNet20, se_reduction=None)
ResNet32 = partial(SEResNet32, se_reduction=None)
ResNet44 = partial(SEResNet44, se_reduction=None)
ResNet56 = partial(SEResNet56, se_reduction=None)
ResNet110 = partial(SEResNet110, se_reduction=None)
ResNet164 = partial(SEResNet164, se_reduction=None)
WRN16_8 = partial(SEWRN16_8, se_reduction=None)
WRN28_10 = partial(SEWRN28_10, se_reduction=None)

# Every public network constructor above, in the order defined.
MODELS = {name: value for name, value in globals().items()
          if isinstance(value, partial) and not name.startswith('_')}
MODEL_NAMES = tuple(MODELS)


def lookup(registry: dict, name: str) -> Any:
  """The constructor of `name` in a registry (this one or the PyTorch twin's); lists the choices."""
  if name not in registry:
    raise ValueError(f'Unknown model {name!r}; choose one of {", ".join(registry)}.')
  return registry[name]


def create_model(name: str, **kwargs) -> SEResNet:
  """Builds a model by name (as written in configs)."""
  return lookup(MODELS, name)(**kwargs)


def has_se(name: str) -> bool:
  """Whether the registered model `name` has SE blocks (the plain baselines fix r=None)."""
  return 'se_reduction' not in lookup(MODELS, name).keywords
