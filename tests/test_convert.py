"""PyTorch <-> Flax weights (issue 11): converted weights compute the same function both ways.

Networks are a few channels wide, BatchNorm statistics and scales are randomised (a zero last-BN
scale, as both libraries initialise it, would hide a wrong mapping of that layer), and logits are
compared in fp32 in eval and train mode. Measured on 2 CPU cores: max abs differences of 1e-7 to
1e-6 (eval) and 1e-6 to 1e-5 (train, which normalises with batch statistics of 8 images) on logits
of magnitude ~1; the tolerance is 1e-4, the issue's bar, two orders above fp32 reduction noise and
far below the 0.1 of one misplaced layer.
"""


import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_variables, randomise_batch_stats
from safetensors.torch import save_file
from torch import nn

from se_resnet_jax import convert, create_model, models, torch_models

torch.set_num_threads(2)
TOLERANCE = 1e-4
IMAGES = np.random.RandomState(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
CASES = {  # name -> options: small widths, SE everywhere with a hidden width of at least 2
    'SEResNet18': dict(num_classes=100, num_filters=8, se_reduction=4),
    'SEResNet50': dict(num_classes=100, num_filters=8, se_reduction=8),
    'SEResNet20': dict(num_classes=10, num_filters=4, se_reduction=2),  # option A shortcuts
    'SEWRN16_8': dict(num_classes=10, num_filters=2, se_reduction=4),  # pre-activation, wide
}


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=generator)
        m.bias.normal_(0.0, 0.1, generator=generator)
        m.running_mean.normal_(0.0, 0.2, generator=generator)
        m.running_var.uniform_(0.5, 2.0, generator=generator)
  return model


def torch_logits(model: nn.Module, train: bool) -> np.ndarray:
  model.train(train)
  with torch.no_grad():
    return model(torch.from_numpy(IMAGES.transpose(0, 3, 1, 2))).numpy()


def flax_logits(model, variables, train: bool) -> np.ndarray:
  if train:
    run = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0])
  else:
    run = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(run(variables, IMAGES))


def max_abs_difference(torch_model, flax_model, variables) -> dict:
  return {mode: float(np.abs(torch_logits(torch_model, train)
                             - flax_logits(flax_model, variables, train)).max())
          for mode, train in (('eval', False), ('train', True))}


def random_flax_variables(model, seed: int = 0):
  return randomise_batch_stats(random_variables(model, IMAGES[:1], train=False, seed=seed), seed)


@pytest.mark.parametrize('name', CASES)
def test_torch_to_flax_same_logits(name):
  torch.manual_seed(0)
  torch_model = randomise_batchnorm(torch_models.create_model(name, **CASES[name]))
  flax_model = create_model(name, **CASES[name])
  variables, report = convert.torch_to_flax(torch_model.state_dict(), flax_model)
  assert report.folded_biases == () and report.dropped_prefix is None
  differences = max_abs_difference(torch_model, flax_model, variables)
  assert max(differences.values()) <= TOLERANCE, differences


@pytest.mark.parametrize('name', CASES)
def test_flax_to_torch_same_logits_and_round_trip_is_bit_exact(name):
  flax_model = create_model(name, **CASES[name])
  variables = random_flax_variables(flax_model)
  state_dict = convert.flax_to_torch(variables, flax_model)
  torch_model = torch_models.create_model(name, **CASES[name])
  torch_model.load_state_dict(state_dict)  # strict: every key present, none extra

  back, _ = convert.torch_to_flax(torch_model.state_dict(), flax_model)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  differences = max_abs_difference(torch_model, flax_model, variables)  # train mode: last
  assert max(differences.values()) <= TOLERANCE, differences


def test_mapping_covers_every_model_and_matches_torch_names():
  """Every Flax variable of every model has a row in LAYERS, and the names and shapes that
  flax_to_torch writes are exactly those of the PyTorch twin (traced at full width, not run)."""
  for name in torch_models.MODELS:
    torch_model = torch_models.create_model(name, num_classes=100, num_filters=4,
                                            se_reduction=None if name.startswith('Res') else 4)
    slots = convert.torch_slots(create_model(name, num_classes=100, num_filters=4,
                                             se_reduction=None if name.startswith('Res') else 4))
    expected = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()
                if not k.endswith('num_batches_tracked')}
    assert {k: s.torch_shape for k, s in slots.items()} == expected, name


# ---------------------------------------------------------------------------------------------
# Public layouts, each rebuilt here as its repository writes it (small widths).


class WeiaicunzaiBasicSE(nn.Module):
  """weiaicunzai/pytorch-cifar100 senet.py BasicResidualSEBlock: conv biases, ReLU before SE."""

  def __init__(self, in_channels, out_channels, stride, r):
    super().__init__()
    self.residual = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
    self.shortcut = nn.Sequential()
    if stride != 1 or in_channels != out_channels:
      self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride),
                                    nn.BatchNorm2d(out_channels))
    self.squeeze = nn.AdaptiveAvgPool2d(1)
    self.excitation = nn.Sequential(
        nn.Linear(out_channels, out_channels // r), nn.ReLU(inplace=True),
        nn.Linear(out_channels // r, out_channels), nn.Sigmoid())

  def forward(self, x):
    shortcut = self.shortcut(x)
    residual = self.residual(x)
    excitation = self.excitation(self.squeeze(residual).flatten(1))
    return F.relu(residual * excitation[:, :, None, None] + shortcut)


class WeiaicunzaiSEResNet18(nn.Module):
  """weiaicunzai/pytorch-cifar100 senet.py SEResNet with BasicResidualSEBlock, [2, 2, 2, 2]."""

  def __init__(self, width, r, num_classes):
    super().__init__()
    self.pre = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                             nn.ReLU(inplace=True))
    in_channels = width
    for s in range(4):
      blocks = []
      for j in range(2):
        blocks.append(WeiaicunzaiBasicSE(in_channels, width * 2**s, 2 if s and not j else 1, r))
        in_channels = width * 2**s
      setattr(self, f'stage{s + 1}', nn.Sequential(*blocks))
    self.linear = nn.Linear(in_channels, num_classes)

  def forward(self, x):
    x = self.stage4(self.stage3(self.stage2(self.stage1(self.pre(x)))))
    return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class KuangliuSEBasicBlock(nn.Module):
  """kuangliu/pytorch-cifar senet.py BasicBlock: SE as 1x1 convolutions fc1/fc2 (r = 16 there)."""

  def __init__(self, in_planes, planes, stride, r):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                    nn.BatchNorm2d(planes))
    self.fc1 = nn.Conv2d(planes, planes // r, kernel_size=1)
    self.fc2 = nn.Conv2d(planes // r, planes, kernel_size=1)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    w = F.avg_pool2d(out, out.size(2))
    w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
    return F.relu(out * w + self.shortcut(x))


class KuangliuSENet18(nn.Module):
  """kuangliu/pytorch-cifar senet.py SENet with BasicBlock, [2, 2, 2, 2]."""

  def __init__(self, width, r, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    in_planes = width
    for s in range(4):
      blocks = []
      for j in range(2):
        blocks.append(KuangliuSEBasicBlock(in_planes, width * 2**s, 2 if s and not j else 1, r))
        in_planes = width * 2**s
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
    self.linear = nn.Linear(in_planes, num_classes)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    return self.linear(F.avg_pool2d(out, 4).flatten(1))


class WeiaicunzaiBasicBlock(nn.Module):
  """weiaicunzai/pytorch-cifar100 resnet.py BasicBlock (no SE, no conv biases)."""

  def __init__(self, in_channels, out_channels, stride):
    super().__init__()
    self.residual_function = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels))
    self.shortcut = nn.Sequential()
    if stride != 1 or in_channels != out_channels:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
          nn.BatchNorm2d(out_channels))

  def forward(self, x):
    return F.relu(self.residual_function(x) + self.shortcut(x))


class WeiaicunzaiResNet18(nn.Module):
  """weiaicunzai/pytorch-cifar100 resnet.py ResNet with BasicBlock, [2, 2, 2, 2]."""

  def __init__(self, width, num_classes):
    super().__init__()
    self.conv1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    in_channels = width
    for s in range(4):
      blocks = []
      for j in range(2):
        blocks.append(WeiaicunzaiBasicBlock(in_channels, width * 2**s, 2 if s and not j else 1))
        in_channels = width * 2**s
      setattr(self, f'conv{s + 2}_x', nn.Sequential(*blocks))
    self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(in_channels, num_classes)

  def forward(self, x):
    x = self.conv5_x(self.conv4_x(self.conv3_x(self.conv2_x(self.conv1(x)))))
    return self.fc(self.avg_pool(x).flatten(1))


def test_weiaicunzai_senet_layout_with_biases_relu_before_se_and_dataparallel_prefix():
  torch.manual_seed(1)
  source = randomise_batchnorm(WeiaicunzaiSEResNet18(width=8, r=4, num_classes=100), seed=1)
  state_dict = nn.DataParallel(source).state_dict()  # keys 'module.pre.0.weight', ...
  assert next(iter(state_dict)).startswith('module.')

  with pytest.raises(convert.ConversionError, match=r'relu_before_se=True'):
    convert.torch_to_flax(state_dict, create_model('SEResNet18', **CASES['SEResNet18']))

  model = create_model('SEResNet18', relu_before_se=True, **CASES['SEResNet18'])
  variables, report = convert.torch_to_flax(state_dict, model)
  assert report.layouts == ('weiaicunzai/pytorch-cifar100 senet.py',)
  assert report.dropped_prefix == 'module.'
  assert len(report.folded_biases) == 1 + 8 * 2 + 3  # stem, two convs per unit, 3 projections
  assert 'module.stage2.0.shortcut.0.bias' in report.folded_biases  # the file's own keys
  assert 'Folded 20 convolution biases' in report.summary()
  differences = max_abs_difference(source, model, variables)
  assert max(differences.values()) <= TOLERANCE, differences


def test_kuangliu_senet_layout_se_as_1x1_convolutions():
  torch.manual_seed(2)
  source = randomise_batchnorm(KuangliuSENet18(width=8, r=4, num_classes=100), seed=2)
  model = create_model('SEResNet18', **CASES['SEResNet18'])
  checkpoint = {'net': source.state_dict(), 'acc': 93.0, 'epoch': 199}  # as its main.py saves
  variables, report = convert.torch_to_flax(convert.unwrap_state_dict(checkpoint), model)
  assert report.layouts == ('kuangliu/pytorch-cifar senet.py',)
  differences = max_abs_difference(source, model, variables)
  assert max(differences.values()) <= TOLERANCE, differences


def test_pre_activation_bottleneck_both_ways():
  """ResNet-164's units (pre-activation bottlenecks, 1x1 projections, final BN), one per stage."""
  torch.manual_seed(4)
  torch_model = randomise_batchnorm(torch_models.PreActResNet(
      (1, 1, 1), True, num_classes=10, num_filters=2, se_reduction=4), seed=4)
  flax_model = models.SEResNet164(num_classes=10, num_filters=2, se_reduction=4,
                                  stage_sizes=[1, 1, 1])
  variables, _ = convert.torch_to_flax(torch_model.state_dict(), flax_model)
  differences = max_abs_difference(torch_model, flax_model, variables)
  assert max(differences.values()) <= TOLERANCE, differences
  back = convert.flax_to_torch(variables, flax_model)
  assert set(back) == set(torch_model.state_dict())
  assert not any(k.startswith('bn1.') for k in back) and 'bn_final.running_var' in back


class SenetPytorchCifarBlock(nn.Module):
  """moskomule/senet.pytorch CifarSEBasicBlock's layout: `se.fc` Sequential of bias-free Linear
  layers (indices 0 and 2), `downsample` conv + BN where the width changes."""

  def __init__(self, inplanes, planes, stride, r):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.se = nn.Module()
    self.se.fc = nn.Sequential(nn.Linear(planes, planes // r, bias=False), nn.ReLU(),
                               nn.Linear(planes // r, planes, bias=False), nn.Sigmoid())
    self.downsample = None
    if inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    out = out * self.se.fc(out.mean((2, 3)))[:, :, None, None]
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class SenetPytorchCifarSEResNet(nn.Module):
  """Its CifarSEResNet: conv1/bn1 stem of 16 (here `width`), layer1-3, `fc`."""

  def __init__(self, n, width, r, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    inplanes = width
    for s in range(3):
      blocks = []
      for j in range(n):
        blocks.append(SenetPytorchCifarBlock(inplanes, width * 2**s, 2 if s and not j else 1, r))
        inplanes = width * 2**s
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
    return self.fc(x.mean((2, 3)))


def test_senet_pytorch_cifar_layout():
  torch.manual_seed(5)
  source = randomise_batchnorm(SenetPytorchCifarSEResNet(3, width=4, r=2, num_classes=10), seed=5)
  state_dict = source.state_dict()
  assert 'layer1.0.se.fc.0.weight' in state_dict and 'layer2.0.downsample.1.running_mean' in (
      state_dict) and 'fc.bias' in state_dict and 'layer1.0.se.fc.0.bias' not in state_dict
  model = create_model('SEResNet20', num_classes=10, num_filters=4, se_reduction=2,
                       shortcut='B', se_bias=False)
  variables, report = convert.torch_to_flax(state_dict, model)
  assert report.layouts == ('moskomule/senet.pytorch se_resnet.py (CIFAR)',)
  differences = max_abs_difference(source, model, variables)
  assert max(differences.values()) <= TOLERANCE, differences
  with pytest.raises(convert.ConversionError, match="se_bias=False"):  # He et al.'s option A
    convert.torch_to_flax(state_dict, create_model('SEResNet20', **CASES['SEResNet20']))


def test_weiaicunzai_resnet_layout():
  torch.manual_seed(3)
  source = randomise_batchnorm(WeiaicunzaiResNet18(width=8, num_classes=100), seed=3)
  model = create_model('ResNet18', num_classes=100, num_filters=8)
  variables, report = convert.torch_to_flax(source.state_dict(), model)
  assert report.layouts == ('weiaicunzai/pytorch-cifar100 resnet.py',)
  differences = max_abs_difference(source, model, variables)
  assert max(differences.values()) <= TOLERANCE, differences


# ---------------------------------------------------------------------------------------------
# Errors: one message, naming the key, the expected and found shapes, and what would fit.


@pytest.fixture(scope='module')
def seresnet18_state_dict():
  return torch_models.create_model('SEResNet18', **CASES['SEResNet18']).state_dict()


def test_wrong_num_classes_names_key_shapes_and_option(seresnet18_state_dict):
  model = create_model('SEResNet18', num_classes=10, num_filters=8, se_reduction=4)
  with pytest.raises(convert.ConversionError) as e:
    convert.torch_to_flax(seresnet18_state_dict, model)
  message = str(e.value)
  assert 'linear.weight: expected shape (10, 64), found (100, 64)' in message
  assert 'linear.bias: expected shape (10,), found (100,)' in message
  assert 'fit: num_classes=100.' in message


def test_wrong_width_and_ratio_say_which_options_fit(seresnet18_state_dict):
  model = create_model('SEResNet18', num_classes=100, num_filters=16, se_reduction=8)
  with pytest.raises(convert.ConversionError, match=r'conv1.weight: expected shape '
                     r'\(16, 3, 3, 3\), found \(8, 3, 3, 3\)(.|\n)*fit: num_filters=8, '
                     r'se_reduction=4\.'):
    convert.torch_to_flax(seresnet18_state_dict, model)


def test_unknown_and_missing_keys_are_named(seresnet18_state_dict):
  model = create_model('SEResNet18', **CASES['SEResNet18'])
  state_dict = dict(seresnet18_state_dict)
  state_dict['head.weight'] = torch.zeros(3, 4)
  del state_dict['layer3.1.se.expand.bias']
  with pytest.raises(convert.ConversionError) as e:
    convert.torch_to_flax(state_dict, model)
  assert 'head.weight: no such tensor in SEResNet18 (shape (3, 4))' in str(e.value)
  assert 'layer3.1.se.expand.bias: missing (expected shape (32,))' in str(e.value)


def test_depth_and_se_mismatch_name_the_model_that_fits(seresnet18_state_dict):
  with pytest.raises(convert.ConversionError, match=r'missing(.|\n)*fit: model SEResNet18\.'):
    convert.torch_to_flax(seresnet18_state_dict,
                          create_model('SEResNet34', **CASES['SEResNet18']))
  with pytest.raises(convert.ConversionError, match=r'layer1.0.se.reduce.weight: no such tensor '
                     r'in ResNet18(.|\n)*fit: model SEResNet18, se_reduction=4\.'):
    convert.torch_to_flax(seresnet18_state_dict,
                          create_model('ResNet18', num_classes=100, num_filters=8))


def test_pre_activation_units_are_refused_with_the_reason(seresnet18_state_dict):
  preact = {k: v for k, v in seresnet18_state_dict.items() if '.shortcut.1.' not in k}
  with pytest.raises(convert.ConversionError, match='pre-activation'):
    convert.torch_to_flax(preact, create_model('SEResNet18', **CASES['SEResNet18']))


def test_flax_variables_of_another_model_are_refused():
  variables = random_variables(create_model('ResNet18', num_filters=4), IMAGES[:1], train=False)
  with pytest.raises(convert.ConversionError, match='are not SEResNet18 variables'):
    convert.flax_to_torch(variables, create_model('SEResNet18', num_filters=4, se_reduction=4))


# ---------------------------------------------------------------------------------------------
# Files.


def assert_same_tensors(loaded, expected):
  assert sorted(loaded) == sorted(expected)  # safetensors stores keys sorted
  for k in expected:
    assert torch.equal(loaded[k], expected[k]), k


def test_file_formats(tmp_path, seresnet18_state_dict):
  model = torch_models.create_model('SEResNet18', **CASES['SEResNet18'])
  model.load_state_dict(seresnet18_state_dict)
  expected = model.state_dict()

  torch.save(expected, tmp_path / 'plain.pth')
  torch.save({'state_dict': expected, 'epoch': 200}, tmp_path / 'wrapped.pt')
  torch.save({'model': expected, 'optimizer': {'lr': 0.1}}, tmp_path / 'model_key.pth')
  save_file(dict(expected), str(tmp_path / 'weights.safetensors'))
  for name in ('plain.pth', 'wrapped.pt', 'model_key.pth', 'weights.safetensors'):
    assert_same_tensors(convert.load_torch_file(str(tmp_path / name)), expected)

  torch.save(model, tmp_path / 'whole.pth')  # a pickled nn.Module: loading runs code
  with pytest.raises(convert.ConversionError, match='trust_pickle=True'):
    convert.load_torch_file(str(tmp_path / 'whole.pth'))
  assert_same_tensors(convert.load_torch_file(str(tmp_path / 'whole.pth'), trust_pickle=True),
                      expected)
  torch.save({'model': nn.DataParallel(model)}, tmp_path / 'whole_dp.pth')
  loaded = convert.load_torch_file(str(tmp_path / 'whole_dp.pth'), trust_pickle=True)
  assert list(loaded)[0] == 'module.conv1.weight'
  variables, report = convert.torch_to_flax(loaded, create_model('SEResNet18',
                                                                 **CASES['SEResNet18']))
  assert report.dropped_prefix == 'module.'

  torch.save({'accuracy': 0.9}, tmp_path / 'other.pth')
  with pytest.raises(convert.ConversionError, match='Found no state dict'):
    convert.load_torch_file(str(tmp_path / 'other.pth'), trust_pickle=True)
  with pytest.raises(convert.ConversionError, match='No PyTorch weights file'):
    convert.load_torch_file(str(tmp_path / 'absent.pth'))

  # Random or damaged bytes are no pickled model: no advice to run code from them (issue 20).
  (tmp_path / 'random.pth').write_bytes(np.random.RandomState(0).bytes(4096))
  (tmp_path / 'cut.pth').write_bytes((tmp_path / 'plain.pth').read_bytes()[:3000])
  for name in ('random.pth', 'cut.pth'):
    for trust in (False, True):
      with pytest.raises(convert.NotATorchFileError) as error:
        convert.load_torch_file(str(tmp_path / name), trust_pickle=trust)
      assert error.value.path == str(tmp_path / name)
      assert 'trust_pickle' not in str(error.value), str(error.value)
