"""The plan of a run, made once from its config: the network, the learning-rate schedule, the
optimizer and the step counts, handed to everything that trains, restores or converts it.

The restore target is the traced shapes of the very initialisation that starts a run, so a
checkpoint is read onto exactly the structure a fresh run would have; a fresh run compiles that
same trace instead of tracing the network again.
"""

import dataclasses
from typing import Optional

import jax
import ml_collections
import optax

from se_resnet_jax import config as config_lib
from se_resnet_jax import input_pipeline, steps
from se_resnet_jax.errors import ConfigError
from se_resnet_jax.models import IMAGE_SHAPE, SEResNet


@dataclasses.dataclass(frozen=True)
class Plan:
  config: ml_collections.ConfigDict
  num_classes: int
  model: SEResNet
  steps_per_epoch: int
  total_steps: int  # num_epochs of steps, or fewer with max_steps
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  _inits: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def architecture(self) -> dict:
    return config_lib.architecture(self.config, self.num_classes)

  @property
  def data(self) -> dict:
    return input_pipeline.data_identity(self.config)

  def _traced_init(self, sharding: jax.sharding.Sharding) -> jax.stages.Traced:
    """The initialisation traced once per placement (the key is an argument: any seed fits)."""
    if sharding not in self._inits:
      init = steps.init_program(self.config, self.model, self.tx, IMAGE_SHAPE, sharding)
      self._inits[sharding] = init.trace(jax.random.key(0))
    return self._inits[sharding]

  def abstract_state(self, sharding: jax.sharding.Sharding) -> steps.TrainState:
    """The train state as shapes placed with `sharding`: a restore target that costs nothing."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        self._traced_init(sharding).out_info)

  def init_state(self, sharding: jax.sharding.Sharding) -> steps.TrainState:
    """Fresh weights drawn from key(config.seed), placed with `sharding`."""
    init = self._traced_init(sharding).lower().compile()
    return init(jax.random.key(self.config.seed))


def plan_run(config: ml_collections.ConfigDict, num_train: Optional[int] = None,
             num_devices: int = 1) -> Plan:
  """The plan of `config` on `num_train` training examples over `num_devices` devices.

  Without `num_train` (a run restored to be read, not trained) an epoch is one step: the
  optimizer state's structure does not depend on the schedule.
  """
  steps_per_epoch = 1
  if num_train is not None:
    steps_per_epoch = (num_train // num_devices) // (config.batch_size // num_devices)
    if steps_per_epoch == 0:
      raise ConfigError(f'batch_size={config.batch_size} is larger than the {num_train} training '
                        'examples; lower batch_size.')
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  num_classes = config_lib.num_classes(config)
  schedule = steps.create_learning_rate_schedule(config, steps_per_epoch)
  return Plan(config, num_classes, config_lib.build_model(config, num_classes), steps_per_epoch,
              total_steps, schedule, steps.create_optimizer(config, schedule))


