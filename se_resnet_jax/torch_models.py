"""The library's ten networks as PyTorch modules: the same function as `se_resnet_jax.models`.

Layer for layer the twin of the Flax models: 3x3 stride-1 stem, no max-pool, basic (3x3, 3x3) or
bottleneck (1x1, 3x3 with the stride, 1x1 x4) units, SE (biased Linear layers, C -> C/r -> C) on
the residual branch after its last BatchNorm (after a ReLU with `relu_before_se`) and before the
addition, 1x1 conv + BN projections where a unit changes shape, global average pool, dropout,
Linear. Convolutions pad k//2 per side, BatchNorm has momentum 0.1 and eps 1e-5 (Flax's 0.9), and
the last BatchNorm scale of each residual branch starts at zero as in the Flax models
(`zero_init_residual=False`: at one). Conv and Linear weights start as `kernel_init` says, with the
names and distributions of `se_resnet_jax.models.KERNEL_INITS`; the default here is PyTorch's own
('torch_default'). Inputs are NCHW.

Parameter names follow the common CIFAR layout (kuangliu/pytorch-cifar): `conv1`, `bn1`,
`layer{1-4}.{unit}.conv{k}` / `bn{k}` / `shortcut.{0,1}` / `se.reduce` / `se.expand`, `linear`;
`se_resnet_jax.convert` maps them to the Flax names. PyTorch is an optional extra
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
  """Re-draws every Conv2d and Linear weight (and bias) of `model` as `kernel_init` names.

  'lecun_normal' (Flax's default): truncated to two standard deviations, variance 1/fan_in,
  biases zero. 'he_normal_fan_out' (torchvision's ResNet): convolutions
  kaiming_normal_(mode='fan_out', nonlinearity='relu'); Linear layers keep PyTorch's default, as
  torchvision leaves them. 'torch_default': PyTorch's default, U(+-1/sqrt(fan_in)) for weights and
  biases. BatchNorm layers are left alone.
  """
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

  def __init__(self, channels: int, reduction: int):
    super().__init__()
    hidden = se_hidden_width(channels, reduction)
    self.reduce = nn.Linear(channels, hidden)
    self.expand = nn.Linear(hidden, channels)

  def forward(self, x):
    gates = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3))))))
    return x * gates[:, :, None, None]


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
  """1x1 conv + BN on the shortcut where the unit changes shape; an empty Sequential elsewhere."""
  if stride == 1 and in_planes == out_planes:
    return nn.Sequential()
  return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                       batch_norm(out_planes))


class BasicBlock(nn.Module):
  """3x3 conv-BN-ReLU, 3x3 conv-BN, [ReLU], SE, plus the (projected) shortcut, ReLU."""
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int, se_reduction: Optional[int],
               relu_before_se: bool = False, zero_init_residual: bool = True):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = batch_norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = batch_norm(planes, zero_scale=zero_init_residual)
    self.relu_before_se = relu_before_se
    self.se = SEBlock(planes, se_reduction) if se_reduction else None
    self.shortcut = projection(in_planes, planes, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.relu_before_se:
      y = F.relu(y)
    if self.se is not None:
      y = self.se(y)
    return F.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
  """1x1-BN-ReLU, 3x3 (stride)-BN-ReLU, 1x1 (x4)-BN, [ReLU], SE, plus the shortcut, ReLU."""
  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int, se_reduction: Optional[int],
               relu_before_se: bool = False, zero_init_residual: bool = True):
    super().__init__()
    out_planes = planes * self.expansion
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = batch_norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = batch_norm(planes)
    self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
    self.bn3 = batch_norm(out_planes, zero_scale=zero_init_residual)
    self.relu_before_se = relu_before_se
    self.se = SEBlock(out_planes, se_reduction) if se_reduction else None
    self.shortcut = projection(in_planes, out_planes, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.relu_before_se:
      y = F.relu(y)
    if self.se is not None:
      y = self.se(y)
    return F.relu(y + self.shortcut(x))


class SEResNet(nn.Module):
  """ResNet for 32x32 inputs (3x3 stride-1 stem, no max-pool) with SE in every residual unit.

  The options mean what they mean in `se_resnet_jax.models.SEResNet`, and are checked the same way.
  """

  def __init__(self, stage_sizes: Sequence[int], bottleneck: bool, num_classes: int = 10,
               num_filters: int = 64, se_reduction: Reduction = 16, dropout_rate: float = 0.0,
               relu_before_se: bool = False, kernel_init: str = 'torch_default',
               zero_init_residual: bool = True):
    super().__init__()
    if kernel_init not in KERNEL_INITS:
      raise ValueError(f'Unknown kernel_init {kernel_init!r}; choose one of '
                       f'{", ".join(KERNEL_INITS)}.')
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}.')
    if num_classes < 1 or num_filters < 1:
      raise ValueError('num_classes and num_filters must be positive, got '
                       f'{num_classes} and {num_filters}.')
    block = Bottleneck if bottleneck else BasicBlock
    reductions = stage_reductions(se_reduction, len(stage_sizes))
    self.conv1 = nn.Conv2d(3, num_filters, 3, 1, 1, bias=False)
    self.bn1 = batch_norm(num_filters)
    in_planes = num_filters
    for i, units in enumerate(stage_sizes):
      planes = num_filters * 2**i
      blocks = []
      for j in range(units):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(block(in_planes, planes, stride, reductions[i], relu_before_se,
                            zero_init_residual))
        in_planes = planes * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.dropout = nn.Dropout(dropout_rate)
    self.linear = nn.Linear(in_planes, num_classes)
    if kernel_init != 'torch_default':  # the layers were just made with PyTorch's default
      initialise(self, kernel_init)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    for i in range(self.num_stages):
      x = getattr(self, f'layer{i + 1}')(x)
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

MODELS = {name: globals()[name] for name in MODEL_NAMES}


def create_model(name: str, **kwargs) -> SEResNet:
  """Builds a model by name, with the options of `se_resnet_jax.create_model`."""
  return lookup(MODELS, name)(**kwargs)


def count_parameters(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())
