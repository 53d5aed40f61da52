"""The library's linen networks as Flax NNX modules, through `flax.nnx.bridge.ToNNX`, which owns
the variables as NNX does and works with `nnx.Optimizer`, `nnx.jit`, `nnx.split`:

  model = se_resnet_jax.nnx.create_model('SEResNet18', rngs=nnx.Rngs(0), num_classes=10)
  logits = model(images, train=False)
  logits = model(images, train=True, mutable=['batch_stats'])  # updates the running statistics

The wrapped module computes exactly what the linen module does: it calls `module.apply` on the
same variables.
"""

from typing import Optional

import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from flax import nnx, traverse_util
from flax.nnx import bridge

from se_resnet_jax import models
from se_resnet_jax.models import IMAGE_SHAPE

COLLECTIONS = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}


def from_linen(module: nn.Module, variables: Optional[dict] = None, *,
               rngs: Optional[nnx.Rngs] = None,
               image_shape: tuple = IMAGE_SHAPE) -> bridge.ToNNX:
  """`module` as an NNX module holding `variables` (linen's {'params', 'batch_stats'}), built
  abstractly; else freshly initialised from `rngs`, which also feeds dropout."""
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  sample = jnp.zeros((1,) + tuple(image_shape), getattr(module, 'dtype', jnp.float32))
  if variables is None:
    return bridge.ToNNX(module, rngs=rngs).lazy_init(sample, train=False)
  model = nnx.eval_shape(
      lambda: bridge.ToNNX(module, rngs=nnx.Rngs(0)).lazy_init(sample, train=False))
  model.to_nnx__rngs = rngs.fork()  # real keys in place of eval_shape's abstract ones
  expected = linen_variables(model)
  given = {c: variables.get(c, {}) for c in expected}
  flat_expected, flat_given = (traverse_util.flatten_dict(t) for t in (expected, given))
  if flat_expected.keys() != flat_given.keys():
    missing = sorted('/'.join(k) for k in flat_expected.keys() - flat_given.keys())
    extra = sorted('/'.join(k) for k in flat_given.keys() - flat_expected.keys())
    raise ValueError(f'The variables do not fit {type(module).__name__}: missing {missing[:5]}, '
                     f'unexpected {extra[:5]}.')
  for key, want in flat_expected.items():
    if tuple(flat_given[key].shape) != tuple(want.shape):
      raise ValueError(f'Variable {"/".join(key)} has shape {tuple(flat_given[key].shape)}; '
                       f'{type(module).__name__} needs {tuple(want.shape)}.')
  # The module's attributes hold both collections, without the collection's name.
  nnx.update(model, traverse_util.unflatten_dict({k[1:]: jnp.asarray(v)
                                                   for k, v in flat_given.items()}))
  return model


def linen_variables(model: bridge.ToNNX) -> dict:
  """The NNX module's variables as linen's {'params': ..., 'batch_stats': ...} (for `apply`)."""
  pure = {c: nnx.to_pure_dict(nnx.state(model, kind)) for c, kind in COLLECTIONS.items()}
  return {c: tree for c, tree in pure.items() if tree}


def create_model(name: str, *, rngs: nnx.Rngs, image_shape: tuple = IMAGE_SHAPE,
                 **kwargs) -> bridge.ToNNX:
  """A freshly initialised NNX module of any network in `models.MODELS` (same keyword arguments
  as `se_resnet_jax.create_model`)."""
  return from_linen(models.create_model(name, **kwargs), rngs=rngs, image_shape=image_shape)


def load_run(workdir: str, checkpoint: str = 'best',
             config: Optional[ml_collections.ConfigDict] = None,
             rngs: Optional[nnx.Rngs] = None) -> tuple:
  """(NNX module holding a run's eval weights, the run's `rundir.Run`): the module takes
  normalised float images, as the linen network does (mean and std are in `run.record`)."""
  from se_resnet_jax import rundir

  run = rundir.restore_run(workdir, checkpoint, config)
  return from_linen(run.model, run.variables, rngs=rngs), run
