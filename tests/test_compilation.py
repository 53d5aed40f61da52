"""The compile policy: options by backend, unknown options dropped, the same numbers as XLA's
defaults, and the inference and export programs compiled with it.

That every program of a training run gets the policy is checked on the real loop in
test_compile_count.py, beside the loop's other performance contracts.
"""

import logging
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dumped_programs, random_variables

from se_resnet_jax import compilation, export, inference, rundir
from se_resnet_jax.models import ResidualBlock


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the policy sets options on a CPU')
def test_inference_and_the_export_check_get_the_policy_and_user_programs_do_not(
    tiny_run, policy_dump):
  run = rundir.restore_run(tiny_run)
  infer = inference.inference_function(run.model, run.variables, run.record.mean, run.record.std)
  images = np.zeros((2, 32, 32, 3), np.uint8)
  inference.compile_inference(infer, 2)(images)
  _, run_exported = export.export_jax(infer, ('cpu',))
  run_exported(images)

  def users_own_program(x):
    return jnp.tanh(x) * 3

  jax.jit(users_own_program)(jnp.ones(3))
  dumped = dumped_programs(policy_dump)
  assert {'infer', 'call'} <= dumped, dumped  # call: the exported artifact, run by the check
  assert 'users_own_program' not in dumped


def test_an_option_this_xla_lacks_is_dropped_with_one_warning(monkeypatch, caplog):
  monkeypatch.setitem(compilation.BACKEND_OPTIONS, jax.default_backend(),
                      {'xla_backend_optimization_level': 1, 'xla_no_such_option_here': True})
  with caplog.at_level(logging.WARNING):
    first = compilation.compiler_options()
    second = compilation.compiler_options()
  assert first == second == {'xla_backend_optimization_level': 1}
  assert sum('xla_no_such_option_here' in r.getMessage() for r in caplog.records) == 1
  np.testing.assert_array_equal(compilation.jit(lambda x: x * 2)(jnp.arange(3.0)), [0, 2, 4])


def test_backends_without_options_and_the_defaults_context_compile_with_xla_defaults():
  assert compilation.compiler_options('no_such_backend') is None
  with compilation.xla_defaults():
    assert compilation.compiler_options() is None
  if jax.default_backend() == 'cpu':
    assert compilation.compiler_options() == compilation.BACKEND_OPTIONS['cpu']


def test_the_policy_computes_what_xla_defaults_compute():
  """A stride-2 SE unit with its projection: 3x3 and 1x1 convolutions, BatchNorm, SE."""
  block = ResidualBlock(16, conv=partial(nn.Conv, use_bias=False),
                        norm=partial(nn.BatchNorm, use_running_average=True), strides=2,
                        se_reduction=4)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 8))
  variables = random_variables(block, x)
  with compilation.xla_defaults():
    reference = compilation.jit(block.apply)(variables, x)
  np.testing.assert_allclose(compilation.jit(block.apply)(variables, x), reference, rtol=1e-5,
                             atol=1e-5)
