"""Data-parallel training over several processes, as on several GPU hosts or a TPU pod slice.

Two processes on this machine, joined by `jax.distributed` on a loopback address and each given
two CPU devices, run the real command: the same global batch of 32 over 4 devices. A SIGTERM to
just one of them must make both save the same step and stop cleanly (the preemption sync), and
that checkpoint must hold the parameters of one process that has all 4 devices and stops there.
"""

import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, TINY_RUN, abstract_state, checkpoint_steps, wait_until

from se_resnet_jax.checkpoints import RunCheckpoints
from se_resnet_jax.config import architecture

STEPS_PER_EPOCH = 8  # (384 - 128 validation) / 32
EPOCHS = 2
SMALL = {  # the session run's sizes, on generated images
    **{k: v for k, v in TINY_RUN.items() if k != 'dataset'}, 'log_every_steps': 1000,
    'num_epochs': EPOCHS, 'evaluate_test': False,
}
TIMEOUT_S = 600  # a guard against hangs only

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    'jax_cpu_collectives_implementation' not in jax.config.values,
    reason='this jaxlib has no cross-process CPU collectives (jax_cpu_collectives_implementation)')]


def _env(devices: int) -> dict:
  """CPU devices per process, LLVM's backend optimisation off, no persistent compilation cache.

  The runs compare with each other only, and a dozen steps do not repay optimised code: without
  it each train step compiles in half the time (the test took 89 CPU-s instead of 110).
  JAX writes that cache from process 0 only, so process 0 would load a program in a second while
  process 1 compiles it: gloo gives a peer 30 s to join the first collective, and on a busy
  machine the gap is longer.
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=(f'--xla_force_host_platform_device_count={devices} '
                        '--xla_backend_optimization_level=0'),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_ENABLE_COMPILATION_CACHE='false')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return env


def _command(workdir: str, *flags: str) -> list:
  return ([sys.executable, '-m', 'se_resnet_jax.main', '--config=configs/smoke.py',
           f'--workdir={workdir}', *flags] + [f'--config.{k}={v}' for k, v in SMALL.items()])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir: str, logs: str) -> list:
  """Both processes of one two-process run, on a fresh loopback coordinator port."""
  port = _free_port()
  procs = []
  for i in range(2):
    with open(f'{logs}.{i}', 'a') as out:
      procs.append(subprocess.Popen(
          _command(workdir, '--distributed', f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}'),
          cwd=REPO, env=_env(2), stdout=out, stderr=subprocess.STDOUT))
  return procs


def _wait(procs: list, logs: str) -> list:
  """Exit codes and logs; a process left waiting on a dead peer is killed, not waited for ever."""
  try:
    for proc in procs:
      proc.wait(timeout=TIMEOUT_S)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  outputs = []
  for i in range(2):
    with open(f'{logs}.{i}') as f:
      outputs.append(f.read())
  return [p.returncode for p in procs], outputs


def _restore(workdir: str, make_tiny_config) -> dict:
  """The latest checkpoint read with the library's RunCheckpoints onto this process's one device.

  Arrays saved by several processes need a target saying where they go: an abstract TrainState
  (shapes only, nothing computed) placed on the first local device.
  """
  config = make_tiny_config(**SMALL)
  ckpts = RunCheckpoints(workdir)
  try:
    state, _ = ckpts.restore(abstract_state(config), architecture=architecture(config, 10))
  finally:
    ckpts.close()
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state}


def test_two_processes_stop_together_on_one_sigterm_and_match_one_process(
    tmp_path, make_tiny_config):
  multi, logs = str(tmp_path / 'multi'), str(tmp_path / 'log')
  procs = _launch(multi, logs)
  # the first epoch's checkpoint, written by both processes together
  wait_until(procs, lambda: checkpoint_steps(multi), TIMEOUT_S)
  procs[1].send_signal(signal.SIGTERM)  # a preemption notice reaching one host first
  codes, outputs = _wait(procs, logs)
  assert codes == [0, 0], [o[-2000:] for o in outputs]
  assert 'JAX process 1/2' in outputs[1] and '4 devices, global batch 32' in outputs[0]
  saved = [[line.split('at step ')[1].split()[0].rstrip(';') for line in o.splitlines()
            if 'SIGTERM: saved a checkpoint at step' in line] for o in outputs]
  assert len(saved[0]) == 1 and saved[0] == saved[1], saved
  step = int(saved[0][0])
  assert STEPS_PER_EPOCH <= step < EPOCHS * STEPS_PER_EPOCH and checkpoint_steps(multi)[-1] == step

  # One process with all 4 devices, stopped at the same step (max_steps leaves the schedule alone).
  single = str(tmp_path / 'single')
  env = dict(_env(4), JAX_ENABLE_COMPILATION_CACHE='true')  # one process: the session cache helps
  if jax.config.jax_compilation_cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  result = subprocess.run(_command(single, f'--config.max_steps={step}'), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'JAX process 0/1' in result.stderr and '4 devices, global batch 32' in result.stderr

  state, expected = _restore(multi, make_tiny_config), _restore(single, make_tiny_config)
  assert int(state['step']) == int(expected['step']) == step
  # The same arithmetic, but BatchNorm and gradient sums cross processes through gloo, perhaps in
  # another order than inside one process: equal up to float32 rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               state, expected)
