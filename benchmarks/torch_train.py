"""The library's training recipe in PyTorch: a twin that tells a library defect from a data effect.

  python benchmarks/torch_train.py --config=configs/cifar10.py --config.num_epochs=30 \
      --config.npz_path=data/cifar10.npz --out_dir=runs/torch_twin [--time_budget_s=150]

It reads the same ml_collections config as `se_resnet_jax.main` (same file, same `--config.x=...`
overrides, same validation) and reproduces the run with nothing but the framework changed:
- data: `input_pipeline.load_dataset`, so the same train/validation/test split and normalisation
  statistics; the uint8 training set lives on the device and each step draws its batch from a
  per-epoch permutation, the remainder dropped, as in the library;
- augmentation on the device, batched: the library's transforms in its order (pad-and-crop, flip,
  brightness, contrast, saturation, hue, normalise, cutout) with the same distributions; given the
  same random draws the output equals `augment.preprocess_for_train` (tests/test_torch_train.py);
- the network from `se_resnet_jax.torch_models` (same architecture and width), NCHW, channels-last,
  its first weights drawn as `model.kernel_init` names (the library's distributions) and its
  residual BatchNorm scales as `model.zero_init_residual` says;
- SGD with (Nesterov) momentum and L2 weight decay on conv/linear weights only
  (`weight_decay_mask='kernels'`) or on every parameter ('all'), its learning rate set before every
  step from the library's own optax schedule evaluated at that step;
- label smoothing, dropout, EMA of the weights and BatchNorm statistics (as in the library),
  bf16 autocast for `half_precision`, flip test-time augmentation for `tta_flip`;
- validation after every `eval_every_epochs`, the best-validation weights evaluated once on the test
  split at the end.

What it does not share with the library is the random stream (PyTorch draws its own numbers), so
two runs agree within seed noise, not bit for bit. One JSON line per epoch goes to stdout (and to
`epochs.jsonl`), the final figures to `result.json` in --out_dir. A --time_budget_s stops training
between epochs when the next one would not fit and still evaluates and reports what it trained.
"""

import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

if __package__ in (None, ''):  # run as a script: make `se_resnet_jax` importable from the tree
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  # OpenMP threads that spin while waiting lose 10x and more of their speed on a CPU shared with
  # other jobs (measured: a width-4 forward pass 1.5 s instead of 0.13 s); read when torch loads.
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from absl import app, flags  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.torch_step import make_optimizer  # noqa: E402
from se_resnet_jax import cli, files, input_pipeline, steps, torch_models  # noqa: E402
from se_resnet_jax import config as config_lib  # noqa: E402
from se_resnet_jax.config import validate_config  # noqa: E402
from se_resnet_jax.errors import ConfigError, DivergedError  # noqa: E402
from se_resnet_jax.plan import plan_run  # noqa: E402

# The same constants as se_resnet_jax.augment (BT.601 luma, RGB <-> YIQ for the hue rotation).
_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclasses.dataclass
class AugmentDraws:
  """One batch's random augmentation parameters; None where the transform is off."""
  crop: Optional[torch.Tensor] = None  # (N, 2) int: top-left offsets into the padded image
  flip: Optional[torch.Tensor] = None  # (N,) bool
  brightness: Optional[torch.Tensor] = None  # (N,) factors
  contrast: Optional[torch.Tensor] = None
  saturation: Optional[torch.Tensor] = None
  hue: Optional[torch.Tensor] = None  # (N,) rotation in turns
  cutout: Optional[torch.Tensor] = None  # (N, 2) int: square centre (row, column)


def _geometry_or_colour(aug: ml_collections.ConfigDict) -> bool:
  """Whether augment_images transforms at all (else it only scales to [0, 1])."""
  return bool((aug.random_crop and aug.crop_padding > 0) or aug.flip or aug.brightness > 0
              or aug.contrast > 0 or aug.saturation > 0 or aug.hue > 0)


def draw_augmentation(aug: ml_collections.ConfigDict, n: int, height: int, width: int,
                      generator: torch.Generator, device: torch.device) -> AugmentDraws:
  """The random parameters of one batch, with the library's distributions."""
  draws = AugmentDraws()
  if not aug.enabled:
    return draws

  def factor(strength):
    low = max(0.0, 1.0 - strength)
    return low + (1.0 + strength - low) * torch.rand(n, generator=generator, device=device)

  if _geometry_or_colour(aug):
    if aug.random_crop and aug.crop_padding > 0:
      draws.crop = torch.randint(0, 2 * aug.crop_padding + 1, (n, 2), generator=generator,
                                 device=device)
    if aug.flip:
      draws.flip = torch.rand(n, generator=generator, device=device) < 0.5
    for name in ('brightness', 'contrast', 'saturation'):
      if aug[name] > 0:
        setattr(draws, name, factor(aug[name]))
    if aug.hue > 0:
      draws.hue = (2 * torch.rand(n, generator=generator, device=device) - 1) * aug.hue
  if aug.cutout_size > 0:
    draws.cutout = torch.stack([
        torch.randint(0, height, (n,), generator=generator, device=device),
        torch.randint(0, width, (n,), generator=generator, device=device)], axis=1)
  return draws


def _grey(x: torch.Tensor) -> torch.Tensor:
  if x.shape[-1] == 1:
    return x
  return (x * x.new_tensor(_LUMA)).sum(-1, keepdim=True)


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
  """(N, 3, 3) RGB -> RGB matrices rotating chroma by `turns` in YIQ space (as the library)."""
  theta = 2 * math.pi * turns
  cos, sin = torch.cos(theta), torch.sin(theta)
  one, zero = torch.ones_like(cos), torch.zeros_like(cos)
  rot = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1),
                     torch.stack([zero, sin, cos], -1)], -2)
  to_yiq = turns.new_tensor(_RGB_TO_YIQ)
  return turns.new_tensor(np.linalg.inv(_RGB_TO_YIQ)) @ rot @ to_yiq


def augment_batch(images: torch.Tensor, draws: AugmentDraws, aug: ml_collections.ConfigDict,
                  mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
  """uint8 (N, H, W, C) -> float32 (N, H, W, C): crop, flip, colour, normalise, cutout.

  The order and the clipping after each colour transform are `se_resnet_jax.augment`'s.
  """
  n, height, width, _ = images.shape
  x = images
  if draws.crop is not None:
    pad = aug.crop_padding
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))
    rows = draws.crop[:, :1] + torch.arange(height, device=x.device)
    cols = draws.crop[:, 1:] + torch.arange(width, device=x.device)
    x = padded[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if draws.flip is not None:
    x = torch.where(draws.flip[:, None, None, None], x.flip(2), x)
  x = x.float() / 255.0
  per_image = lambda v: v[:, None, None, None]
  if draws.brightness is not None:
    x = (x * per_image(draws.brightness)).clamp(0.0, 1.0)
  if draws.contrast is not None:
    f = per_image(draws.contrast)
    x = (f * x + (1 - f) * _grey(x).mean((1, 2, 3), keepdim=True)).clamp(0.0, 1.0)
  if draws.saturation is not None:
    f = per_image(draws.saturation)
    x = (f * x + (1 - f) * _grey(x)).clamp(0.0, 1.0)
  if draws.hue is not None:
    x = torch.einsum('nhwc,ndc->nhwd', x, _hue_matrices(draws.hue)).clamp(0.0, 1.0)
  x = (x - x.new_tensor(mean)) / x.new_tensor(std)
  if draws.cutout is not None:
    size = aug.cutout_size
    top = draws.cutout[:, 0, None] - size // 2
    left = draws.cutout[:, 1, None] - size // 2
    rows = torch.arange(height, device=x.device)[None]
    cols = torch.arange(width, device=x.device)[None]
    inside_rows = (rows >= top) & (rows < top + size)
    inside_cols = (cols >= left) & (cols < left + size)
    x = x.masked_fill((inside_rows[:, :, None] & inside_cols[:, None, :])[..., None], 0.0)
  return x


def to_model_input(x_nhwc: torch.Tensor, channels_last: bool) -> torch.Tensor:
  """NHWC -> the model's NCHW; the permuted view already has channels-last strides."""
  x = x_nhwc.permute(0, 3, 1, 2)
  return x if channels_last else x.contiguous()


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                kernel_init: Optional[str] = None) -> nn.Module:
  """The config's network in PyTorch, with the arguments the library's build_model gives Flax
  (its first weights as `kernel_init` says, by default the config's `model.kernel_init`)."""
  options = config_lib.model_options(config, num_classes)
  options['kernel_init'] = kernel_init or config.model.kernel_init
  return torch_models.create_model(config.model.name, **options)


# 'config': the config's model.kernel_init, as the library draws it; 'torch' and 'flax' force
# PyTorch's default ('torch_default') or Flax's ('lecun_normal') whatever the config says.
INITIALISATIONS = ('config', 'torch', 'flax')
_FORCED_INIT = {'torch': 'torch_default', 'flax': 'lecun_normal'}


def flax_initialisation(model: nn.Module) -> None:
  """Re-draws conv and linear weights as Flax does (LeCun normal: truncated to two standard
  deviations, variance 1/fan_in; biases zero), in place of PyTorch's default (uniform, variance
  1/(3 fan_in)). BatchNorm keeps scale 1 (0 where the model zeroes it) and shift 0 in both."""
  torch_models.initialise(model, 'lecun_normal')


def learning_rates(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   num_steps: int) -> np.ndarray:
  """The library's schedule at steps 0..num_steps, evaluated by optax on the CPU.

  optax applies schedule(count) to the update of step `count` (0 first), so entry i is the learning
  rate of the (i+1)-th update. Evaluated on the CPU so that JAX never takes GPU memory here.
  """
  import jax

  schedule = steps.create_learning_rate_schedule(config, steps_per_epoch)
  with jax.default_device(jax.devices('cpu')[0]):
    return np.asarray(jax.jit(jax.vmap(schedule))(np.arange(num_steps + 1)), np.float64)


def _averaged(model: nn.Module) -> list:
  """What the EMA averages: the parameters, then the floating-point buffers (BatchNorm running
  means and variances; not the integer batch counters)."""
  return ([p.detach() for p in model.parameters()]
          + [b for b in model.buffers() if b.is_floating_point()])


class WeightEMA:
  """Exponential moving average of the parameters and the BatchNorm statistics, as the library
  (and timm's ModelEmaV2 with its buffers): it starts at the initial values and moves by
  (1 - decay) toward the values after each step. `params` holds the parameters' averages,
  `buffers` the statistics'."""

  def __init__(self, model: nn.Module, decay: float):
    self.decay = decay
    self.params = [p.detach().clone() for p in model.parameters()]
    self.buffers = [b.clone() for b in model.buffers() if b.is_floating_point()]

  @torch.no_grad()
  def update(self, model: nn.Module) -> None:
    torch._foreach_lerp_(self.params + self.buffers, _averaged(model), 1.0 - self.decay)

  @torch.no_grad()
  def swap(self, model: nn.Module) -> None:
    """Exchanges the model's weights and statistics and the averages (call twice to restore)."""
    for p, e in zip(_averaged(model), self.params + self.buffers):
      tmp = p.clone()
      p.copy_(e)
      e.copy_(tmp)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             mean: Sequence[float], std: Sequence[float], *, tta_flip: bool, bf16: bool,
             channels_last: bool) -> dict:
  """Accuracy and mean (unsmoothed) cross-entropy, as the library's eval step computes them."""
  model.eval()
  mean_t, std_t = torch.tensor(mean, device=images.device), torch.tensor(std, device=images.device)
  loss_sum, correct = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
  for i in range(0, len(images), batch_size):
    x = (images[i:i + batch_size].float() / 255.0 - mean_t) / std_t
    y = labels[i:i + batch_size]
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
      logits = model(to_model_input(x, channels_last)).float()
      if tta_flip:  # average the two views' probabilities, in log space
        flipped = model(to_model_input(x.flip(2), channels_last)).float()
        logits = torch.logaddexp(logits.log_softmax(-1), flipped.log_softmax(-1)) - math.log(2)
    loss_sum += F.cross_entropy(logits, y, reduction='sum')
    correct += (logits.argmax(-1) == y).sum()
  return {'loss': float(loss_sum) / len(images), 'accuracy': float(correct) / len(images)}


def _device_info(device: torch.device) -> dict:
  if device.type == 'cuda':
    return {'platform': 'gpu', 'kind': torch.cuda.get_device_name(device), 'count': 1}
  return {'platform': device.type, 'kind': device.type, 'count': 1}


def _synchronize(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def train_and_evaluate(config: ml_collections.ConfigDict, out_dir: Optional[str] = None, *,
                       time_budget_s: Optional[float] = None, compile_model: bool = False,
                       channels_last: Optional[bool] = None, device: Optional[str] = None,
                       init: str = 'config', log: Callable[[str], None] = print) -> dict:
  """Trains `config`'s recipe in PyTorch; returns (and writes to out_dir) the result dict.

  channels_last defaults to True on CUDA only: on the CPU it gains little, and torch 2.13's CPU
  convolution backward in channels-last crashes (segfault) for layers only 4 channels wide.
  init 'config' draws the first weights as the config's `model.kernel_init` names, from the
  library's distribution; 'torch' forces PyTorch's defaults and 'flax' Flax's LeCun normal.
  """
  start = time.perf_counter()
  validate_config(config)
  if init not in INITIALISATIONS:
    raise ConfigError(f'init must be one of {", ".join(INITIALISATIONS)}, got {init!r}.')
  device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  if channels_last is None:
    channels_last = device.type == 'cuda'
  data = input_pipeline.load_dataset(config)
  plan = plan_run(config, len(data.train))  # the library's step counts, as one device trains
  steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
  lrs = learning_rates(config, steps_per_epoch, total_steps)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    epochs_file = open(os.path.join(out_dir, 'epochs.jsonl'), 'w')  # noqa: SIM115
  else:
    epochs_file = None

  torch.manual_seed(config.seed)
  kernel_init = _FORCED_INIT.get(init, config.model.kernel_init)
  model = build_model(config, data.num_classes, kernel_init).to(device)
  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  optimizer = make_optimizer(config, model)  # its rate is set before every step
  ema = WeightEMA(model, config.ema_decay) if config.ema_decay else None
  forward = torch.compile(model) if compile_model else model
  generator = torch.Generator(device=device)
  generator.manual_seed(config.seed)

  on_device = lambda split: (torch.from_numpy(split.images).to(device),
                             torch.from_numpy(split.labels.astype(np.int64)).to(device))
  train_x, train_y = on_device(data.train)
  val = on_device(data.validation) if data.validation is not None else None
  bf16 = bool(config.half_precision)
  aug = config.augment
  height, width = data.train.images.shape[1:3]
  eval_kwargs = dict(batch_size=config.eval_batch_size, mean=data.mean, std=data.std,
                     tta_flip=config.tta_flip, bf16=bf16, channels_last=channels_last)

  def with_eval_weights(fn):
    if ema is not None:
      ema.swap(model)
    try:
      return fn()
    finally:
      if ema is not None:
        ema.swap(model)

  history, best, best_state = [], None, None
  step, stopped_by_budget = 0, False
  loop_start = time.perf_counter()
  while step < total_steps:
    epoch = step // steps_per_epoch
    epoch_start, first_step = time.perf_counter(), step
    model.train()
    perm = torch.randperm(len(train_y), generator=generator, device=device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    while True:
      i = step % steps_per_epoch
      idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
      draws = draw_augmentation(aug, len(idx), height, width, generator, device)
      x = to_model_input(augment_batch(train_x[idx], draws, aug, data.mean, data.std),
                         channels_last)
      y = train_y[idx]
      for group in optimizer.param_groups:
        group['lr'] = float(lrs[step])
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = forward(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      if ema is not None:
        ema.update(model)
      loss_sum += loss.detach() * len(y)
      correct += (logits.detach().argmax(-1) == y).sum()
      step += 1
      if step % steps_per_epoch == 0 or step == total_steps:
        break
    _synchronize(device)
    epoch_time = time.perf_counter() - epoch_start
    seen = (step - first_step) * config.batch_size
    row = {'epoch': epoch + 1, 'step': step, 'train_loss': float(loss_sum) / seen,
           'train_accuracy': float(correct) / seen, 'learning_rate': float(lrs[step]),
           'epoch_time_s': epoch_time, 'train_images_per_s': seen / epoch_time}
    if not math.isfinite(row['train_loss']):
      raise DivergedError(f'Training loss became {row["train_loss"]} by step {step}: lower '
                          '--config.learning_rate or add warmup.')
    is_last = step == total_steps
    if val is not None and ((epoch + 1) % config.eval_every_epochs == 0 or is_last):
      metrics = with_eval_weights(lambda: evaluate(model, *val, **eval_kwargs))
      row.update(val_loss=metrics['loss'], val_accuracy=metrics['accuracy'])
      if best is None or metrics['accuracy'] > best['val_accuracy']:
        best = {'epoch': epoch + 1, 'val_accuracy': metrics['accuracy']}
        best_state = (copy.deepcopy(model.state_dict()),
                      [[e.clone() for e in ema.params], [e.clone() for e in ema.buffers]]
                      if ema is not None else None)
    row['elapsed_s'] = time.perf_counter() - start
    history.append(row)
    log(json.dumps(row))
    if epochs_file:
      epochs_file.write(json.dumps(row) + '\n')
      epochs_file.flush()
    if time_budget_s is not None and not is_last:
      per_epoch = (time.perf_counter() - loop_start) / len(history)
      if time.perf_counter() - start + per_epoch > time_budget_s:
        stopped_by_budget = True
        log(json.dumps({'stopped_by_time_budget': True, 'epochs_completed': epoch + 1,
                        'time_budget_s': time_budget_s}))
        break
  if epochs_file:
    epochs_file.close()

  if best_state is not None:
    model.load_state_dict(best_state[0])
    if ema is not None:
      ema.params, ema.buffers = best_state[1]
  result = {'framework': 'pytorch', 'config': config.to_dict(), 'dataset': data.name,
            'device': _device_info(device), 'epochs_planned': config.num_epochs,
            'epochs_completed': history[-1]['epoch'] if history else 0,
            'best_epoch': best['epoch'] if best else None, 'step': step,
            'stopped_by_time_budget': stopped_by_budget, 'torch_compile': compile_model,
            'channels_last': channels_last, 'init': init, 'kernel_init': kernel_init,
            'torch': torch.__version__}
  splits = {'validation': val}
  if config.evaluate_test:
    splits['test'] = on_device(data.test)
  for name, split in splits.items():
    if split is not None:
      result[name] = with_eval_weights(lambda split=split: evaluate(model, *split, **eval_kwargs))
  timed = history[1:] or history  # the first epoch includes warm-up (and compilation)
  result['timing'] = {
      'device_kind': result['device']['kind'],
      'first_epoch_s': history[0]['epoch_time_s'] if history else None,
      'train_time_per_epoch_s': float(np.mean([r['epoch_time_s'] for r in timed])),
      'train_images_per_s': float(np.mean([r['train_images_per_s'] for r in timed])),
      'train_time_s': float(sum(r['epoch_time_s'] for r in history)),
      'wall_s': time.perf_counter() - start}
  result['history'] = history
  if out_dir:
    files.write_json_atomic(os.path.join(out_dir, 'result.json'), result)
  return result


def define_flags() -> None:
  """The command's flags; defined only when run, so importing this file defines none."""
  from ml_collections import config_flags

  flags.DEFINE_string('out_dir', None, 'Where result.json and epochs.jsonl go (optional).')
  flags.DEFINE_float('time_budget_s', None, 'Stop training between epochs when the next one '
                     'would end after this many seconds from the start; still evaluates.')
  flags.DEFINE_bool('torch_compile', False, 'torch.compile the model (its compilation counts in '
                    'the first epoch).')
  flags.DEFINE_bool('channels_last', None, 'Channels-last memory format for the convolutions '
                    '(default: on CUDA only).')
  flags.DEFINE_string('device', None, 'torch device (default: cuda if available, else cpu).')
  flags.DEFINE_enum('init', 'config', INITIALISATIONS, 'Initial weights: as the config\'s '
                    'model.kernel_init names (the library\'s distribution), or forced to '
                    'PyTorch\'s defaults (torch) or Flax\'s LeCun normal (flax).')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file (as for '
                                  'se_resnet_jax.main).', lock_config=True)
  flags.mark_flags_as_required(['config'])


def main(argv):
  FLAGS = flags.FLAGS

  def command():
    import jax
    jax.config.update('jax_platforms', 'cpu')  # only the schedule runs in JAX: leave the GPU free
    result = train_and_evaluate(FLAGS.config, FLAGS.out_dir, time_budget_s=FLAGS.time_budget_s,
                                compile_model=FLAGS.torch_compile,
                                channels_last=FLAGS.channels_last, device=FLAGS.device,
                                init=FLAGS.init)
    summary = {k: result[k] for k in ('epochs_completed', 'best_epoch', 'stopped_by_time_budget')}
    for split in ('validation', 'test'):
      if split in result:
        summary[f'{split}_accuracy'] = result[split]['accuracy']
        summary[f'{split}_loss'] = result[split]['loss']
    summary.update(train_images_per_s=result['timing']['train_images_per_s'],
                   wall_s=result['timing']['wall_s'])
    print(json.dumps({'final': summary}), flush=True)

  cli.run(argv, command)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
