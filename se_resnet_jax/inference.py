"""A trained network as one function of uint8 images: what export, predict and the benchmark share.

The /255 scaling, the normalisation constants and the weights are baked in, so a caller needs
nothing but images. Eval-mode BatchNorm is a per-channel affine map, so it is folded into the
preceding convolution's kernel and a bias: the same function up to float rounding (which the
export's check measures), with less arithmetic per layer.
"""

import functools
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from se_resnet_jax import augment, compilation
from se_resnet_jax.models import IMAGE_SHAPE, SEResNet


def _batch_norm_inputs(model: nn.Module, variables: dict, image_shape: tuple) -> dict:
  """{BatchNorm path: (path of the convolution it folds into, or None; epsilon)}.

  Found by tracing which array each BatchNorm receives, so it holds for every model. It folds only
  into a convolution whose output nothing else received first (a pre-activation stem's output also
  feeds a shortcut; BatchNorms of sums follow no convolution): otherwise None.
  """
  pairs, last_conv = {}, {}

  def watch(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if last_conv.get('out') is not None and not isinstance(context.module, nn.BatchNorm) and any(
        a is last_conv['out'] for a in args):
      last_conv['out'] = None  # another module receives the output: it must stay as it is
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv):
      last_conv['out'], last_conv['path'] = out, context.module.path
    elif isinstance(context.module, nn.BatchNorm):
      follows = last_conv.get('out') is not None and args[0] is last_conv['out']
      pairs[context.module.path] = (last_conv['path'] if follows else None,
                                    context.module.epsilon)
      if follows:
        last_conv['out'] = None
    return out

  def trace():
    with nn.intercept_methods(watch):
      return model.apply(variables, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)

  jax.eval_shape(trace)
  return pairs


def fold_batch_norm(model: nn.Module, variables: dict,
                    image_shape: tuple = IMAGE_SHAPE) -> dict:
  """Eval-mode variables with each BatchNorm folded into its convolution's kernel.

  BatchNorm(conv(x, k)) = conv(x, k * s) + (bias - mean * s), s = scale / sqrt(var + eps). Only
  `apply_folded` uses them: as ordinary variables they fail instead of computing nonsense.
  """
  params = traverse_util.flatten_dict(jax.device_get(variables['params']))
  stats = traverse_util.flatten_dict(jax.device_get(variables['batch_stats']))
  folded = dict(params)
  for norm, (conv, eps) in _batch_norm_inputs(model, variables, image_shape).items():
    s = (np.asarray(params[norm + ('scale',)], np.float64)
         / np.sqrt(np.asarray(stats[norm + ('var',)], np.float64) + eps))
    bias = params[norm + ('bias',)]
    folded[norm + ('bias',)] = (np.asarray(bias, np.float64)
                                - np.asarray(stats[norm + ('mean',)], np.float64) * s
                                ).astype(bias.dtype)
    if conv is None:
      folded[norm + ('scale',)] = s.astype(params[norm + ('scale',)].dtype)
      continue
    kernel = params[conv + ('kernel',)]
    folded[conv + ('kernel',)] = (np.asarray(kernel, np.float64) * s).astype(kernel.dtype)
    del folded[norm + ('scale',)]
  return {'params': traverse_util.unflatten_dict(folded)}


def _folded_norm(next_fun, args, kwargs, context):
  """A folded BatchNorm: its bias to add (times its scale where it could not be folded)."""
  if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
    x, module = args[0], context.module
    if module.has_variable('params', 'scale'):
      x = x * module.get_variable('params', 'scale').astype(x.dtype)
    return x + module.get_variable('params', 'bias').astype(x.dtype)
  return next_fun(*args, **kwargs)


def apply_folded(model: nn.Module, folded: dict, x: jax.Array) -> jax.Array:
  """Eval-mode logits of `model` with the variables of `fold_batch_norm`."""
  with nn.intercept_methods(_folded_norm):
    return model.apply(folded, x, train=False)


def eval_logits(apply: Callable[[jax.Array], jax.Array], x: jax.Array,
                tta_flip: bool) -> jax.Array:
  """The logits the library's evaluation reports: with tta_flip, the two views' log-mean-prob."""
  logits = apply(x)
  if tta_flip:
    flipped = apply(x[:, :, ::-1])
    logits = jnp.logaddexp(jax.nn.log_softmax(logits), jax.nn.log_softmax(flipped)) - jnp.log(2)
  return logits


def inference_function(model: SEResNet, variables: dict, mean: Sequence[float],
                       std: Sequence[float], *, tta_flip: bool = False, fold: bool = True,
                       image_shape: tuple = IMAGE_SHAPE) -> Callable[[jax.Array], tuple]:
  """`uint8 (N, H, W, 3) -> (float32 logits (N, C), probabilities (N, C))`, everything baked in
  (float32: ONNX Runtime's CPU kernels and most servers have no bf16 convolutions)."""
  model = model.clone(dtype=jnp.float32)
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if fold:
    weights = jax.tree.map(jnp.asarray, fold_batch_norm(model, variables, image_shape))
    apply = lambda x: apply_folded(model, weights, x)
  else:
    weights = jax.tree.map(jnp.asarray, jax.device_get(variables))
    apply = lambda x: model.apply(weights, x, train=False)

  def infer(images: jax.Array) -> tuple:
    x = augment.preprocess_for_eval(images, mean, std, jnp.float32)
    logits = eval_logits(apply, x, tta_flip)
    return logits, jax.nn.softmax(logits)

  return infer


def compile_inference(infer: Callable[[jax.Array], tuple], batch_size: int,
                      image_shape: tuple = IMAGE_SHAPE):
  """`infer` compiled, with the library's compile policy, for uint8 batches of `batch_size`."""
  spec = jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.uint8)
  return compilation.jit(infer).lower(spec).compile()


def reference_outputs(model: SEResNet, variables: dict, mean: Sequence[float],
                      std: Sequence[float], images: np.ndarray, tta_flip: bool = False,
                      batch_size: int = 256) -> tuple:
  """The library's own eval-mode (logits, probabilities) in float32, unfolded: the yardstick."""
  model = model.clone(dtype=jnp.float32)
  run = compilation.jit(lambda v, im: eval_logits(
      lambda x: model.apply(v, x, train=False),
      augment.preprocess_for_eval(im, mean, std, jnp.float32), tta_flip))
  logits = np.concatenate([np.asarray(run(variables, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])
  return logits, np.asarray(jax.nn.softmax(logits))


def measure_inference(model: SEResNet, variables: dict, image_shape: tuple, batch_size: int,
                      repeats: int = 10) -> dict:
  """Images/s at `batch_size` and latency at batch 1, both after compilation."""
  apply = compilation.jit(functools.partial(model.apply, train=False))
  figures = {}
  for batch in (batch_size, 1):
    x = jnp.zeros((batch,) + image_shape, model.dtype)
    apply(variables, x).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      apply(variables, x).block_until_ready()
      times.append(time.perf_counter() - start)
    figures[batch] = float(np.median(times))
  return {'inference_images_per_s': batch_size / figures[batch_size],
          'inference_batch_size': batch_size,
          'inference_latency_ms_batch1': 1000 * figures[1]}
