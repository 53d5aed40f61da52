"""Data parallelism on 8 (virtual CPU) devices gives the same step as one device (issue 3).

The device count is fixed when JAX starts, so the check runs in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8. It first runs `train_and_evaluate` for a few
steps on all 8 devices (the whole loop, data-parallel) on CIFAR-100-shaped arrays (an .npz of
generated images with 100 classes; tfds's CIFAR-100 is read in test_input_pipeline.py), then takes
the state it checkpointed and applies one `train_step` to the same global batch on a 1-device mesh
and on the 8-device mesh: BatchNorm statistics, the loss and the gradients are over the global
batch, so both must agree. (CIFAR-10 mock data goes through the loop in test_train.py.)
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # a subprocess with 8 devices runs the loop

SCRIPT = r'''
import functools, json, sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from se_resnet_jax import config as config_lib, steps, train
from se_resnet_jax.plan import plan_run
from se_resnet_jax.checkpoints import RunCheckpoints

assert jax.device_count() == 8, jax.devices()
workdir = sys.argv[1]
rs = np.random.RandomState(0)
np.savez(f'{workdir}.npz', x_train=rs.randint(0, 256, (640, 32, 32, 3)).astype(np.uint8),
         y_train=np.arange(640) % 100, x_test=rs.randint(0, 256, (640, 32, 32, 3)).astype(np.uint8),
         y_test=rs.randint(0, 100, 640))
config = config_lib.base_config()
config.dataset, config.npz_path = 'cifar100', f'{workdir}.npz'
config.validation_size = 128  # of 640 training images: 512 left, 16 steps of 32
config.model.num_filters, config.model.se_reduction = 8, 4
config.model.dropout_rate = 0.3  # dropout masks must not depend on the sharding either
config.augment.brightness = 0.2  # nor the per-example augmentation
config.batch_size, config.eval_batch_size = 32, 48  # 4 and 6 per device
config.num_epochs, config.max_steps = 1, 3
config.learning_rate, config.warmup_epochs = 0.05, 0.0
config.log_every_steps, config.measure_inference = 1, False

result = train.train_and_evaluate(config, workdir)
with open(f'{workdir}/report.json') as f:
  report = json.load(f)
summary = {'devices': result['device']['count'], 'step': result['step'],
           'classes': len(report['class_names']), 'dataset': report['config']['dataset'],
           'confusion': [len(report['test']['confusion_matrix']),
                         len(report['test']['confusion_matrix'][0])],
           'test': report['test'], 'validation': report['validation']}

# The state the loop checkpointed after 3 steps (momentum and BatchNorm statistics included).
mesh8 = Mesh(np.array(jax.devices()), ('data',))
target = plan_run(config, 512, 8).abstract_state(NamedSharding(mesh8, P()))  # 512 train images
ckpts = RunCheckpoints(workdir)
state, _ = ckpts.restore(target)
ckpts.close()
state = jax.device_get(state)

rs = np.random.RandomState(0)
images = rs.randint(0, 256, (32, 32, 32, 3)).astype(np.uint8)
labels = rs.randint(0, 100, 32).astype(np.int32)
step = jax.jit(functools.partial(steps.train_step, config=config, mean=(0.5, 0.5, 0.5),
                                 std=(0.25, 0.25, 0.25)))

def one_step(devices):
  mesh = Mesh(np.array(devices), ('data',))
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  x, y = jax.device_put(images, batch), jax.device_put(labels, batch)
  assert len(x.addressable_shards) == len(devices)
  new, metrics = step(jax.device_put(state, replicated),
                      jax.device_put(steps.Metrics.empty(), replicated), x, y,
                      jax.random.key(7))
  return float(metrics.compute()['loss']), jax.device_get(
      (new.params, new.batch_stats, new.opt_state))

def assert_close(tree8, tree1, rtol, atol, leaf_scale=0.0):
  flat8 = jax.tree_util.tree_flatten_with_path(tree8)[0]
  for (path, a8), a1 in zip(flat8, jax.tree.leaves(tree1)):
    tol = max(atol, leaf_scale * float(np.abs(a1).max()))
    np.testing.assert_allclose(a8, a1, rtol=rtol, atol=tol, err_msg=jax.tree_util.keystr(path))

loss1, (params1, stats1, opt1) = one_step(jax.devices()[:1])
loss8, (params8, stats8, opt8) = one_step(jax.devices())
np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
# BatchNorm statistics of the global batch (per-device statistics would differ by percents)
assert_close(stats8, stats1, rtol=1e-5, atol=1e-6)
assert_close(params8, params1, rtol=1e-5, atol=1e-5)
# The momentum holds raw gradients; where a gradient is a sum that nearly cancels (the last BN of
# a unit starts at scale 0), the 8-device summation order moves it by ~0.2% of that leaf's size.
assert_close(opt8, opt1, rtol=1e-5, atol=1e-6, leaf_scale=1e-2)
moved = max(float(np.abs(a - b).max()) for a, b in
            zip(jax.tree.leaves(params1), jax.tree.leaves(state.params)))
summary.update(loss1=loss1, loss8=loss8, params_moved=moved)
print('SUMMARY ' + json.dumps(summary))
'''


def test_eight_devices_match_one_device(tmp_path):
  # LLVM's backend optimisation off: the two sides compare with each other only, and three steps
  # do not repay optimised code (the test took 64 CPU-s instead of 83).
  env = {**os.environ, 'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '')
                                     + ' --xla_force_host_platform_device_count=8'
                                     + ' --xla_backend_optimization_level=0').strip(),
         'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path / 'run')], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-5000:]
  summary = json.loads(next(line for line in out.stdout.splitlines()
                            if line.startswith('SUMMARY '))[len('SUMMARY '):])
  assert summary['devices'] == 8
  assert (summary['dataset'], summary['classes'], summary['confusion']) == ('cifar100', 100,
                                                                            [100, 100])
  # evaluation shards each padded batch of 48 over the 8 devices, counting every example once
  for split, n in (('validation', 128), ('test', 640)):
    assert summary[split]['num_examples'] == n
    assert 0.0 <= summary[split]['accuracy'] <= 1.0 and 0.0 < summary[split]['loss'] < 20.0
  assert summary['params_moved'] > 1e-4  # the compared step really changed the weights
  assert abs(summary['loss8'] - summary['loss1']) <= 1e-5 * abs(summary['loss1'])
