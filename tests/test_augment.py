"""Behavioural tests for se_resnet_jax.augment (small images, CPU-fast)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se_resnet_jax import augment

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


def _config(**overrides):
  """Augment config with every transform off, then `overrides` applied."""
  config = augment.default_augment_config()
  config.random_crop = False
  config.flip = False
  for key, value in overrides.items():
    config[key] = value
  return config


def _images(n, size=8, low=1, high=256, seed=0):
  """Random (asymmetric) uint8 batch; low=1 keeps zero-fill distinguishable."""
  rs = np.random.RandomState(seed)
  return rs.randint(low, high, size=(n, size, size, 3)).astype(np.uint8)


def _to_uint8(images):
  """Exact inverse of /255 for un-jittered outputs.

  XLA may compute x / 255 as x * (1 / 255), which is 1 ulp off numpy's
  division, so exact pixel comparisons are done back in uint8.
  """
  return np.round(np.asarray(images, np.float32) * 255.0).astype(np.uint8)


def _assert_is_unit_scaled(out, images):
  """`out` is images / 255 up to float rounding (pixels are 1/255 apart)."""
  out = np.asarray(out)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, images.astype(np.float32) / 255.0, rtol=1e-6, atol=0)
  np.testing.assert_array_equal(_to_uint8(out), images)


def _shift(image, dy, dx):
  """out[y, x] = image[y + dy, x + dx], zero outside."""
  h, w, _ = image.shape
  out = np.zeros_like(image)
  ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
  yi, xi = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
  out[ys, xs] = image[yi, xi]
  return out


def test_default_config_fields():
  config = augment.default_augment_config()
  assert dict(config) == dict(
      enabled=True, random_crop=True, crop_padding=4, flip=True, brightness=0.0,
      contrast=0.0, saturation=0.0, hue=0.0, cutout_size=0)
  augment.validate_augment_config(config)


def test_flip_only_gives_input_or_mirror_and_both_occur():
  images = np.repeat(_images(1), 32, axis=0)
  out = augment.augment_images(jax.random.PRNGKey(0), images, _config(flip=True))
  np.testing.assert_allclose(  # Still unit-scaled, no colour change.
      np.sort(np.asarray(out), axis=None), np.sort(images / 255.0, axis=None), rtol=1e-6)
  out, x = _to_uint8(out), images[0]
  flipped = [np.array_equal(o, x[:, ::-1]) for o in out]
  same = [np.array_equal(o, x) for o in out]
  assert all(f or s for f, s in zip(flipped, same))
  assert any(flipped) and any(same)


def test_crop_only_is_zero_filled_shift():
  pad = 2
  images = _images(16)
  out = augment.augment_images(
      jax.random.PRNGKey(1), images, _config(random_crop=True, crop_padding=pad))
  out = _to_uint8(out)
  shifts = []
  for image, o in zip(images, out):
    matches = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
               if np.array_equal(o, _shift(image, dy, dx))]
    assert len(matches) == 1, matches
    shifts.append(matches[0])
  assert any(s != (0, 0) for s in shifts)
  assert len(set(shifts)) > 1


@pytest.mark.parametrize('field,value', [
    ('brightness', 0.5), ('contrast', 0.5), ('saturation', 0.5), ('hue', 0.2)])
def test_each_jitter_changes_images_and_stays_in_unit_range(field, value):
  images = _images(4)
  out = np.asarray(augment.augment_images(jax.random.PRNGKey(2), images, _config(
      **{field: value})))
  assert out.dtype == np.float32 and out.shape == images.shape
  assert out.min() >= 0.0 and out.max() <= 1.0
  diff = np.abs(out - images / 255.0).reshape(4, -1).max(axis=1)
  assert np.all(diff > 1e-3)


def test_all_jitter_together_in_unit_range():
  config = _config(random_crop=True, flip=True, brightness=0.8, contrast=0.8,
                   saturation=0.8, hue=0.5)
  out = np.asarray(augment.augment_images(jax.random.PRNGKey(3), _images(8, low=0), config))
  assert out.min() >= 0.0 and out.max() <= 1.0


def test_zero_strength_jitter_is_identity():
  images = _images(4, low=0)
  out = augment.augment_images(jax.random.PRNGKey(4), images, _config())
  assert isinstance(out, jax.Array)
  _assert_is_unit_scaled(out, images)


def test_brightness_scales_each_example_by_one_factor():
  images = _images(8, low=20, high=120)  # x * f stays < 1 for f <= 1.5.
  s = 0.5
  out = np.asarray(augment.augment_images(jax.random.PRNGKey(5), images, _config(brightness=s)))
  ratio = out / (images / 255.0)
  factors = ratio.reshape(8, -1)
  np.testing.assert_allclose(factors, np.broadcast_to(factors[:, :1], factors.shape), rtol=1e-5)
  assert np.all(factors >= 1 - s - 1e-6) and np.all(factors <= 1 + s + 1e-6)
  assert len(np.unique(np.round(factors[:, 0], 5))) == 8


def test_saturation_hue_leave_grey_and_contrast_leaves_flat_images():
  rs = np.random.RandomState(6)
  grey = np.repeat(rs.randint(0, 256, size=(4, 8, 8, 1)), 3, axis=-1).astype(np.uint8)
  for field in ('saturation', 'hue'):
    out = augment.augment_images(jax.random.PRNGKey(6), grey, _config(**{field: 0.5}))
    np.testing.assert_allclose(np.asarray(out), grey / 255.0, atol=1e-3)
  flat = np.full((4, 8, 8, 3), 100, np.uint8)
  out = augment.augment_images(jax.random.PRNGKey(6), flat, _config(contrast=0.9))
  np.testing.assert_allclose(np.asarray(out), flat / 255.0, atol=1e-5)


def test_hue_preserves_luma_of_low_saturation_image():
  rs = np.random.RandomState(7)
  images = (128 + rs.randint(-20, 20, size=(4, 8, 8, 3))).astype(np.uint8)
  out = np.asarray(augment.augment_images(jax.random.PRNGKey(7), images, _config(hue=0.5)))
  luma = np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(out @ luma, (images / 255.0) @ luma, atol=1e-4)
  assert np.abs(out - images / 255.0).max() > 1e-2


def test_disabled_is_identity_and_eval_matches_normalize():
  images = _images(4, low=0)
  config = augment.default_augment_config()
  config.update(dict(enabled=False, brightness=0.5, hue=0.3, cutout_size=4))
  x = images.astype(np.float32) / 255.0
  out = augment.augment_images(jax.random.PRNGKey(8), images, config)
  assert isinstance(out, jax.Array)
  _assert_is_unit_scaled(out, images)
  train = augment.preprocess_for_train(jax.random.PRNGKey(8), images, config, MEAN, STD)
  ev = augment.preprocess_for_eval(images, MEAN, STD)
  expected = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
  np.testing.assert_allclose(np.asarray(ev), expected, rtol=1e-6, atol=1e-6)
  normalized = augment.normalize(x, MEAN, STD)
  assert isinstance(normalized, jax.Array)
  np.testing.assert_allclose(np.asarray(ev), np.asarray(normalized), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(train), np.asarray(ev), rtol=1e-6, atol=1e-6)


def test_rng_determinism_and_per_example_randomness():
  config = _config(random_crop=True, flip=True, brightness=0.4, contrast=0.4,
                   saturation=0.4, hue=0.1)
  images = np.repeat(_images(1), 6, axis=0)  # Identical inputs.
  a = np.asarray(augment.augment_images(jax.random.PRNGKey(9), images, config))
  b = np.asarray(augment.augment_images(jax.random.PRNGKey(9), images, config))
  c = np.asarray(augment.augment_images(jax.random.PRNGKey(10), images, config))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for i in range(6):
    for j in range(i + 1, 6):
      assert not np.array_equal(a[i], a[j]), (i, j)


def test_new_style_typed_keys_work():
  out = augment.augment_images(jax.random.key(0), _images(2), augment.default_augment_config())
  assert out.shape == (2, 8, 8, 3)


def _check_cutout_square(out, size):
  """Zeros of each example form one size x size square, clipped at borders."""
  h, w = out.shape[1:3]
  full = 0
  for o in out:
    zero = np.all(o == 0, axis=-1)
    assert np.all((o == 0) == zero[..., None])  # All channels zeroed together.
    ys, xs = np.nonzero(zero)
    assert ys.size > 0
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    assert zero.sum() == (y1 - y0) * (x1 - x0)  # Solid rectangle.
    assert (y1 - y0 == size) or y0 == 0 or y1 == h
    assert (x1 - x0 == size) or x0 == 0 or x1 == w
    assert y1 - y0 <= size and x1 - x0 <= size
    full += zero.sum() == size * size
  assert full > 0


def test_cutout_zeroes_square_of_right_size():
  size = 5
  ones = jnp.ones((16, 12, 12, 3), jnp.float32)
  out = np.asarray(augment.cutout(jax.random.PRNGKey(11), ones, size))
  _check_cutout_square(out, size)
  np.testing.assert_array_equal(
      np.asarray(augment.cutout(jax.random.PRNGKey(11), ones, 0)), np.asarray(ones))


def test_cutout_in_train_pipeline_after_normalisation():
  images = np.full((8, 12, 12, 3), 255, np.uint8)
  config = _config(cutout_size=4)
  out = np.asarray(augment.preprocess_for_train(
      jax.random.PRNGKey(12), images, config, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
  assert set(np.unique(out).tolist()) == {0.0, 1.0}
  _check_cutout_square(out, 4)


def test_jit_and_dtypes():
  config = augment.default_augment_config()
  config.update(dict(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, cutout_size=4))
  images = jnp.asarray(_images(4, low=0))
  rng = jax.random.PRNGKey(13)
  train = jax.jit(functools.partial(
      augment.preprocess_for_train, config=config, mean=MEAN, std=STD))
  out = train(rng, images)
  assert out.dtype == jnp.float32 and out.shape == images.shape
  eager = augment.preprocess_for_train(rng, images, config, MEAN, STD)
  np.testing.assert_allclose(np.asarray(out), np.asarray(eager), atol=1e-5)
  aug = jax.jit(functools.partial(augment.augment_images, config=config))(rng, images)
  assert aug.dtype == jnp.float32
  bf16 = jax.jit(functools.partial(
      augment.preprocess_for_train, config=config, mean=MEAN, std=STD,
      dtype=jnp.bfloat16))(rng, images)
  assert bf16.dtype == jnp.bfloat16
  ev = jax.jit(functools.partial(
      augment.preprocess_for_eval, mean=MEAN, std=STD, dtype=jnp.bfloat16))(images)
  assert ev.dtype == jnp.bfloat16
  assert augment.preprocess_for_eval(images, MEAN, STD).dtype == jnp.float32


@pytest.mark.parametrize('field,value', [
    ('crop_padding', -1),
    ('brightness', -0.1),
    ('contrast', -0.1),
    ('saturation', -0.1),
    ('hue', -0.1),
    ('hue', 0.6),
    ('cutout_size', -1),
])
def test_validate_rejects_bad_values(field, value):
  config = augment.default_augment_config()
  config[field] = value
  with pytest.raises(augment.AugmentConfigError) as info:
    augment.validate_augment_config(config)
  assert (info.value.fields, info.value.reason, info.value.value) == ((field,), 'range', value)
  assert isinstance(info.value, ValueError)
  # Also caught at trace time by the public API.
  with pytest.raises(augment.AugmentConfigError) as info:
    augment.augment_images(jax.random.PRNGKey(0), _images(1), config)
  assert info.value.fields == (field,)


def test_validate_rejects_unknown_key_and_lists_allowed():
  allowed = tuple(sorted(augment.default_augment_config().keys()))
  config = augment.default_augment_config()
  config.rotation = 15
  with pytest.raises(augment.AugmentConfigError) as info:
    augment.validate_augment_config(config)
  assert (info.value.fields, info.value.reason) == (('rotation',), 'unknown_keys')
  assert info.value.allowed == allowed
  for key in allowed:  # the user is shown every key there is
    assert key in str(info.value)

  config = augment.default_augment_config()
  del config['hue'], config['flip']
  with pytest.raises(augment.AugmentConfigError) as info:
    augment.validate_augment_config(config)
  assert (info.value.fields, info.value.reason) == (('flip', 'hue'), 'missing_keys')


def test_cutout_rejects_negative_size():
  with pytest.raises(ValueError, match='cutout'):
    augment.cutout(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 3)), -2)


def _primitives(config):
  """Text of the traced jaxpr (nested jaxprs included) for `augment_images`."""
  images = jnp.zeros((2, 8, 8, 3), jnp.uint8)
  fn = functools.partial(augment.augment_images, config=config)
  return str(jax.make_jaxpr(fn)(jax.random.PRNGKey(0), images))


def test_switched_off_transforms_are_not_traced():
  off = _primitives(_config())
  assert 'random' not in off and 'pad' not in off and 'select_n' not in off
  flip_only = _primitives(_config(flip=True))
  assert 'rev' in flip_only
  for name in ('pad', 'gather', 'dynamic_slice', 'cos', 'dot_general', 'name=clip'):
    assert name not in flip_only, name
  assert 'name=clip' in _primitives(_config(brightness=0.1))
  assert 'cos' in _primitives(_config(hue=0.1))
  assert 'pad' in _primitives(_config(random_crop=True))
