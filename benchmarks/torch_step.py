"""How the benchmark trains the PyTorch twin (`se_resnet_jax.torch_models`): the tuning a careful
PyTorch user would apply. Fused SGD on CUDA (multi-tensor on CPU), `set_to_none` gradients,
channels-last, `torch.compile`, bf16 autocast, one intra-op thread per core. The network itself is
the library's own PyTorch definition, the same function as the Flax model (tests/test_convert.py);
this file only holds the training-step plumbing.
"""

import os

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn


def set_threads() -> int:
  """One intra-op thread per core this process may use (PyTorch's default can oversubscribe)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  torch.set_num_threads(cores)
  return cores


def make_optimizer(config: ml_collections.ConfigDict, model: nn.Module) -> torch.optim.SGD:
  """SGD as the library's optax chain: L2 on kernels (ndim > 1) only, or on every parameter
  with `weight_decay_mask='all'`, then (Nesterov) momentum, at `config.learning_rate`.

  Call it once the model is on its device: the fused (single-kernel) update needs CUDA parameters;
  on a CPU the multi-tensor `foreach` update is PyTorch's fastest.
  """
  params = list(model.parameters())
  decayed = lambda p: config.weight_decay_mask == 'all' or p.ndim > 1
  groups = [{'params': [p for p in params if decayed(p)], 'weight_decay': config.weight_decay},
            {'params': [p for p in params if not decayed(p)], 'weight_decay': 0.0}]
  groups = [g for g in groups if g['params']]
  fast = {'fused': True} if params[0].is_cuda else {'foreach': True}
  return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum,
                         nesterov=config.nesterov and config.momentum > 0, **fast)


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
