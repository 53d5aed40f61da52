"""The training loop's performance contract, checked on the real `train_and_evaluate`.

A step that recompiles, fails to donate its state, or copies something from the host every step
still trains correctly, only slower (recompiles can cost more than the training itself), so no
accuracy test would notice. These tests run the library loop on tiny generated data and watch it:
XLA compilations through jax.monitoring, host-to-device copies through a transfer guard switched
on between steps, donation through the state the loop hands to evaluation, and the compile policy
(`se_resnet_jax.compilation`) through an HLO dump that only programs compiled with it write.
"""

import os
import signal
import warnings
from typing import Callable

import jax
import pytest
from conftest import dumped_programs, library_function_names

from se_resnet_jax import rundir, train, writers
from se_resnet_jax.errors import Preempted

STEPS_PER_EPOCH = 4
LOG_EVERY = 2


@pytest.fixture
def config(make_tiny_config):
  """4 steps per epoch of 32 images, a padded 2-chunk validation split, a log mid-epoch; a run of 3
  epochs stopped by max_steps after `epochs` (its schedule, compiled into the step, stays that of
  3 epochs, so runs of any length here load one another's programs from the cache)."""
  return lambda epochs: make_tiny_config(**{
      'synthetic.num_train': 192, 'synthetic.num_test': 48, 'validation_size': 64,
      'num_epochs': 3, 'max_steps': epochs * STEPS_PER_EPOCH, 'log_every_steps': LOG_EVERY,
      'eval_batch_size': 48})


class LoopWatcher:
  """Counts compilations; between steps, forbids host-to-device copies and checks donation.

  It is a hook of `train_and_evaluate`, called right after each step with the new state.
  Before a step that follows another step of the same epoch with no logging in between, the guard
  is 'disallow', so any host-to-device copy made by that step raises. Epoch ends (permutation,
  evaluation, checkpoints) and logging run with the guard off: they may move scalars.
  """

  def __init__(self):
    self.compiled = []
    self.guarded_steps = 0
    self.evaluated_state = None  # the state handed to evaluation at the end of an epoch
    self.donation_checked = False

  def on_compile(self, event, duration_secs, **kwargs):
    name = kwargs.get('fun_name', '?')
    # A compile or a cache load; the compile policy checks each option once per process.
    if event == '/jax/core/compile/backend_compile_duration' and name != 'jit(_option_probe)':
      self.compiled.append(name)

  def hook(self, step, state):
    if self.evaluated_state is not None and step % STEPS_PER_EPOCH == 1:
      leaves = jax.tree.leaves((self.evaluated_state.params, self.evaluated_state.opt_state,
                                self.evaluated_state.batch_stats))
      assert all(x.is_deleted() for x in leaves), 'the train step did not donate its input state'
      self.donation_checked = True
    if step % STEPS_PER_EPOCH == 0:  # the loop evaluates this very state, then donates it
      self.evaluated_state = state
    guard = step % STEPS_PER_EPOCH and step % LOG_EVERY
    jax.config.update('jax_transfer_guard_host_to_device', 'disallow' if guard else 'allow')
    self.guarded_steps += bool(guard)


def run_watched(config, workdir) -> LoopWatcher:
  """train_and_evaluate from cold in-memory caches, with a LoopWatcher attached."""
  watcher = LoopWatcher()
  jax.clear_caches()  # else the second run would find the first run's small programs in memory
  jax.monitoring.register_event_duration_secs_listener(watcher.on_compile)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('error', message='.*donated buffers were not usable.*')
      train.train_and_evaluate(config, workdir, writer=writers.NullWriter(),
                               hooks=[watcher.hook])
  finally:
    jax.monitoring.unregister_event_duration_listener(watcher.on_compile)
    jax.config.update('jax_transfer_guard_host_to_device', 'allow')
  return watcher


def test_no_recompilation_no_copies_donation_and_the_compile_policy(config, tmp_path,
                                                                   policy_dump):
  """One epoch and three epochs (steps, epoch boundaries, evaluations) compile the same programs,
  and every program the library defines is compiled with the compile policy.

  Counting programs obtained (compiled, or loaded from the persistent cache the test session may
  use) makes the comparison independent of caching: a program that only the longer run needs
  shows up as an extra entry.
  """
  one = run_watched(config(1), str(tmp_path / 'one'))
  three = run_watched(config(3), str(tmp_path / 'three'))
  assert sorted(three.compiled) == sorted(one.compiled), (
      f'compiled {len(one.compiled)} programs in 1 epoch but {len(three.compiled)} in 3')
  assert three.guarded_steps == 3 * (STEPS_PER_EPOCH // LOG_EVERY)
  compiled = {name.removeprefix('jit(').removesuffix(')') for name in one.compiled}
  assert {'compiled_step', 'eval_step', 'create_train_state', 'epoch_permutation'} <= compiled
  library_programs = compiled & library_function_names()
  if jax.default_backend() == 'cpu':  # the backend whose policy sets options
    assert library_programs <= dumped_programs(policy_dump), (
        library_programs - dumped_programs(policy_dump))
  assert three.donation_checked


def programs_loaded(run: Callable[[], object]) -> dict:
  """{program name: whether the persistent compilation cache served it} of what `run` compiles,
  with JAX's in-memory caches cleared first (a program must come from disk, not from memory)."""
  jax.clear_caches()
  hit, programs = [False], {}

  def on_event(event, **kwargs):
    if event == '/jax/compilation_cache/cache_hits':
      hit[0] = True

  def on_duration(event, duration_secs, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      programs[kwargs.get('fun_name')] = hit[0]
      hit[0] = False

  jax.monitoring.register_event_listener(on_event)
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    run()
  finally:
    jax.monitoring.unregister_event_listener(on_event)
    jax.monitoring.unregister_event_duration_listener(on_duration)
  return programs


def test_a_resumed_run_loads_the_train_step_of_the_fresh_run(config, tmp_path):
  """After a preemption the rerun resumes with the very program the fresh run compiled: the
  persistent compilation cache (this session's) serves it, where a restored state that differed
  from a fresh one in any type would cost a whole compile per resume."""
  workdir = str(tmp_path / 'run')

  def preempt(step, state):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(Preempted):
    train.train_and_evaluate(config(1), workdir, writer=writers.NullWriter(), hooks=[preempt])
  programs = programs_loaded(
      lambda: train.train_and_evaluate(config(1), workdir, writer=writers.NullWriter()))
  assert programs.get('jit(compiled_step)') is True, programs


def test_other_data_of_the_same_shapes_loads_the_same_train_step(config, tmp_path):
  """A fold or another validation seed trains on other images, with other normalisation
  statistics: those are an argument of the train step, so the run loads the step another run
  compiled (the k folds of a setting compile one train step, not k)."""
  train.train_and_evaluate(config(1), str(tmp_path / 'seed0'), writer=writers.NullWriter())
  other = config(1)
  other.validation_seed = 1
  programs = programs_loaded(
      lambda: train.train_and_evaluate(other, str(tmp_path / 'seed1'), writer=writers.NullWriter()))
  assert programs.get('jit(compiled_step)') is True, programs
  means = [rundir.read_record(str(tmp_path / name)).mean for name in ('seed0', 'seed1')]
  assert means[0] != means[1]  # the two runs' statistics differ indeed
