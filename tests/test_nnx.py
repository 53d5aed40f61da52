"""The NNX modules compute what the linen networks compute, and train the same."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_variables, randomise_batch_stats
from flax import nnx, traverse_util

import se_resnet_jax.nnx as se_nnx
from se_resnet_jax import inference, models


@pytest.fixture(scope='module')
def linen():
  """A small SE-ResNet18 (no dropout, so a step is deterministic) with non-trivial weights."""
  model = models.SEResNet18(num_classes=10, num_filters=4, se_reduction=4, dropout_rate=0.0)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(6, 32, 32, 3)), jnp.float32)
  labels = jnp.arange(6) % 10
  return model, randomise_batch_stats(random_variables(model, x, train=False)), x, labels


def assert_trees_close(a, b, atol):
  flat_a, flat_b = (traverse_util.flatten_dict(jax.device_get(t)) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_allclose(flat_a[key], flat_b[key], rtol=0, atol=atol, err_msg=str(key))


def test_nnx_outputs_equal_the_linen_module_s(linen):
  model, variables, x, _ = linen
  module = se_nnx.from_linen(model, variables)
  assert_trees_close(se_nnx.linen_variables(module), variables, atol=0)
  np.testing.assert_array_equal(module(x, train=False), model.apply(variables, x, train=False))
  expected, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(module(x, train=True, mutable=['batch_stats']), expected)
  assert_trees_close(se_nnx.linen_variables(module)['batch_stats'], updates['batch_stats'],
                     atol=0)


def test_one_nnx_training_step_equals_the_linen_step(linen):
  """nnx.Optimizer + nnx.value_and_grad on the wrapped module vs optax on linen variables."""
  model, variables, x, labels = linen
  tx = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731

  def linen_loss(params, batch_stats):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                  mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

  @jax.jit
  def linen_step(variables):
    opt_state = tx().init(variables['params'])
    (loss, updates), grads = jax.value_and_grad(linen_loss, has_aux=True)(
        variables['params'], variables['batch_stats'])
    changes, _ = tx().update(grads, opt_state, variables['params'])
    return loss, {'params': optax.apply_updates(variables['params'], changes),
                  'batch_stats': updates['batch_stats']}

  module = se_nnx.from_linen(model, variables)
  optimizer = nnx.Optimizer(module, tx(), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(module, optimizer):
    def loss_fn(module):
      logits = module(x, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(module)
    optimizer.update(module, grads)
    return loss

  expected_loss, expected = linen_step(variables)
  loss = nnx_step(module, optimizer)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  assert_trees_close(se_nnx.linen_variables(module), expected, atol=1e-6)
  assert not np.allclose(expected['params']['Dense_0']['kernel'],
                         variables['params']['Dense_0']['kernel'])  # the step moved the weights


# The ResNet-18 family, and each CIFAR family once at its shallowest: ResNet-110 and -164 only add
# units (and a minute each on 2 CPU cores), nothing the wrapper treats differently.
NNX_CASES = [n for n in models.MODELS if n.endswith(('18', '34', '50', '101', '152'))] + [
    'SEResNet20', 'ResNet20', 'SEWRN16_8', 'WRN16_8']


@pytest.mark.parametrize('name', NNX_CASES)
def test_every_network_has_an_nnx_module(name):
  """Built abstractly: the NNX module holds exactly the linen network's variables."""
  kwargs = dict(num_classes=10, num_filters=16)
  module = nnx.eval_shape(lambda: se_nnx.create_model(name, rngs=nnx.Rngs(0), **kwargs))
  linen_shapes = jax.eval_shape(lambda: models.create_model(name, **kwargs).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  shapes = lambda tree: {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}  # noqa: E731
  assert shapes(se_nnx.linen_variables(module)) == shapes(dict(linen_shapes))
  count = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))
  assert count == sum(math.prod(v.shape) for v in jax.tree.leaves(linen_shapes['params']))


def test_variables_of_another_network_are_refused(linen):
  model, variables, _, _ = linen
  with pytest.raises(ValueError, match='has shape'):
    se_nnx.from_linen(models.SEResNet18(num_classes=10, num_filters=8, se_reduction=4), variables)
  with pytest.raises(ValueError, match='do not fit'):
    se_nnx.from_linen(models.SEResNet34(num_classes=10, num_filters=4, se_reduction=4), variables)


def test_a_run_loads_into_nnx(tiny_run):
  module, run = se_nnx.load_run(tiny_run)
  images = np.random.RandomState(0).randint(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  mean, std = np.array(run.record.mean, np.float32), np.array(run.record.std, np.float32)
  x = (images.astype(np.float32) / 255 - mean) / std
  logits, _ = inference.reference_outputs(run.model, run.variables, mean, std, images)
  np.testing.assert_allclose(module(jnp.asarray(x), train=False), logits, rtol=1e-5, atol=1e-5)
