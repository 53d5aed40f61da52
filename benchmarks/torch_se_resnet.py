"""SE-ResNet18 for CIFAR in PyTorch: the reference the JAX step is benchmarked against.

It mirrors `se_resnet_jax.models.SEResNet18` layer for layer (3x3 stride-1 stem, no max-pool, basic
blocks, SE with biased Linear layers at r=16 on the residual branch after its second BN and before
the addition, 1x1 conv + BN projection shortcuts, dropout before the classifier), so a speed ratio
compares implementations of one network, not two networks. The parameter count is checked against
the Flax model's 11,263,042. The train step is tuned the way a careful PyTorch user would tune it:
fused SGD on CUDA (multi-tensor on CPU), `set_to_none` gradients, channels-last, `torch.compile`,
bf16 autocast, one intra-op thread per core.
PyTorch is a benchmark-only extra; the library never imports this file.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

SE_RESNET18_PARAMS = 11_263_042


class SEBlock(nn.Module):
  """Squeeze (global average pool), excitation (Linear-ReLU-Linear-sigmoid), scale."""

  def __init__(self, channels: int, reduction: int = 16):
    super().__init__()
    self.reduce = nn.Linear(channels, channels // reduction)
    self.expand = nn.Linear(channels // reduction, channels)

  def forward(self, x):
    gates = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3))))))
    return x * gates[:, :, None, None]


class BasicBlock(nn.Module):
  """3x3 conv-BN-ReLU, 3x3 conv-BN, SE, plus the (projected) shortcut, ReLU."""

  def __init__(self, in_planes: int, planes: int, stride: int, reduction: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    nn.init.zeros_(self.bn2.weight)  # as the Flax model: each residual branch starts at zero
    self.se = SEBlock(planes, reduction)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                    nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.se(self.bn2(self.conv2(y)))
    return F.relu(y + self.shortcut(x))


class SEResNet18(nn.Module):
  """SE-ResNet18 for 32x32 inputs: stages 64-128-256-512, two basic blocks each."""

  def __init__(self, num_classes: int = 10, reduction: int = 16, dropout_rate: float = 0.5):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    blocks, in_planes = [], 64
    for i, planes in enumerate((64, 128, 256, 512)):
      for j in range(2):
        blocks.append(BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1, reduction))
        in_planes = planes
    self.blocks = nn.Sequential(*blocks)
    self.dropout = nn.Dropout(dropout_rate)
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.blocks(F.relu(self.bn1(self.conv1(x))))
    return self.fc(self.dropout(x.mean((2, 3))))


def count_parameters(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def set_threads() -> int:
  """One intra-op thread per core this process may use (PyTorch's default can oversubscribe)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  torch.set_num_threads(cores)
  return cores


def make_optimizer(model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 5e-4) -> torch.optim.Optimizer:
  """Nesterov SGD with weight decay on conv/linear weights only, as the JAX optimizer.

  Call it once the model is on its device: the fused (single-kernel) update needs CUDA parameters;
  on a CPU the multi-tensor `foreach` update is PyTorch's fastest.
  """
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  groups = [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]
  fused = {'fused': True} if decay[0].is_cuda else {'foreach': True}
  return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, **fused)


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, channels_last: bool,
                    compile_model: bool, bf16: bool, device: torch.device,
                    label_smoothing: float = 0.0):
  """A closure doing forward, backward and the SGD update on one (already placed) batch.

  `torch.compile` wraps the forward+loss; the optimizer step stays eager (foreach/fused kernels),
  the usual setup. The returned step takes NCHW float images and int64 labels.
  """
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model.to(device=device, memory_format=memory_format).train()

  def forward_loss(x, y):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)

  loss_fn = torch.compile(forward_loss) if compile_model else forward_loss

  def step(x, y):
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(x.contiguous(memory_format=memory_format), y)
    loss.backward()
    optimizer.step()
    return loss

  return step
