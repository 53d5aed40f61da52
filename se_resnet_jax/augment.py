"""On-device CIFAR data augmentation in pure JAX, inside the jitted train step.

The augment config is static (close over it, e.g. with `functools.partial`): a switched-off
transform is gated by a Python `if` and never traced.
"""

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# ITU-R BT.601 luma weights, as torchvision's grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# RGB -> YIQ: a hue rotation turns the (I, Q) chroma plane and keeps luma Y (no HSV round trip).
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)

# fold_in tags: a transform's randomness does not depend on which others are on.
_CROP, _FLIP, _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(6)

_JITTER = ' (a jitter strength s, factor drawn from [max(0, 1-s), 1+s])'
_RANGES = {  # field: (largest allowed value, what the value means, what to do)
    'crop_padding': (None, '', 'Use 4 for standard CIFAR cropping, or set random_crop=False to '
                     'disable.'),
    'brightness': (None, _JITTER, 'Use 0 to disable it.'),
    'contrast': (None, _JITTER, 'Use 0 to disable it.'),
    'saturation': (None, _JITTER, 'Use 0 to disable it.'),
    'hue': (0.5, ' (max rotation as a fraction of a turn)', 'Use 0 to disable it.'),
    'cutout_size': (None, '', 'Use 0 to disable cutout (16 is the usual CIFAR-10 value).'),
}


def default_augment_config() -> ml_collections.ConfigDict:
  """Standard CIFAR augmentation (pad-4 random crop, horizontal flip); `config.augment`."""
  config = ml_collections.ConfigDict()
  config.enabled = True  # augment training images at all; False: scale to [0, 1] only
  config.random_crop = True  # random crop of the zero-padded image
  config.crop_padding = 4  # padding (pixels) of the crop; offsets uniform in [0, 2*pad]
  config.flip = True  # horizontal flip with probability 0.5
  config.brightness = 0.0  # brightness jitter s: factor ~ U[max(0, 1-s), 1+s]; 0 = off
  config.contrast = 0.0  # contrast jitter, same factor range: blend with mean grey; 0 = off
  config.saturation = 0.0  # saturation jitter, same range: blend with pixel grey; 0 = off
  config.hue = 0.0  # max hue rotation as a fraction of a turn, in [0, 0.5]; 0 = off
  config.cutout_size = 0  # side of the cutout square in pixels; 0 = off
  return config


class AugmentConfigError(ValueError):
  """A malformed augment config: `fields` at fault, `reason` ('unknown_keys', 'missing_keys' or
  'range'), `value` out of range and the `allowed` keys, so callers need not parse the message."""

  def __init__(self, message: str, fields: Sequence[str], reason: str, value: Any = None):
    super().__init__(message)
    self.fields, self.reason, self.value = tuple(fields), reason, value
    self.allowed = tuple(sorted(default_augment_config().keys()))


def validate_augment_config(config: Mapping[str, Any]) -> None:
  """Raises AugmentConfigError (at trace time) on unknown or missing keys or values out of range."""
  allowed = set(default_augment_config().keys())
  unknown = sorted(set(config.keys()) - allowed)
  if unknown:
    hint = ' (did you pass the whole experiment config? pass config.augment)'
    raise AugmentConfigError(
        f'Unknown augment config key(s) {unknown}{hint if "augment" in unknown else ""}. Remove '
        f'or rename them; allowed keys are: {sorted(allowed)}.', unknown, 'unknown_keys')
  missing = sorted(allowed - set(config.keys()))
  if missing:
    raise AugmentConfigError(
        f'Augment config is missing key(s) {missing}. Start from default_augment_config() and '
        f'override fields; allowed keys are: {sorted(allowed)}.', missing, 'missing_keys')
  for name, (high, meaning, advice) in _RANGES.items():
    value = config[name]
    if value < 0 or (high is not None and value > high):
      rule = '>= 0' if high is None else f'in [0, {high}]'
      raise AugmentConfigError(f'augment.{name} must be {rule}{meaning}, got {value}. {advice}',
                               [name], 'range', value)


def _factor(rng: jax.Array, strength: float) -> jax.Array:
  """Scalar jitter factor ~ U[max(0, 1-s), 1+s], as in torchvision ColorJitter."""
  return jax.random.uniform(rng, (), jnp.float32, max(0.0, 1.0 - strength), 1.0 + strength)


def _grey(image: jax.Array) -> jax.Array:
  """Per-pixel luma, shape (H, W, 1)."""
  return jnp.sum(image * _LUMA, axis=-1, keepdims=True)


def _hue_matrix(theta: jax.Array) -> jax.Array:
  """3x3 RGB -> RGB matrix that rotates chroma by `theta` radians in YIQ space."""
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  rot = jnp.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], jnp.float32)
  return jnp.asarray(_YIQ_TO_RGB, jnp.float32) @ rot @ jnp.asarray(_RGB_TO_YIQ, jnp.float32)


def _augment_one(rng: jax.Array, image: jax.Array, config: Mapping[str, Any]) -> jax.Array:
  """Augments one uint8 (H, W, C) image -> float32 in [0, 1]."""
  height, width, channels = image.shape

  pad = config['crop_padding']  # geometric transforms first, on uint8 (cheaper to move)
  if config['random_crop'] and pad > 0:
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(jax.random.fold_in(rng, _CROP), (2,), 0, 2 * pad + 1)
    image = jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), (height, width, channels))
  if config['flip']:
    do_flip = jax.random.bernoulli(jax.random.fold_in(rng, _FLIP))
    image = jnp.where(do_flip, image[:, ::-1, :], image)

  image = image.astype(jnp.float32) / 255.0

  # Colour jitter as torchvision's ColorJitter, clipping after each op as it does.
  if config['brightness'] > 0:
    factor = _factor(jax.random.fold_in(rng, _BRIGHTNESS), config['brightness'])
    image = jnp.clip(image * factor, 0.0, 1.0)
  if config['contrast'] > 0:
    factor = _factor(jax.random.fold_in(rng, _CONTRAST), config['contrast'])
    mean_grey = jnp.mean(_grey(image))
    image = jnp.clip(factor * image + (1.0 - factor) * mean_grey, 0.0, 1.0)
  if config['saturation'] > 0:
    factor = _factor(jax.random.fold_in(rng, _SATURATION), config['saturation'])
    image = jnp.clip(factor * image + (1.0 - factor) * _grey(image), 0.0, 1.0)
  if config['hue'] > 0:
    turns = jax.random.uniform(jax.random.fold_in(rng, _HUE), (), jnp.float32,
                               minval=-config['hue'], maxval=config['hue'])
    image = jnp.clip(image @ _hue_matrix(2.0 * jnp.pi * turns).T, 0.0, 1.0)
  return image


def augment_images(rng: jax.Array, images: jax.Array,
                   config: ml_collections.ConfigDict) -> jax.Array:
  """Augments a uint8 (N, H, W, C) batch to float32 in [0, 1], each example with its own key."""
  validate_augment_config(config)
  if images.ndim != 4:
    raise ValueError(f'images must be (N, H, W, C), got shape {images.shape}.')
  on = [config['random_crop'] and config['crop_padding'] > 0, config['flip']]
  on += [config[name] > 0 for name in ('brightness', 'contrast', 'saturation', 'hue')]
  if not config['enabled'] or not any(on):  # nothing random to trace
    return jnp.asarray(images).astype(jnp.float32) / 255.0
  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(lambda k, x: _augment_one(k, x, config))(keys, images)


def normalize(images: jax.Array, mean: Any, std: Any) -> jax.Array:
  """Per-channel standardisation (x - mean) / std of float images in [0, 1]; `mean` and `std`
  may be traced (the train step takes them as an argument)."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  if mean.shape != (images.shape[-1],) or std.shape != (images.shape[-1],):
    raise ValueError(f'mean and std need one value per channel ({images.shape[-1]}), got shapes '
                     f'{mean.shape} and {std.shape}.')
  return (jnp.asarray(images) - mean) / std


def cutout(rng: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """Zeroes one size x size square per example (DeVries & Taylor, 2017), centred anywhere (so
  clipped at the borders); after normalisation, so zero is the dataset mean. size 0: unchanged."""
  if size < 0:
    raise ValueError(f'cutout size must be >= 0, got {size}. Use 0 to disable.')
  if size == 0:
    return images
  n, height, width, _ = images.shape
  rng_y, rng_x = jax.random.split(rng)
  top = jax.random.randint(rng_y, (n, 1, 1, 1), 0, height) - size // 2
  left = jax.random.randint(rng_x, (n, 1, 1, 1), 0, width) - size // 2
  rows = jnp.arange(height).reshape(1, height, 1, 1)
  cols = jnp.arange(width).reshape(1, 1, width, 1)
  inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
  return jnp.where(inside, jnp.zeros((), images.dtype), images)


def preprocess_for_train(rng: jax.Array, images_uint8: jax.Array,
                         config: ml_collections.ConfigDict, mean: Sequence[float],
                         std: Sequence[float], dtype: Any = jnp.float32) -> jax.Array:
  """crop -> flip -> colour jitter -> normalize -> cutout -> cast to `dtype` (maths in float32)."""
  rng_augment, rng_cutout = jax.random.split(rng)
  images = augment_images(rng_augment, images_uint8, config)
  images = normalize(images, mean, std)
  if config['enabled'] and config['cutout_size'] > 0:
    images = cutout(rng_cutout, images, config['cutout_size'])
  return images.astype(dtype)


def preprocess_for_eval(images_uint8: jax.Array, mean: Sequence[float],
                        std: Sequence[float], dtype: Any = jnp.float32) -> jax.Array:
  """Deterministic eval pipeline: /255 -> normalize -> cast to `dtype`."""
  images = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
  return normalize(images, mean, std).astype(dtype)
