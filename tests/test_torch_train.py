"""The PyTorch twin (benchmarks/torch_train.py) trains the library's recipe, piece by piece.

Its random numbers are PyTorch's own, so the pieces are compared where they are deterministic: the
augmentation given the library's own random draws, the optimizer given the same gradients, the
loss, and the weight average.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')

from benchmarks import torch_train  # noqa: E402
from se_resnet_jax import augment, steps  # noqa: E402
from se_resnet_jax.config import base_config  # noqa: E402


def library_draws(rng, aug, n, height, width) -> torch_train.AugmentDraws:
  """The random parameters `augment.preprocess_for_train(rng, ...)` draws, read out of JAX."""
  rng_augment, rng_cutout = jax.random.split(rng)
  keys = jax.random.split(rng_augment, n)
  tagged = lambda tag: jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)
  per_key = lambda fn, tag: torch.from_numpy(np.array(jax.vmap(fn)(tagged(tag))))
  pad = aug.crop_padding
  uniform = lambda lo, hi: lambda k: jax.random.uniform(k, (), jnp.float32, lo, hi)
  rng_y, rng_x = jax.random.split(rng_cutout)
  centre = [np.asarray(jax.random.randint(k, (n, 1, 1, 1), 0, size)).reshape(n)
            for k, size in ((rng_y, height), (rng_x, width))]
  return torch_train.AugmentDraws(
      crop=per_key(lambda k: jax.random.randint(k, (2,), 0, 2 * pad + 1), augment._CROP).long(),
      flip=per_key(jax.random.bernoulli, augment._FLIP),
      brightness=per_key(lambda k: augment._factor(k, aug.brightness), augment._BRIGHTNESS),
      contrast=per_key(lambda k: augment._factor(k, aug.contrast), augment._CONTRAST),
      saturation=per_key(lambda k: augment._factor(k, aug.saturation), augment._SATURATION),
      hue=per_key(uniform(-aug.hue, aug.hue), augment._HUE),
      cutout=torch.from_numpy(np.stack(centre, 1)).long())


def test_augmentation_equals_the_library_given_its_random_draws():
  aug = augment.default_augment_config()
  aug.update(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, cutout_size=8)
  n, mean, std = 16, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
  images = np.random.RandomState(0).randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
  rng = jax.random.key(3)
  expected = np.asarray(augment.preprocess_for_train(rng, images, aug, mean, std))
  draws = library_draws(rng, aug, n, 32, 32)
  assert 0 < int(draws.flip.sum()) < n and 0 < int((draws.crop != 4).sum())  # something moved
  got = torch_train.augment_batch(torch.from_numpy(images), draws, aug, mean, std).numpy()
  np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize('changes', [dict(enabled=False, cutout_size=8),
                                     dict(random_crop=False, flip=False, cutout_size=0)])
def test_switched_off_transforms_are_skipped_as_in_the_library(changes):
  aug = augment.default_augment_config()
  aug.update(**changes)
  images = np.random.RandomState(1).randint(0, 256, (4, 8, 8, 3)).astype(np.uint8)
  draws = torch_train.draw_augmentation(aug, 4, 8, 8, torch.Generator(), torch.device('cpu'))
  assert all(getattr(draws, f) is None for f in ('crop', 'flip', 'cutout'))
  expected = augment.preprocess_for_train(jax.random.key(0), images, aug, (0.5,) * 3, (0.2,) * 3)
  got = torch_train.augment_batch(torch.from_numpy(images), draws, aug, (0.5,) * 3, (0.2,) * 3)
  np.testing.assert_allclose(got.numpy(), np.asarray(expected), atol=1e-6)


def test_draws_follow_the_library_distributions():
  aug = augment.default_augment_config()
  aug.update(brightness=0.3, hue=0.05, cutout_size=8)
  draws = torch_train.draw_augmentation(aug, 20000, 32, 32, torch.Generator().manual_seed(0),
                                        torch.device('cpu'))
  assert set(draws.crop.unique().tolist()) == set(range(9))
  assert abs(draws.flip.float().mean() - 0.5) < 0.02
  assert 0.7 <= draws.brightness.min() and draws.brightness.max() <= 1.3
  assert abs(draws.brightness.mean() - 1.0) < 0.01
  assert -0.05 <= draws.hue.min() and draws.hue.max() <= 0.05
  assert draws.cutout.min() == 0 and draws.cutout.max() == 31


class _Params(torch.nn.Module):

  def __init__(self, kernel, bias):
    super().__init__()
    self.kernel = torch.nn.Parameter(torch.tensor(kernel))
    self.bias = torch.nn.Parameter(torch.tensor(bias))
    self.register_buffer('running_mean', torch.zeros(bias.shape))  # averaged by the EMA too
    self.register_buffer('count', torch.zeros((), dtype=torch.long))  # not averaged


@pytest.mark.parametrize('schedule,nesterov,mask', [('cosine', True, 'kernels'),
                                                    ('multistep', False, 'kernels'),
                                                    ('onecycle', True, 'kernels'),
                                                    ('cosine', True, 'all')])
def test_optimizer_and_schedule_equal_the_library_optax_chain(schedule, nesterov, mask):
  """Same gradients in, same weights out: decay on kernels only (or on all), momentum, per-step
  rate."""
  config = base_config()
  config.update(learning_rate=0.4, weight_decay=5e-3, schedule=schedule, nesterov=nesterov,
                warmup_epochs=1.0, num_epochs=4, lr_decay_epochs=(2, 3), weight_decay_mask=mask)
  steps_per_epoch, num_steps = 3, 12
  rs = np.random.RandomState(0)
  params = {'kernel': rs.normal(size=(6, 5)).astype(np.float32),
            'bias': rs.normal(size=(5,)).astype(np.float32)}
  grads = [{k: rs.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(num_steps)]

  tx = steps.create_optimizer(config,
                             steps.create_learning_rate_schedule(config, steps_per_epoch))
  jax_params, opt_state = params, tx.init(params)
  model = _Params(params['kernel'], params['bias'])
  optimizer = torch_train.make_optimizer(config, model)
  lrs = torch_train.learning_rates(config, steps_per_epoch, num_steps)
  assert lrs.max() > 0.3 and lrs[0] < 0.02  # the warm-up starts (near) zero, as in optax
  for step, g in enumerate(grads):
    updates, opt_state = tx.update(g, opt_state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)
    for group in optimizer.param_groups:
      group['lr'] = float(lrs[step])
    model.kernel.grad, model.bias.grad = torch.tensor(g['kernel']), torch.tensor(g['bias'])
    optimizer.step()
    for name in params:
      np.testing.assert_allclose(getattr(model, name).detach().numpy(), jax_params[name],
                                 rtol=1e-5, atol=1e-6, err_msg=f'{name} after step {step}')


def test_label_smoothed_loss_and_weight_average_equal_the_library():
  rs = np.random.RandomState(0)
  logits, labels = rs.normal(size=(8, 10)).astype(np.float32), rs.randint(0, 10, 8)
  expected = steps.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1).mean()
  got = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels).long(),
                                          label_smoothing=0.1)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)

  model = _Params(rs.normal(size=(3, 2)).astype(np.float32), np.zeros(2, np.float32))
  ema = torch_train.WeightEMA(model, 0.9)
  start = model.kernel.detach().numpy().copy()
  assert len(ema.buffers) == 1  # the statistics are averaged too; integer counters are not
  with torch.no_grad():
    model.kernel += 1.0
    model.running_mean += 2.0
  ema.update(model)
  expected = optax.incremental_update(model.kernel.detach().numpy(), start, 0.1)
  np.testing.assert_allclose(ema.params[0].numpy(), expected, rtol=1e-6)
  np.testing.assert_allclose(ema.buffers[0].numpy(), 0.2, rtol=1e-6)
  ema.swap(model)  # evaluation sees both averages
  np.testing.assert_allclose(model.running_mean.numpy(), 0.2, rtol=1e-6)
  np.testing.assert_allclose(model.kernel.detach().numpy(), expected, rtol=1e-6)
  ema.swap(model)
  np.testing.assert_allclose(model.running_mean.numpy(), 2.0, rtol=1e-6)


def test_a_short_run_reports_like_the_library_and_respects_its_time_budget(
    make_tiny_config, tmp_path):
  config = make_tiny_config(**{'model.num_filters': 4, 'ema_decay': 0.9, 'tta_flip': True,
                               'synthetic.num_train': 352, 'synthetic.num_test': 100,
                               'validation_size': 96})
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # spinning OpenMP threads crawl on a CPU shared with other tests
  try:
    result = torch_train.train_and_evaluate(config, str(tmp_path), time_budget_s=0.0,
                                            log=lambda line: None)
  finally:
    torch.set_num_threads(threads)
  assert result['stopped_by_time_budget'] and result['epochs_completed'] == 1
  assert result['best_epoch'] == 1 and len(result['history']) == 1
  for split in ('validation', 'test'):
    assert 0.0 <= result[split]['accuracy'] <= 1.0 and np.isfinite(result[split]['loss'])
  assert result['validation']['accuracy'] == result['history'][0]['val_accuracy']
  assert (tmp_path / 'result.json').exists() and (tmp_path / 'epochs.jsonl').exists()


def test_flax_initialisation_draws_weights_as_the_library_does():
  """LeCun normal (variance 1/fan_in, truncated at 2 sigma), zero biases: the Flax statistics."""
  import flax.linen as nn  # the library's convolutions keep Flax's default initialiser

  flax_kernel = np.asarray(nn.Conv(128, (3, 3), use_bias=False).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 128)))['params']['kernel'])
  config = base_config()
  config.model.update(num_filters=16, se_reduction=4, kernel_init='torch_default')
  torch.manual_seed(0)
  model = torch_train.build_model(config, 10)
  default_std = float(model.layer4[1].conv2.weight.detach().std())
  torch_train.flax_initialisation(model)
  weight = model.layer4[1].conv2.weight.detach().numpy()
  assert weight.shape == (128, 128, 3, 3) and flax_kernel.shape == (3, 3, 128, 128)
  np.testing.assert_allclose(weight.std(), flax_kernel.std(), rtol=0.02)
  np.testing.assert_allclose(weight.std(), (1 / (9 * 128)) ** 0.5, rtol=0.02)
  bound = 2 * (1 / (9 * 128)) ** 0.5 / 0.87962566
  assert np.abs(weight).max() <= bound + 1e-6 and np.abs(flax_kernel).max() <= bound + 1e-6
  assert abs(default_std / weight.std() - 3**-0.5) < 0.02  # PyTorch's default: a third the variance
  assert all(float(m.bias.abs().max()) == 0 for m in model.modules()
             if isinstance(m, torch.nn.Linear))
