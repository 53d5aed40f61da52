"""Every network as a backbone, and the CIFAR networks of the SENet paper's table (issue 23).

Full-size networks are only traced (`jax.eval_shape`); behaviour is checked a few channels wide
with numpy-drawn weights (no compiled initialiser).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables
from flax import traverse_util

from se_resnet_jax import models

X = jnp.asarray(np.random.RandomState(0).normal(size=(2, 32, 32, 3)), jnp.float32)
TINY = {  # one network per family: post-activation basic (option A), ImageNet-style, pre-activation
    'SEResNet20': dict(num_filters=4, se_reduction=2),
    'SEResNet18': dict(num_filters=4, se_reduction=2),
    'SEResNet164': dict(num_filters=2, se_reduction=4, stage_sizes=[2, 2, 2]),  # 3 x 18 units
    'SEWRN16_8': dict(num_filters=2, se_reduction=4),
}


def count(model) -> int:
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name, paper, decimals', [
    ('ResNet20', 0.27, 2), ('ResNet32', 0.46, 2), ('ResNet44', 0.66, 2), ('ResNet56', 0.85, 2),
    ('ResNet110', 1.7, 1), ('ResNet164', 1.7, 1), ('WRN16_8', 11.0, 1), ('WRN28_10', 36.5, 1),
])
def test_parameter_counts_are_the_papers(name, paper, decimals):
  """He et al. 2015 Table 6 (20-110), He et al. 2016 Table 3 (164), Zagoruyko & Komodakis
  Table 5 (WRN), 10 classes, to the papers' rounding (millions)."""
  assert round(count(models.create_model(name, num_classes=10)) / 1e6, decimals) == paper


def test_option_a_shortcuts_have_no_parameters_and_se_costs_what_it_should():
  # ResNet-20 counted by hand: stem 3x3x3x16 + BN; 3 stages of 3 units of two 3x3 convs + BNs;
  # no shortcut parameters (option A); Dense(64 -> 10).
  stem = 27 * 16 + 32
  stage1 = 3 * (2 * 9 * 16 * 16 + 2 * 32)
  stage2 = 9 * 16 * 32 + 9 * 32 * 32 + 2 * 64 + 2 * (2 * 9 * 32 * 32 + 2 * 64)
  stage3 = 9 * 32 * 64 + 9 * 64 * 64 + 2 * 128 + 2 * (2 * 9 * 64 * 64 + 2 * 128)
  assert count(models.ResNet20(num_classes=10)) == stem + stage1 + stage2 + stage3 + 650
  # SE (r=16, Dense biases) on C channels: C*C/16 + C/16 + C/16*C + C, 3 units per stage.
  se = sum(3 * (2 * c * (c // 16) + c // 16 + c) for c in (16, 32, 64))
  assert count(models.SEResNet20(num_classes=10)) - count(models.ResNet20(num_classes=10)) == se
  shapes = jax.eval_shape(lambda: models.ResNet20().init(jax.random.key(0), X, train=False))
  assert not any('conv_proj' in k for k in traverse_util.flatten_dict(shapes['params']))


@pytest.mark.parametrize('name', list(TINY))
def test_features_stages_headless_and_logits_agree(name):
  model = models.create_model(name, num_classes=10, **TINY[name])
  variables = random_variables(model, X, train=False)
  logits = model.apply(variables, X, train=False)
  pooled, maps = model.apply(variables, X, train=False, method='features', stages=True)
  assert logits.shape == (2, 10) and pooled.dtype == jnp.float32
  widths = model.stage_widths()
  assert pooled.shape == (2, widths[-1])
  sizes = {'stem': 32, **{f'stage{i + 1}': 32 // 2**i for i in range(len(widths))}}
  assert {k: v.shape for k, v in maps.items()} == {
      k: (2, s, s, model.num_filters if k == 'stem' else widths[int(k[5:]) - 1])
      for k, s in sizes.items()}
  # The head is Dense on the pooled vector (no dropout in eval mode).
  head = variables['params']['Dense_0']
  np.testing.assert_allclose(logits, pooled @ head['kernel'] + head['bias'], atol=1e-5)
  np.testing.assert_array_equal(
      model.apply(variables, X, train=False, method='features'), pooled)
  # Headless: num_classes=0 returns the same pre-logit vector, from the same backbone weights.
  headless = models.create_model(name, num_classes=0, **TINY[name])
  np.testing.assert_array_equal(headless.apply(variables, X, train=False), pooled)
  assert 'Dense_0' not in jax.eval_shape(
      lambda: headless.init(jax.random.key(0), X, train=False))['params']


@pytest.mark.parametrize('name', ['SEResNet20', 'SEWRN16_8'])
def test_se_gates_collection_holds_every_block_s_gates(name):
  model = models.create_model(name, num_classes=10, **TINY[name])
  variables = random_variables(model, X, train=False)
  logits, state = model.apply(variables, X, train=False, mutable=['se_gates'])
  np.testing.assert_array_equal(logits, model.apply(variables, X, train=False))
  gates = models.gates_by_block(state['se_gates'])
  assert len(gates) == sum(model.stage_sizes)
  # The same arrays as the Excitation modules' outputs, captured independently.
  _, captured = model.apply(variables, X, train=False, capture_intermediates=lambda m, _: (
      isinstance(m, models.Excitation)))
  flat = traverse_util.flatten_dict(captured['intermediates'])
  for block, value in gates.items():
    assert value.shape == (2, jax.tree.leaves(variables['params'][block]['SEBlock_0'])[0].shape[-1])
    assert float(value.min()) > 0 and float(value.max()) < 1
    np.testing.assert_array_equal(
        value, flat[(block, 'SEBlock_0', 'Excitation_0', '__call__')][0])
  # Recording gates never adds variables: init gives only params and batch statistics.
  assert set(jax.eval_shape(lambda: model.init(jax.random.key(0), X, train=False))) == {
      'params', 'batch_stats'}


def test_replace_head_keeps_the_backbone():
  model = models.create_model('SEResNet20', num_classes=10, **TINY['SEResNet20'])
  variables = random_variables(model, X, train=False)
  new, new_variables = models.replace_head(model, variables, 100, jax.random.key(1))
  assert new.num_classes == 100
  flat, new_flat = (traverse_util.flatten_dict(v) for v in (variables, new_variables))
  assert {k for k in new_flat if 'Dense_0' not in k} == {k for k in flat if 'Dense_0' not in k}
  for k, v in flat.items():
    if 'Dense_0' not in k:
      assert new_flat[k] is v
  assert new_variables['params']['Dense_0']['kernel'].shape == (16, 100)
  np.testing.assert_array_equal(
      new.apply(new_variables, X, train=False, method='features'),
      model.apply(variables, X, train=False, method='features'))
  assert new.apply(new_variables, X, train=False).shape == (2, 100)
  headless, headless_variables = models.replace_head(model, variables, 0, jax.random.key(1))
  assert 'Dense_0' not in headless_variables['params']
  assert headless.apply(headless_variables, X, train=False).shape == (2, 16)


def test_backbone_options_reach_every_family():
  """The network's conv/norm constructors build every layer: a network-level dtype reaches the
  pre-activation units too."""
  for name in ('SEResNet20', 'SEResNet164'):
    model = models.create_model(name, num_classes=10, dtype=jnp.bfloat16, **TINY[name])
    variables = random_variables(model, X, train=False)
    pooled, maps = jax.jit(lambda v, x: model.apply(v, x, train=False, method='features',
                                                    stages=True))(variables, X)  # noqa: B023
    assert all(m.dtype == jnp.bfloat16 for m in maps.values()), name


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match='shortcut'):
    models.SEResNet20(shortcut='C')
  with pytest.raises(ValueError, match='pre-activation'):
    models.SEWRN16_8(relu_before_se=True)
  with pytest.raises(ValueError, match='num_classes'):
    models.ResNet20(num_classes=-1)
  with pytest.raises(ValueError, match='exceeds'):
    models.SEResNet20(se_reduction=32)  # 16 channels in the first stage


def test_pre_activation_units_and_final_norm():
  """ResNet-164 and WRN: no BN after the stem conv, one BN-ReLU before pooling, 1x1 projections
  without BN where the shape changes (16 -> 64 in stage 1, then each stride-2 unit)."""
  shapes = jax.eval_shape(lambda: models.ResNet164(num_classes=10).init(
      jax.random.key(0), X, train=False))['params']
  assert 'bn_init' not in shapes and shapes['bn_final']['scale'].shape == (256,)
  projections = [k for k, v in shapes.items() if 'conv_proj' in v]
  assert projections == ['PreActBottleneck_0', 'PreActBottleneck_18', 'PreActBottleneck_36']


def test_runs_saved_before_the_new_model_fields_are_the_same_run():
  """A finished run's config without model.shortcut / model.se_bias asked for their defaults."""
  from se_resnet_jax.config import base_config
  from se_resnet_jax.summary import config_differences

  saved = base_config().to_dict()
  del saved['model']['shortcut'], saved['model']['se_bias']
  assert config_differences(saved, base_config()) == []
  changed = base_config()
  changed.model.se_bias = False
  assert config_differences(saved, changed) == ['model.se_bias']
