"""One 'data' mesh axis over every device of every host. The training set stays on the devices
as uint8, split evenly; each device draws its share of every batch from its own shard, so no
example moves between devices."""

import functools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from se_resnet_jax import compilation, input_pipeline


def data_mesh() -> jax.sharding.Mesh:
  """All devices of all processes on one 'data' axis. Auto (GSPMD), as the augmentation's vmap
  with replicated per-example keys fails on an Explicit axis over > 1 device."""
  return jax.make_mesh((jax.device_count(),), ('data',), (jax.sharding.AxisType.Auto,))


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A device array from a host array every process holds; each device takes only its part."""
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array as numpy, on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def shard_train_split(split: input_pipeline.Split, mesh: jax.sharding.Mesh):
  """(D, N/D, H, W, C) images and (D, N/D) labels, shard d on device d (remainder dropped)."""
  d = mesh.size
  n = len(split) // d
  sharding = NamedSharding(mesh, P('data'))
  images = split.images[:n * d].reshape((d, n) + split.images.shape[1:])
  return global_array(images, sharding), global_array(split.labels[:n * d].reshape(d, n), sharding)


def shard_eval_split(split: input_pipeline.Split, mesh: jax.sharding.Mesh, batch_size: int):
  """Chunks of `batch_size`, the last padded, with a mask so each example counts exactly once."""
  n = len(split)
  chunks = -(-n // batch_size)
  pad = chunks * batch_size - n
  images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
  labels = np.concatenate([split.labels, np.zeros(pad, np.int32)])
  mask = np.arange(chunks * batch_size) < n
  sharding = NamedSharding(mesh, P(None, 'data'))
  return tuple(global_array(a.reshape((chunks, batch_size) + a.shape[1:]), sharding)
               for a in (images, labels, mask))


def epoch_permutation(rng: jax.Array, epoch: jax.Array, num_shards: int, shard_size: int):
  """One permutation of its own shard per device, a pure function of (rng, epoch)."""
  keys = jax.random.split(jax.random.fold_in(rng, epoch), num_shards)
  return jax.vmap(lambda k: jax.random.permutation(k, shard_size))(keys)


def make_epoch_permutation(mesh: jax.sharding.Mesh, shard_size: int):
  """`epoch_permutation(rng, epoch)` compiled for `mesh`, laid out like the training set."""
  return compilation.jit(functools.partial(epoch_permutation, num_shards=mesh.size,
                                           shard_size=shard_size),
                         out_shardings=NamedSharding(mesh, P('data')))


def sample_batch(images: jax.Array, labels: jax.Array, perm: jax.Array, step_in_epoch: jax.Array,
                 per_device: int):
  """Each device's slice of the epoch permutation indexes its own shard: no data moves."""
  idx = jax.lax.dynamic_slice_in_dim(perm, step_in_epoch * per_device, per_device, axis=1)
  x = jax.vmap(lambda im, i: im[i])(images, idx)
  y = jax.vmap(lambda lb, i: lb[i])(labels, idx)
  return x.reshape((-1,) + x.shape[2:]), y.reshape(-1)
