"""The library's networks as PyTorch modules: the same function as `se_resnet_jax.models`.

Layer for layer the twin of the Flax models, for converting weights (`se_resnet_jax.convert`) and
for comparing with PyTorch training. Inputs are NCHW; convolutions pad k//2 per side; BatchNorm
has momentum 0.1 and eps 1e-5 (Flax's 0.9). Weights start as `kernel_init` names
(`se_resnet_jax.models.KERNEL_INITS`), by default PyTorch's own ('torch_default').

Parameter names follow the common CIFAR layout (kuangliu/pytorch-cifar): `conv1`, `bn1`,
`layer{1-4}.{unit}.conv{k}` / `bn{k}` / `shortcut.{0,1}` / `se.reduce` / `se.expand`, `bn_final`,
`linear` (in pre-activation units `bn{k}` comes before `conv{k}`). PyTorch is an optional extra
(`pip install se_resnet_jax[torch]`): `import se_resnet_jax` never imports this module.
"""

from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from se_resnet_jax.models import (
    KERNEL_INITS,
    MODEL_NAMES,
    lookup,
    se_hidden_width,
    stage_reductions,
)

Reduction = Optional[Union[int, Sequence[Optional[int]]]]
TRUNCATED_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


@torch.no_grad()
def initialise(model: nn.Module, kernel_init: str) -> None:
  """Re-draws every Conv2d and Linear weight (and bias) of `model` from the distributions
  `models.KERNEL_INITS` describes for `kernel_init`; BatchNorm layers are left alone."""
  if kernel_init not in KERNEL_INITS:
    raise ValueError(f'Unknown kernel_init {kernel_init!r}; choose one of '
                     f'{", ".join(KERNEL_INITS)}.')
  for module in model.modules():
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
      continue
    if kernel_init == 'lecun_normal':
      std = (1.0 / module.weight[0].numel()) ** 0.5 / TRUNCATED_STD
      nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std)
      if module.bias is not None:
        nn.init.zeros_(module.bias)
    elif kernel_init == 'he_normal_fan_out' and isinstance(module, nn.Conv2d):
      nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
    else:
      module.reset_parameters()


def batch_norm(channels: int, zero_scale: bool = False) -> nn.BatchNorm2d:
  bn = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
  if zero_scale:  # each residual branch starts as the identity, as the Flax models
    nn.init.zeros_(bn.weight)
  return bn


class SEBlock(nn.Module):
  """Squeeze (global average pool), excitation (Linear-ReLU-Linear-sigmoid), scale."""

  def __init__(self, channels: int, reduction: int, bias: bool = True):
    super().__init__()
    hidden = se_hidden_width(channels, reduction)
    self.reduce = nn.Linear(channels, hidden, bias=bias)
    self.expand = nn.Linear(hidden, channels, bias=bias)

  def forward(self, x):
    gates = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3))))))
    return x * gates[:, :, None, None]


class ZeroPadShortcut(nn.Module):
  """Option A: subsample by the stride, append zero channels (no parameters)."""

  def __init__(self, out_planes: int, stride: int):
    super().__init__()
    self.out_planes, self.stride = out_planes, stride

  def forward(self, x):
    x = x[:, :, ::self.stride, ::self.stride]
    return F.pad(x, (0, 0, 0, 0, 0, self.out_planes - x.shape[1]))


class Unit(nn.Module):
  """A residual unit, basic (3x3, 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4), with SE
  on the branch before the addition.

  Post-activation (`models.ResidualBlock`, `BottleneckBlock`): conv-BN-ReLU per layer, the last
  without ReLU (with one under `relu_before_se`), SE, plus the shortcut, ReLU. Pre-activation
  (`models.PreActBlock`, `PreActBottleneck`): BN-ReLU-conv per layer, SE, plus the shortcut, which
  is a 1x1 conv of the pre-activated input (no BN) where the shape changes.
  """

  def __init__(self, in_planes: int, planes: int, stride: int, bottleneck: bool,
               se_reduction: Optional[int], pre_activation: bool = False,
               relu_before_se: bool = False, shortcut: str = 'B', se_bias: bool = True,
               zero_init_residual: bool = True):
    super().__init__()
    convs = ([(in_planes, planes, 1, 1), (planes, planes, 3, stride), (planes, 4 * planes, 1, 1)]
             if bottleneck else [(in_planes, planes, 3, stride), (planes, planes, 3, 1)])
    for k, (cin, cout, size, conv_stride) in enumerate(convs, 1):
      if pre_activation:
        setattr(self, f'bn{k}', batch_norm(cin))
      setattr(self, f'conv{k}', nn.Conv2d(cin, cout, size, conv_stride, size // 2, bias=False))
      if not pre_activation:
        setattr(self, f'bn{k}', batch_norm(cout, zero_init_residual and k == len(convs)))
    self.out_planes = out_planes = convs[-1][1]
    self.depth = len(convs)
    self.pre_activation, self.relu_before_se = pre_activation, relu_before_se
    self.se = SEBlock(out_planes, se_reduction, se_bias) if se_reduction else None
    if stride == 1 and in_planes == out_planes:
      self.shortcut = nn.Sequential()
    elif shortcut == 'A':
      self.shortcut = ZeroPadShortcut(out_planes, stride)
    else:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                    *([] if pre_activation else [batch_norm(out_planes)]))

  def forward(self, x):
    y = out = F.relu(self.bn1(x)) if self.pre_activation else x
    for k in range(1, self.depth + 1):
      conv, bn = getattr(self, f'conv{k}'), getattr(self, f'bn{k}')
      if self.pre_activation:
        y = conv(y if k == 1 else F.relu(bn(y)))
      else:
        y = bn(conv(y))
        if k < self.depth or self.relu_before_se:
          y = F.relu(y)
    if self.se is not None:
      y = self.se(y)
    if self.pre_activation:
      return y + (self.shortcut(out) if len(self.shortcut) else x)
    return F.relu(y + self.shortcut(x))


class SEResNet(nn.Module):
  """ResNet for 32x32 inputs (3x3 stride-1 stem, no max-pool) with SE in every residual unit.

  The options mean what they mean in `se_resnet_jax.models.SEResNet`, and are checked the same way.
  `pre_activation` builds `models.PreActResNet`'s network (PreActResNet below): a stem conv without
  BN, pre-activation units and a final BN-ReLU (`bn_final`) before pooling.
  """

  def __init__(self, stage_sizes: Sequence[int], bottleneck: bool, num_classes: int = 10,
               num_filters: int = 64, se_reduction: Reduction = 16, dropout_rate: float = 0.0,
               relu_before_se: bool = False, shortcut: str = 'B', se_bias: bool = True,
               kernel_init: str = 'torch_default', zero_init_residual: bool = True,
               widen_factor: int = 1, pre_activation: bool = False):
    super().__init__()
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}.')
    if num_classes < 1 or num_filters < 1 or widen_factor < 1:
      raise ValueError('num_classes, num_filters and widen_factor must be positive, got '
                       f'{num_classes}, {num_filters} and {widen_factor}.')
    if pre_activation and (relu_before_se or shortcut != 'B'):
      raise ValueError('relu_before_se and shortcut apply to post-activation units only.')
    reductions = stage_reductions(se_reduction, len(stage_sizes))
    self.pre_activation, self.num_stages = pre_activation, len(stage_sizes)
    self.conv1 = nn.Conv2d(3, num_filters, 3, 1, 1, bias=False)
    if not pre_activation:
      self.bn1 = batch_norm(num_filters)
    in_planes = num_filters
    for i, units in enumerate(stage_sizes):
      blocks = []
      for j in range(units):
        blocks.append(Unit(in_planes, num_filters * widen_factor * 2**i,
                           2 if i > 0 and j == 0 else 1, bottleneck, reductions[i],
                           pre_activation, relu_before_se, shortcut, se_bias, zero_init_residual))
        in_planes = blocks[-1].out_planes
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    if pre_activation:
      self.bn_final = batch_norm(in_planes)
    self.dropout = nn.Dropout(dropout_rate)
    self.linear = nn.Linear(in_planes, num_classes)
    if kernel_init != 'torch_default':  # the layers were just drawn with PyTorch's default
      initialise(self, kernel_init)

  def forward(self, x):
    x = self.conv1(x) if self.pre_activation else F.relu(self.bn1(self.conv1(x)))
    for i in range(self.num_stages):
      x = getattr(self, f'layer{i + 1}')(x)
    if self.pre_activation:
      x = F.relu(self.bn_final(x))
    return self.linear(self.dropout(x.mean((2, 3))))


SEResNet18 = partial(SEResNet, (2, 2, 2, 2), False)
SEResNet34 = partial(SEResNet, (3, 4, 6, 3), False)
SEResNet50 = partial(SEResNet, (3, 4, 6, 3), True)
SEResNet101 = partial(SEResNet, (3, 4, 23, 3), True)
SEResNet152 = partial(SEResNet, (3, 8, 36, 3), True)

ResNet18 = partial(SEResNet18, se_reduction=None)
ResNet34 = partial(SEResNet34, se_reduction=None)
ResNet50 = partial(SEResNet50, se_reduction=None)
ResNet101 = partial(SEResNet101, se_reduction=None)
ResNet152 = partial(SEResNet152, se_reduction=None)

_CIFAR = partial(SEResNet, bottleneck=False, num_filters=16, shortcut='A')  # He et al. 2015
SEResNet20 = partial(_CIFAR, (3, 3, 3))
SEResNet32 = partial(_CIFAR, (5, 5, 5))
SEResNet44 = partial(_CIFAR, (7, 7, 7))
SEResNet56 = partial(_CIFAR, (9, 9, 9))
SEResNet110 = partial(_CIFAR, (18, 18, 18))
PreActResNet = partial(SEResNet, pre_activation=True, num_filters=16)
SEResNet164 = partial(PreActResNet, (18, 18, 18), True)
SEWRN16_8 = partial(PreActResNet, (2, 2, 2), False, widen_factor=8)
SEWRN28_10 = partial(PreActResNet, (4, 4, 4), False, widen_factor=10)

ResNet20 = partial(SEResNet20, se_reduction=None)
ResNet32 = partial(SEResNet32, se_reduction=None)
ResNet44 = partial(SEResNet44, se_reduction=None)
ResNet56 = partial(SEResNet56, se_reduction=None)
ResNet110 = partial(SEResNet110, se_reduction=None)
ResNet164 = partial(SEResNet164, se_reduction=None)
WRN16_8 = partial(SEWRN16_8, se_reduction=None)
WRN28_10 = partial(SEWRN28_10, se_reduction=None)

MODELS = {name: globals()[name] for name in MODEL_NAMES}


def create_model(name: str, **kwargs) -> SEResNet:
  """Builds a model by name, with the options of `se_resnet_jax.create_model`."""
  return lookup(MODELS, name)(**kwargs)


def count_parameters(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())
