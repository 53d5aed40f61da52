"""The library's training step is PyTorch's training step (issue 11).

From identical weights (random, BatchNorm statistics and scales randomised), batch and labels, with
augmentation and dropout off, three steps of the training loop's own compiled step
(`steps.make_train_step`) on the product recipe (configs/cifar10.py: Nesterov SGD with momentum
0.9, weight decay 5e-4 on kernels only, label smoothing 0.1, linear warm-up of the learning rate)
against the same three steps written the usual
PyTorch way: `torch.optim.SGD` with a decay and a no-decay parameter group, the learning rate set
from the same schedule before each step, `CrossEntropyLoss(label_smoothing=0.1)`, the PyTorch twin
(`se_resnet_jax.torch_models`) in train mode.

PyTorch's BatchNorm updates its running variance with the unbiased batch variance (x n/(n-1), n the
values per channel), Flax's with the biased one. The test undoes that factor exactly from PyTorch's
own numbers (each step's update of the running variance times (n-1)/n) rather than widening the
tolerance: at the last stage of a batch of 8, n = 8*4*4 = 128 and the factor alone is 0.8%.

Tolerance: fp32 throughout; the two sides compute convolutions and their gradients with different
algorithms (XLA:CPU vs oneDNN) and sum in different orders, so they agree to rounding, not bit for
bit. Measured max abs differences after the three steps: parameters 1.2e-7, BatchNorm statistics
4.8e-7, momentum buffers 6.4e-7 (buffers up to 0.66); without the n/(n-1) correction the running
variances differ by 2.3e-3. The test allows 1e-5 + 1e-5 * |value| (values are at most ~2): over ten
times the rounding seen, and far below what a real discrepancy does (the variance factor above;
on the weights, which the steps change by up to 0.06, PyTorch without the Nesterov term differs by
1.2e-2, with unsmoothed labels by 7.8e-3, without weight decay by 1.6e-4).

The same three steps with `weight_decay_mask='all'` and `ema_decay` (issue 22) against the usual
PyTorch spelling of each: `torch.optim.SGD(model.parameters(), weight_decay=...)`, and an EMA of
the whole `state_dict` (parameters and BatchNorm buffers) as timm's ModelEmaV2 keeps it. The
running variances' average gets the same n/(n-1) correction, carried through the average (it is
linear). Measured max abs differences: parameters 1.2e-7, statistics 3.6e-7, momentum 5.7e-7, EMA
of the parameters 2.4e-7 and of the statistics 3.6e-7; against PyTorch decaying kernels only, the
parameters differ by 1.8e-4 and the momentum by 2.0e-3. The initialisers cannot agree bit for bit
across frameworks; the last test compares the distributions they draw from.
"""

import copy
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import CONFIGS_DIR, load_config_file, random_variables, randomise_batch_stats
from flax import traverse_util

from se_resnet_jax import augment, convert, steps, torch_models
from se_resnet_jax.config import build_model
from se_resnet_jax.models import ResidualBlock, SEResNet

torch.set_num_threads(2)
BATCH, STEPS, STEPS_PER_EPOCH = 8, 3, 4  # warm-up over one epoch: lr 0, 0.025, 0.05
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ATOL, RTOL = 1e-5, 1e-5


def product_config(**changes):
  config = load_config_file(os.path.join(CONFIGS_DIR, 'cifar10.py'))
  config.model.num_filters = 8
  config.model.se_reduction = 4
  config.model.dropout_rate = 0.0
  config.augment.enabled = False
  config.batch_size = BATCH
  assert (config.momentum, config.nesterov, config.weight_decay, config.label_smoothing) == (
      0.9, True, 5e-4, 0.1) and config.warmup_epochs == 1.0
  config.update(changes)
  return config


def run_library(config, model, variables, images, labels):
  """STEPS steps of the loop's compiled step; the batch is the whole (one-shard) training set."""
  tx = steps.create_optimizer(config, steps.create_learning_rate_schedule(config, STEPS_PER_EPOCH))
  state = steps.TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                                  batch_stats=variables['batch_stats'],
                                  ema_params=steps.ema_variables(config, variables))
  step = steps.make_train_step(config, 1, BATCH)  # one batch per "epoch": the same one
  mean_std = steps.normalization(MEAN, STD)
  metrics = steps.Metrics.empty()
  perm = jnp.arange(BATCH)[None]
  for _ in range(STEPS):
    state, metrics = step(state, metrics, images[None], labels[None], perm, jax.random.key(1),
                          mean_std)
  return state


def run_torch(config, model, variables, images, labels):
  """The same steps in PyTorch; returns the model, the momentum buffers and the running variances
  with PyTorch's n/(n-1) taken out, and with `ema_decay` the EMA's state_dict (its running
  variances corrected alike)."""
  net = torch_models.create_model(config.model.name, num_classes=10,
                                  num_filters=config.model.num_filters,
                                  se_reduction=config.model.se_reduction, dropout_rate=0.0)
  net.load_state_dict(convert.flax_to_torch(variables, model))
  net.train()
  if config.weight_decay_mask == 'all':
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
  else:
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{'params': decay, 'weight_decay': config.weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}],
                                lr=0.0, momentum=config.momentum, nesterov=config.nesterov)
  ema = copy.deepcopy(net) if config.ema_decay else None
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
  schedule = steps.create_learning_rate_schedule(config, STEPS_PER_EPOCH)
  x = np.asarray(augment.preprocess_for_eval(images, MEAN, STD))  # = train's with augment off
  x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(np.asarray(labels)).long()

  bns = {name: m for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
  per_channel = {}  # values per channel each BatchNorm normalises over: N*H*W
  for name, bn in bns.items():
    bn.register_forward_hook(functools.partial(
        lambda name, module, inputs, output: per_channel.__setitem__(
            name, inputs[0].numel() // inputs[0].shape[1]), name))
  biased_var = {name: bn.running_var.clone() for name, bn in bns.items()}
  ema_var_excess = {name: torch.zeros_like(v) for name, v in biased_var.items()}
  for t in range(STEPS):
    for group in optimizer.param_groups:
      group['lr'] = float(schedule(t))
    before = {name: bn.running_var.clone() for name, bn in bns.items()}
    optimizer.zero_grad()
    loss_fn(net(x), y).backward()
    optimizer.step()
    for name, bn in bns.items():  # running_var += m * (n/(n-1) * s - running_var), m = 0.1
      n, m = per_channel[name], bn.momentum
      update = (bn.running_var - (1 - m) * before[name]) * (n - 1) / n
      biased_var[name] = (1 - m) * biased_var[name] + update
    if ema is not None:
      d = config.ema_decay
      with torch.no_grad():
        for e, v in zip(ema.state_dict().values(), net.state_dict().values()):
          if e.is_floating_point():
            e.copy_(d * e + (1 - d) * v)
      for name, bn in bns.items():
        ema_var_excess[name] = d * ema_var_excess[name] + (1 - d) * (
            bn.running_var - biased_var[name])
  buffers = {name: optimizer.state[p]['momentum_buffer'] for name, p in net.named_parameters()}
  ema_state = None
  if ema is not None:
    ema_state = ema.state_dict()
    for name in bns:
      ema_state[f'{name}.running_var'] = ema_state[f'{name}.running_var'] - ema_var_excess[name]
  return net, buffers, biased_var, ema_state


@pytest.mark.parametrize('changes', [{}, dict(weight_decay_mask='all', ema_decay=0.5)],
                         ids=['kernels', 'decay_all_and_ema'])
def test_three_training_steps_match_pytorch(changes):
  config = product_config(**changes)
  model = build_model(config, 10)
  rs = np.random.RandomState(4)
  images = rs.randint(0, 256, (BATCH, 32, 32, 3)).astype(np.uint8)
  variables = jax.device_get(  # host copies: the library's step donates its device buffers
      randomise_batch_stats(random_variables(model, images[:1], train=False, seed=3), 3))
  labels = rs.randint(0, 10, BATCH).astype(np.int32)
  state = run_library(config, model, variables, images, labels)
  net, buffers, biased_var, ema_state = run_torch(config, model, variables, images, labels)

  torch_state = net.state_dict()
  for name, var in biased_var.items():
    torch_state[f'{name}.running_var'] = var
  torch_variables, _ = convert.torch_to_flax(torch_state, model)
  momentum_state = dict(torch_state, **buffers)  # buffers in the parameters' places
  torch_momentum = convert.torch_to_flax(momentum_state, model)[0]['params']
  flax_momentum = optax.tree_utils.tree_get(state.opt_state, 'trace')

  compared = [('params', state.params, torch_variables['params']),
              ('batch_stats', state.batch_stats, torch_variables['batch_stats']),
              ('momentum', flax_momentum, torch_momentum)]
  if config.ema_decay:
    torch_ema, _ = convert.torch_to_flax(ema_state, model)
    assert set(state.ema_params) == {'params', 'batch_stats'}
    compared += [('ema params', state.ema_params['params'], torch_ema['params']),
                 ('ema batch_stats', state.ema_params['batch_stats'], torch_ema['batch_stats'])]
  for what, ours, theirs in compared:
    ours, theirs = traverse_util.flatten_dict(ours), traverse_util.flatten_dict(theirs)
    assert ours.keys() == theirs.keys()
    for key in ours:
      np.testing.assert_allclose(np.asarray(ours[key]), np.asarray(theirs[key]), atol=ATOL,
                                 rtol=RTOL, err_msg=f'{what} {"/".join(key)}')
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(variables['params'])))
  assert moved > 1e-3, 'the steps barely changed the weights: the comparison would prove nothing'
  assert int(state.step) == STEPS


# Theoretical standard deviations of a 3x3 convolution's weights, 128 -> 128 channels, and of a
# dense layer's with 128 inputs under PyTorch's default (U(+-1/sqrt(fan_in)): std 1/sqrt(3 fan_in)).
CONV_FAN = 9 * 128
CONV_STD = {'lecun_normal': CONV_FAN ** -0.5, 'he_normal_fan_out': (2 / CONV_FAN) ** 0.5,
            'torch_default': (3 * CONV_FAN) ** -0.5}
DENSE_FAN = 128


@pytest.mark.parametrize('kernel_init, zero_init_residual',
                         [('he_normal_fan_out', True), ('torch_default', False)])
def test_kernel_inits_draw_the_same_distribution_in_both_frameworks(kernel_init,
                                                                    zero_init_residual):
  """Weights of the last 3x3 convolution (147k values) and of the first SE layer of the last stage
  (4k values): the theoretical std within 3% and 6%; biases within their PyTorch bound."""
  kwargs = dict(num_filters=16, se_reduction=4, kernel_init=kernel_init,
                zero_init_residual=zero_init_residual)
  model = SEResNet(stage_sizes=[1, 1, 1, 1], block_cls=ResidualBlock, **kwargs)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))
  variables = init.lower(jax.random.key(0)).compile(  # as steps.init_program on CPU
      compiler_options={'xla_backend_optimization_level': 0})(jax.random.key(0))
  flat = traverse_util.flatten_dict(jax.device_get(variables['params']), sep='/')
  torch.manual_seed(0)
  net = torch_models.SEResNet((1, 1, 1, 1), False, **kwargs)
  torch_flat = {k: v.detach().numpy() for k, v in net.state_dict().items()}

  conv = {'jax': flat['ResidualBlock_3/Conv_1/kernel'],
          'torch': torch_flat['layer4.0.conv2.weight']}
  assert conv['jax'].shape == (3, 3, 128, 128) and conv['torch'].shape == (128, 128, 3, 3)
  se = {'jax': flat['ResidualBlock_3/SEBlock_0/Excitation_0/reduce/kernel'],
        'torch': torch_flat['layer4.0.se.reduce.weight']}
  assert se['jax'].shape == (128, 32) and se['torch'].shape == (32, 128)
  bias = {'jax': flat['ResidualBlock_3/SEBlock_0/Excitation_0/reduce/bias'],
          'torch': torch_flat['layer4.0.se.reduce.bias']}
  residual_scale = {'jax': flat['ResidualBlock_3/BatchNorm_1/scale'],
                    'torch': torch_flat['layer4.0.bn2.weight']}
  for side in ('jax', 'torch'):
    np.testing.assert_allclose(conv[side].std(), CONV_STD[kernel_init], rtol=0.03, err_msg=side)
    assert abs(conv[side].mean()) < 0.05 * CONV_STD[kernel_init], side
    # Dense layers keep PyTorch's default under both names (torchvision leaves Linear alone).
    np.testing.assert_allclose(se[side].std(), (3 * DENSE_FAN) ** -0.5, rtol=0.06, err_msg=side)
    assert np.abs(se[side]).max() <= DENSE_FAN ** -0.5 + 1e-7, side
    assert 0 < np.abs(bias[side]).max() <= DENSE_FAN ** -0.5 + 1e-7, side
    np.testing.assert_array_equal(residual_scale[side], float(not zero_init_residual))
