"""The library's networks as PyTorch modules: the same function as `se_resnet_jax.models`.

Layer for layer the twin of the Flax models: 3x3 stride-1 stem, no max-pool, basic (3x3, 3x3) or
bottleneck (1x1, 3x3 with the stride, 1x1 x4) units, SE (biased Linear layers, C -> C/r -> C) on
the residual branch after its last BatchNorm (after a ReLU with `relu_before_se`) and before the
addition, 1x1 conv + BN projections where a unit changes shape, global average pool, dropout,
Linear. Convolutions pad k//2 per side, BatchNorm has momentum 0.1 and eps 1e-5 (Flax's 0.9), and
the last BatchNorm scale of each residual branch starts at zero as in the Flax models
(`zero_init_residual=False`: at one). Conv and Linear weights start as `kernel_init` says, with the
names and distributions of `se_resnet_jax.models.KERNEL_INITS`; the default here is PyTorch's own
('torch_default'). Inputs are NCHW.

He et al.'s CIFAR ResNets (ResNet20...110) are the same network with three stages at 16-32-64 and,
with `shortcut='A'`, zero-padded identity shortcuts (no parameters). The pre-activation networks
(ResNet164, WRN16_8, WRN28_10 and their SE versions) have units BN-ReLU-conv (the shortcut a 1x1
conv of the pre-activated input where the shape changes, without BN), a stem conv without BN and a
final BN-ReLU (`bn_final`) before pooling.

Parameter names follow the common CIFAR layout (kuangliu/pytorch-cifar): `conv1`, `bn1`,
`layer{1-4}.{unit}.conv{k}` / `bn{k}` / `shortcut.{0,1}` / `se.reduce` / `se.expand`, `linear`
(in pre-activation units `bn{k}` comes before `conv{k}`, as in kuangliu's PreActBlock);
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


def projection(in_planes: int, out_planes: int, stride: int, shortcut: str = 'B') -> nn.Module:
  """1x1 conv + BN (option B) or zero padding (option A) on the shortcut where the unit changes
  shape; an empty Sequential elsewhere."""
  if stride == 1 and in_planes == out_planes:
    return nn.Sequential()
  if shortcut == 'A':
    return ZeroPadShortcut(out_planes, stride)
  return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                       batch_norm(out_planes))


class BasicBlock(nn.Module):
  """3x3 conv-BN-ReLU, 3x3 conv-BN, [ReLU], SE, plus the (projected) shortcut, ReLU."""
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int, se_reduction: Optional[int],
               relu_before_se: bool = False, shortcut: str = 'B', se_bias: bool = True,
               zero_init_residual: bool = True):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = batch_norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = batch_norm(planes, zero_scale=zero_init_residual)
    self.relu_before_se = relu_before_se
    self.se = SEBlock(planes, se_reduction, se_bias) if se_reduction else None
    self.shortcut = projection(in_planes, planes, stride, shortcut)

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
               relu_before_se: bool = False, shortcut: str = 'B', se_bias: bool = True,
               zero_init_residual: bool = True):
    super().__init__()
    out_planes = planes * self.expansion
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = batch_norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = batch_norm(planes)
    self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
    self.bn3 = batch_norm(out_planes, zero_scale=zero_init_residual)
    self.relu_before_se = relu_before_se
    self.se = SEBlock(out_planes, se_reduction, se_bias) if se_reduction else None
    self.shortcut = projection(in_planes, out_planes, stride, shortcut)

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
               relu_before_se: bool = False, shortcut: str = 'B', se_bias: bool = True,
               kernel_init: str = 'torch_default', zero_init_residual: bool = True):
    super().__init__()
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
        blocks.append(block(in_planes, planes, stride, reductions[i], relu_before_se, shortcut,
                            se_bias, zero_init_residual))
        in_planes = planes * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.add_head(in_planes, num_classes, dropout_rate, kernel_init)

  def add_head(self, in_planes: int, num_classes: int, dropout_rate: float,
               kernel_init: str) -> None:
    """Dropout and Linear after pooling; then every weight drawn as `kernel_init` says (the
    layers were just made with PyTorch's default, so 'torch_default' leaves them)."""
    self.dropout = nn.Dropout(dropout_rate)
    self.linear = nn.Linear(in_planes, num_classes)
    if kernel_init != 'torch_default':
      initialise(self, kernel_init)

  def stem(self, x):
    return F.relu(self.bn1(self.conv1(x)))

  def forward(self, x):
    x = self.stem(x)
    for i in range(self.num_stages):
      x = getattr(self, f'layer{i + 1}')(x)
    return self.linear(self.dropout(self.finish(x).mean((2, 3))))

  def finish(self, x):
    return x


class PreActBlock(nn.Module):
  """BN-ReLU, 3x3 (stride), BN-ReLU, 3x3, SE, plus the shortcut (1x1 conv of the pre-activated
  input where the shape changes, else the input)."""
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int, se_reduction: Optional[int],
               se_bias: bool = True):
    super().__init__()
    self.bn1 = batch_norm(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = batch_norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.se = SEBlock(planes, se_reduction, se_bias) if se_reduction else None
    self.shortcut = preact_projection(in_planes, planes, stride)

  def branch(self, out):
    return self.conv2(F.relu(self.bn2(self.conv1(out))))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    y = self.branch(out)
    if self.se is not None:
      y = self.se(y)
    return y + (self.shortcut(out) if self.shortcut is not None else x)


class PreActBottleneck(PreActBlock):
  """BN-ReLU, 1x1, BN-ReLU, 3x3 (stride), BN-ReLU, 1x1 (x4), SE, plus the shortcut."""
  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int, se_reduction: Optional[int],
               se_bias: bool = True):
    nn.Module.__init__(self)
    out_planes = planes * self.expansion
    self.bn1 = batch_norm(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn2 = batch_norm(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn3 = batch_norm(planes)
    self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
    self.se = SEBlock(out_planes, se_reduction, se_bias) if se_reduction else None
    self.shortcut = preact_projection(in_planes, out_planes, stride)

  def branch(self, out):
    y = self.conv2(F.relu(self.bn2(self.conv1(out))))
    return self.conv3(F.relu(self.bn3(y)))


def preact_projection(in_planes: int, out_planes: int, stride: int) -> Optional[nn.Sequential]:
  if stride == 1 and in_planes == out_planes:
    return None
  return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False))


class PreActResNet(SEResNet):
  """Pre-activation ResNet (`se_resnet_jax.models.PreActResNet`): stem conv without BN,
  pre-activation units, final BN-ReLU (`bn_final`), pooling, dropout, Linear."""

  def __init__(self, stage_sizes: Sequence[int], bottleneck: bool, num_classes: int = 10,
               num_filters: int = 16, se_reduction: Reduction = 16, dropout_rate: float = 0.0,
               widen_factor: int = 1, se_bias: bool = True, kernel_init: str = 'torch_default',
               zero_init_residual: bool = True):
    """`zero_init_residual` is accepted for a uniform signature; pre-activation branches end in
    a convolution, so there is no last BatchNorm scale for it to set."""
    nn.Module.__init__(self)
    del zero_init_residual
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}.')
    if num_classes < 1 or num_filters < 1 or widen_factor < 1:
      raise ValueError('num_classes, num_filters and widen_factor must be positive, got '
                       f'{num_classes}, {num_filters} and {widen_factor}.')
    block = PreActBottleneck if bottleneck else PreActBlock
    reductions = stage_reductions(se_reduction, len(stage_sizes))
    self.conv1 = nn.Conv2d(3, num_filters, 3, 1, 1, bias=False)
    in_planes = num_filters
    for i, units in enumerate(stage_sizes):
      planes = num_filters * widen_factor * 2**i
      blocks = []
      for j in range(units):
        blocks.append(block(in_planes, planes, 2 if i > 0 and j == 0 else 1, reductions[i],
                            se_bias))
        in_planes = planes * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.bn_final = batch_norm(in_planes)
    self.add_head(in_planes, num_classes, dropout_rate, kernel_init)

  def stem(self, x):
    return self.conv1(x)

  def finish(self, x):
    return F.relu(self.bn_final(x))


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
