"""Behaviour of the SE modules and the SE-ResNet family (issue 2).

Full-size networks are only traced (`jax.eval_shape`), never run: their parameter counts are checked
exactly against a hand count. Behaviour is checked on networks a few channels wide.
"""

import subprocess
import sys
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables
from flax import traverse_util

import se_resnet_jax
from se_resnet_jax import (
    BottleneckBlock,
    Excitation,
    ResidualBlock,
    ResNet18,
    ResNet34,
    ResNet50,
    SEBlock,
    SEResNet,
    SEResNet18,
    SEResNet34,
    SEResNet50,
    SEResNet101,
    Squeeze,
    create_model,
)

# ---------------------------------------------------------------------------------------------
# Parameter counts, by hand.


def conv_params(c_in, c_out, k):
  """A k x k convolution without bias (every conv in the network is followed by BatchNorm)."""
  return k * k * c_in * c_out


def bn_params(c):
  """BatchNorm scale and bias (the running mean/var are batch_stats, not params)."""
  return 2 * c


def se_params(c, r):
  """Excitation with biases: Dense(C -> C/r) and Dense(C/r -> C)."""
  h = c // r
  return (c * h + h) + (h * c + c)


def hand_count(stage_sizes, bottleneck, num_classes, se_reduction=16, width=64):
  """Parameters of a CIFAR SE-ResNet counted layer by layer, independently of flax.

  stem 3x3 conv + BN; per unit: basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 x4) convs each with
  BN, SE on the unit's output channels, and a 1x1 conv + BN projection wherever the unit changes
  the shape (first unit of a stage: stride 2 or a new width); then Dense(num_classes) with bias.
  `se_reduction` is one ratio, None (no SE), or one entry per stage.
  """
  ratios = (list(se_reduction) if isinstance(se_reduction, (list, tuple))
            else [se_reduction] * len(stage_sizes))
  total = conv_params(3, width, 3) + bn_params(width)
  c_in = width
  for i, units in enumerate(stage_sizes):
    f = width * 2**i
    c_out = 4 * f if bottleneck else f
    for j in range(units):
      if bottleneck:
        total += (conv_params(c_in, f, 1) + bn_params(f) + conv_params(f, f, 3) + bn_params(f)
                  + conv_params(f, c_out, 1) + bn_params(c_out))
      else:
        total += conv_params(c_in, f, 3) + bn_params(f) + conv_params(f, f, 3) + bn_params(f)
      if ratios[i]:
        total += se_params(c_out, ratios[i])
      if c_in != c_out or (i > 0 and j == 0):
        total += conv_params(c_in, c_out, 1) + bn_params(c_out)
      c_in = c_out
  return total + c_in * num_classes + num_classes


def flax_count(model):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes['params']))


def test_reference_parameter_counts():
  """The figures the spec and README quote, exactly."""
  se18, plain18 = flax_count(SEResNet18(num_classes=10)), flax_count(ResNet18(num_classes=10))
  assert se18 == 11_263_042
  assert plain18 == 11_173_962
  # SE at r=16 costs +0.80% parameters on ResNet18 (not the study's "about 5%").
  assert (se18 - plain18) / plain18 == pytest.approx(0.00797, abs=5e-5)


def test_seresnet50_cifar100_count_written_out():
  """SEResNet50 (r=16) for 100 classes, every term spelled out so a reader can re-add it.

  Stage i has width f = 64 * 2**i and outputs 4f; its first unit takes the previous stage's
  channels (64 for stage 0) and has the projection. unit = 1x1 + BN, 3x3 + BN, 1x1 (x4) + BN;
  SE(C) = C*C/16 + C/16 + C/16*C + C.
  """
  stem = 3 * 3 * 3 * 64 + 2 * 64  # 1,856
  # stage 0, f=64, 3 units: first unit 58,112; later units 70,400; SE(256) 8,464; proj 16,896
  stage0 = 58_112 + 2 * 70_400 + 3 * 8_464 + (64 * 256 + 2 * 256)
  # stage 1, f=128, 4 units: first 247,296; later 280,064; SE(512) 33,312; proj 132,096
  stage1 = 247_296 + 3 * 280_064 + 4 * 33_312 + (256 * 512 + 2 * 512)
  # stage 2, f=256, 6 units: first 986,112; later 1,117,184; SE(1024) 132,160; proj 526,336
  stage2 = 986_112 + 5 * 1_117_184 + 6 * 132_160 + (512 * 1024 + 2 * 1024)
  # stage 3, f=512, 3 units: first 3,938,304; later 4,462,592; SE(2048) 526,464; proj 2,101,248
  stage3 = 3_938_304 + 2 * 4_462_592 + 3 * 526_464 + (1024 * 2048 + 2 * 2048)
  head = 2048 * 100 + 100  # 204,900
  assert (stage0, stage1, stage2, stage3) == (241_200, 1_352_832, 7_891_328, 16_544_128)
  # the unit terms above, from the layer formula
  assert 64 * 64 + 128 + 9 * 64 * 64 + 128 + 64 * 256 + 512 == 58_112
  assert 256 * 64 + 128 + 9 * 64 * 64 + 128 + 64 * 256 + 512 == 70_400
  assert se_params(256, 16) == 8_464 and se_params(2048, 16) == 526_464
  written_out = stem + stage0 + stage1 + stage2 + stage3 + head
  assert written_out == 26_236_244
  assert hand_count([3, 4, 6, 3], True, 100) == written_out
  assert flax_count(SEResNet50(num_classes=100)) == written_out


@pytest.mark.parametrize('constructor, stages, bottleneck, kwargs', [
  (SEResNet18, [2, 2, 2, 2], False, dict(num_classes=100, se_reduction=8)),
  (SEResNet34, [3, 4, 6, 3], False, dict(num_classes=10, se_reduction=32)),
  (ResNet34, [3, 4, 6, 3], False, dict(num_classes=100)),
  (ResNet50, [3, 4, 6, 3], True, dict(num_classes=10)),
  (SEResNet101, [3, 4, 23, 3], True, dict(num_classes=10, se_reduction=16)),
  (SEResNet18, [2, 2, 2, 2], False, dict(num_classes=10, se_reduction=[None, 8, 16, 32])),
  (SEResNet50, [3, 4, 6, 3], True, dict(num_classes=10, num_filters=16, se_reduction=4)),
])
def test_hand_count_matches_flax(constructor, stages, bottleneck, kwargs):
  se = None if constructor in (ResNet34, ResNet50) else kwargs.get('se_reduction', 16)
  expected = hand_count(stages, bottleneck, kwargs['num_classes'], se,
                        kwargs.get('num_filters', 64))
  assert flax_count(constructor(**kwargs)) == expected


def test_per_stage_reduction_sets_each_stage_hidden_width():
  """se_reduction=[None, 8, 16, 32]: no SE in stage 0, then C/r hidden units per stage."""
  model = SEResNet18(se_reduction=[None, 8, 16, 32])
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))['params']
  hidden = {}
  for name, block in params.items():
    if name.startswith('ResidualBlock_'):
      se = block.get('SEBlock_0')
      hidden[int(name.split('_')[1])] = (None if se is None
                                         else se['Excitation_0']['reduce']['kernel'].shape)
  assert hidden == {0: None, 1: None, 2: (128, 16), 3: (128, 16), 4: (256, 16), 5: (256, 16),
                    6: (512, 16), 7: (512, 16)}


# ---------------------------------------------------------------------------------------------
# The SE modules.


def _random(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).normal(size=shape).astype(np.float32))


def _jit_apply(model):
  """One compiled program per call pattern: much cheaper on CPU than compiling op by op."""
  return jax.jit(model.apply, static_argnames=('train', 'mutable', 'capture_intermediates'))


def test_squeeze_is_global_average_pool():
  x = _random((2, 5, 3, 4))
  np.testing.assert_allclose(Squeeze().apply({}, x), np.asarray(x).mean(axis=(1, 2)), rtol=1e-6)


def _numpy_gates(params, z):
  """sigmoid(relu(z W1 + b1) W2 + b2), written independently of the module."""
  w1, b1 = np.asarray(params['reduce']['kernel']), np.asarray(params['reduce']['bias'])
  w2, b2 = np.asarray(params['expand']['kernel']), np.asarray(params['expand']['bias'])
  return 1 / (1 + np.exp(-(np.maximum(np.asarray(z) @ w1 + b1, 0) @ w2 + b2)))


def test_excitation_computes_dense_relu_dense_sigmoid():
  z = _random((3, 8))
  exc = Excitation(channels=8, reduction=4)
  params = random_variables(exc, z)['params']
  assert params['reduce']['kernel'].shape == (8, 2) and params['expand']['kernel'].shape == (2, 8)
  np.testing.assert_allclose(jax.jit(exc.apply)({'params': params}, z), _numpy_gates(params, z),
                             rtol=1e-5, atol=1e-6)


def test_se_gate_in_open_unit_interval_and_scales_channelwise():
  x = _random((4, 6, 6, 16)) * 3.0
  block = SEBlock(reduction=4)
  params = random_variables(block, x)['params']
  out = jax.jit(block.apply)({'params': params}, x)
  gates = _numpy_gates(params['Excitation_0'], np.asarray(x).mean(axis=(1, 2)))
  assert gates.shape == (4, 16)
  assert np.all((gates > 0) & (gates < 1))
  assert np.ptp(gates, axis=1).min() > 1e-3, 'gates should differ between channels'
  assert np.ptp(gates, axis=0).min() > 1e-4, 'and between examples'
  np.testing.assert_allclose(out, np.asarray(x) * gates[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_zero_excitation_gives_gate_exactly_half():
  x = _random((2, 4, 4, 8))
  block = SEBlock(reduction=2)
  params = jax.tree.map(jnp.zeros_like, random_variables(block, x)['params'])
  gates = jax.jit(Excitation(8, 2).apply)({'params': params['Excitation_0']},
                                          jnp.mean(x, axis=(1, 2)))
  np.testing.assert_array_equal(gates, np.full((2, 8), 0.5, np.float32))
  np.testing.assert_array_equal(jax.jit(block.apply)({'params': params}, x), np.asarray(x) * 0.5)


@pytest.mark.parametrize('block_cls, filters', [(ResidualBlock, 8), (BottleneckBlock, 2)])
def test_se_acts_on_residual_branch_before_addition(block_cls, filters):
  """With gates fixed at 0.5 and identity activations, out = x + 0.5 * branch (not 0.5 * sum)."""
  x = _random((2, 4, 4, 8))
  common = dict(filters=filters, conv=partial(nn.Conv, use_bias=False),
                norm=partial(nn.BatchNorm, use_running_average=True), act=lambda v: v)
  plain, with_se = block_cls(se_reduction=None, **common), block_cls(se_reduction=2, **common)
  variables = random_variables(with_se, x)
  params, stats = variables['params'], variables['batch_stats']
  params['SEBlock_0'] = jax.tree.map(jnp.zeros_like, params['SEBlock_0'])
  plain_params = {k: v for k, v in params.items() if k != 'SEBlock_0'}
  branch = jax.jit(plain.apply)({'params': plain_params, 'batch_stats': stats}, x) - x
  assert float(jnp.abs(branch).max()) > 0.1
  out = jax.jit(with_se.apply)({'params': params, 'batch_stats': stats}, x)
  np.testing.assert_allclose(out, x + 0.5 * branch, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The network's train/eval behaviour, on a two-unit network 4 channels wide.


def tiny_net(**kwargs):
  return SEResNet(**{**dict(stage_sizes=(1, 1), block_cls=ResidualBlock, num_classes=3,
                            num_filters=4, se_reduction=2), **kwargs})


def _init(model, x):
  return random_variables(model, x, train=False)


def test_batchnorm_statistics_update_only_in_train_mode():
  x = _random((6, 8, 8, 3)) + 1.0
  model = tiny_net()
  variables = _init(model, x)
  _, eval_updates = _jit_apply(model)(variables, x, train=False, mutable='batch_stats')
  jax.tree.map(np.testing.assert_array_equal, eval_updates['batch_stats'],
               variables['batch_stats'])

  _, train_updates = _jit_apply(model)(variables, x, train=True, mutable='batch_stats')
  new, old = train_updates['batch_stats'], variables['batch_stats']
  for path, value in traverse_util.flatten_dict(new).items():
    assert not np.allclose(value, traverse_util.flatten_dict(old)[path]), path
  # running mean = 0.9 * 0 + 0.1 * (mean of the stem conv's output over the batch and pixels)
  stem = jax.lax.conv_general_dilated(x, variables['params']['conv_init']['kernel'], (1, 1),
                                      'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(new['bn_init']['mean'], 0.1 * np.asarray(stem).mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)


def test_eval_mode_uses_running_statistics():
  """In eval an example's logits do not depend on the rest of the batch; in train they do."""
  x = _random((6, 8, 8, 3))
  model = tiny_net()
  variables = _init(model, x)
  np.testing.assert_allclose(_jit_apply(model)(variables, x, train=False)[:2],
                             _jit_apply(model)(variables, x[:2], train=False), rtol=1e-5, atol=1e-6)
  full, _ = _jit_apply(model)(variables, x, train=True, mutable='batch_stats')
  part, _ = _jit_apply(model)(variables, x[:2], train=True, mutable='batch_stats')
  assert not np.allclose(full[:2], part, atol=1e-4)


def test_dropout_only_in_train_mode_and_only_with_an_rng():
  x = _random((4, 8, 8, 3))
  model = tiny_net(dropout_rate=0.5)
  variables = _init(model, x)
  train = partial(_jit_apply(model), variables, x, train=True, mutable='batch_stats')
  with pytest.raises(Exception, match='dropout'):
    train()
  a, _ = train(rngs={'dropout': jax.random.key(1)})
  b, _ = train(rngs={'dropout': jax.random.key(2)})
  a_again, _ = train(rngs={'dropout': jax.random.key(1)})
  assert not np.allclose(a, b, atol=1e-6)
  np.testing.assert_array_equal(a, a_again)
  # the difference comes from dropout: without it, different rngs give the same output
  no_dropout = partial(_jit_apply(tiny_net(dropout_rate=0.0)), variables, x, train=True,
                       mutable='batch_stats')
  np.testing.assert_array_equal(no_dropout(rngs={'dropout': jax.random.key(1)})[0],
                                no_dropout(rngs={'dropout': jax.random.key(2)})[0])
  # eval: deterministic, needs no rng and ignores one
  e1 = _jit_apply(model)(variables, x, train=False)
  e2 = _jit_apply(model)(variables, x, train=False, rngs={'dropout': jax.random.key(3)})
  np.testing.assert_array_equal(e1, e2)


def test_per_stage_reduction_runs_with_se_only_where_asked():
  x = _random((2, 8, 8, 3))
  model = tiny_net(se_reduction=[None, 4])
  variables = _init(model, x)
  assert 'SEBlock_0' not in variables['params']['ResidualBlock_0']
  assert variables['params']['ResidualBlock_1']['SEBlock_0']['Excitation_0']['reduce'][
      'kernel'].shape == (8, 2)
  logits, _ = _jit_apply(model)(variables, x, train=True, mutable='batch_stats')
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))


def test_bf16_compute_keeps_fp32_parameters():
  x = _random((2, 8, 8, 3))
  model = tiny_net(dtype=jnp.bfloat16)
  # the real initialiser (traced only) makes fp32 parameters and statistics for a bf16 model
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x.astype(jnp.bfloat16),
                                             train=False))
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  variables = _init(model, x.astype(jnp.bfloat16))
  logits, state = _jit_apply(model)(variables, x.astype(jnp.bfloat16), train=False,
                              capture_intermediates=True, mutable='intermediates')
  assert logits.dtype == jnp.float32  # the loss is computed in fp32
  acts = traverse_util.flatten_dict(state['intermediates'])
  inner = {'/'.join(k): v[0].dtype for k, v in acts.items() if k != ('__call__',)}
  assert len(inner) > 20
  assert set(inner.values()) == {jnp.dtype(jnp.bfloat16)}, inner
  assert inner['ResidualBlock_1/SEBlock_0/Excitation_0/__call__'] == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# Impossible settings fail at construction, with a message saying what to change.


@pytest.mark.parametrize('kwargs, message', [
  (dict(num_filters=8, se_reduction=16), r'r=16 exceeds the 8 channels'),
  (dict(num_filters=64, se_reduction=24), r'r=24 does not divide the 64 channels'),
  (dict(se_reduction=0.5), r'positive integer'),
  (dict(se_reduction=-4), r'positive integer'),
  (dict(se_reduction=[16, 16]), r'one ratio \(or None\) per stage'),
  (dict(num_filters=16, se_reduction=[None, None, None, 1024]), r'r=1024 exceeds the 128'),
  (dict(dropout_rate=1.0), r'dropout_rate must be in \[0, 1\)'),
  (dict(dropout_rate=1.5), r'dropout_rate must be in \[0, 1\)'),
  (dict(dropout_rate=-0.1), r'dropout_rate must be in \[0, 1\)'),
])
def test_impossible_settings_raise_value_error(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SEResNet18(**kwargs)


def test_excitation_refuses_ratio_larger_than_channels():
  with pytest.raises(ValueError, match='exceeds the 8 channels'):
    Excitation(channels=8, reduction=16).init(jax.random.key(0), jnp.zeros((1, 8)))


def test_create_model_by_name():
  assert isinstance(create_model('SEResNet18', num_filters=8, se_reduction=4), SEResNet)
  with pytest.raises(ValueError, match='Unknown model .*SEResNet18'):
    create_model('SEResNet19')


def test_package_exports_every_constructor():
  for depth in (18, 34, 50, 101, 152):
    assert callable(getattr(se_resnet_jax, f'SEResNet{depth}'))
    assert callable(getattr(se_resnet_jax, f'ResNet{depth}'))


def test_import_is_light():
  """Importing the models must not pull in TensorFlow, tfds, matplotlib or PyTorch (seconds, and
  GBs); PyTorch comes only with `se_resnet_jax.torch_models` or a conversion."""
  code = ('import sys, se_resnet_jax; '
          'print(sorted(m for m in ("tensorflow", "tensorflow_datasets", "matplotlib", "torch") '
          'if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]', out.stdout + out.stderr
