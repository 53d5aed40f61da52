"""PyTorch weights <-> Flax variables for the library's networks, both ways.

  python -m se_resnet_jax.convert --from_torch=weights.pth --config=configs/cifar100.py \
      --mean=R,G,B --std=R,G,B --workdir=runs/from_torch  # a run `evaluate` reports on
  python -m se_resnet_jax.convert --to_torch=weights.pth --workdir=runs/cifar100  # its best weights

LAYERS maps the names of `se_resnet_jax.torch_models` (kuangliu/pytorch-cifar's layout);
PUBLIC_LAYOUTS renames the other public CIFAR layouts into those first. A conv bias before a
BatchNorm folds into its running mean (mean - bias), the same function in train mode too: there
the bias cancels out of the normalised output and shifts the batch mean by exactly the bias.
"""

import contextlib
import dataclasses
import os
import re
from collections import OrderedDict, namedtuple
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import traverse_util
from ml_collections import config_flags

from se_resnet_jax import cli, files, input_pipeline, models, rundir
from se_resnet_jax.checkpoints import CheckpointError, RunCheckpoints
from se_resnet_jax.config import model_options, validate_config
from se_resnet_jax.errors import ConfigError, UserError
from se_resnet_jax.plan import plan_run
from se_resnet_jax.progress import Progress
from se_resnet_jax.steps import TrainState, ema_variables
from se_resnet_jax.workdir import prepare_workdir

FLAGS = flags.FLAGS

# Flax module path -> PyTorch module. '{u}' is a residual unit: in Flax '{BlockClass}_{n}', n
# counting units across all stages from 0, in PyTorch 'layer{stage}.{unit}', stages from 1 and units
# from 0 (ResidualBlock_0 is layer1.0).
LAYERS = {
    'conv_init': 'conv1',
    'bn_init': 'bn1',
    '{u}/Conv_0': '{u}.conv1',
    '{u}/BatchNorm_0': '{u}.bn1',
    '{u}/Conv_1': '{u}.conv2',
    '{u}/BatchNorm_1': '{u}.bn2',
    '{u}/Conv_2': '{u}.conv3',  # bottleneck units only
    '{u}/BatchNorm_2': '{u}.bn3',
    '{u}/conv_proj': '{u}.shortcut.0',  # units that change shape only
    '{u}/norm_proj': '{u}.shortcut.1',
    '{u}/SEBlock_0/Excitation_0/reduce': '{u}.se.reduce',  # SE models only
    '{u}/SEBlock_0/Excitation_0/expand': '{u}.se.expand',
    'bn_final': 'bn_final',  # pre-activation networks only
    'Dense_0': 'linear',
}
# In pre-activation units (PreActBlock, PreActBottleneck) the same rows hold: their k-th BatchNorm
# (BatchNorm_{k-1}, PyTorch bn{k}) comes before their k-th convolution instead of after it.

# A Flax variable's PyTorch tensor name, and the PyTorch axes of a kernel of n dimensions.
TENSORS = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
           'var': 'running_var'}
KERNEL_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}  # OIHW <-> HWIO, (out, in) <-> (in, out)
PREFIXES = ('module.', '_orig_mod.')  # DataParallel / DistributedDataParallel, torch.compile
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net')


# A public PyTorch layout: (pattern, replacement) renames into LAYERS' names, tried in order on
# each key, and the model options (pairs) its network's function needs, which no shape tells.
Layout = namedtuple('Layout', 'name renames options', defaults=((),))


# nn.Sequential indices of the conv/BN layers in weiaicunzai's residual branches (ReLUs between).
_RESIDUAL = {0: 'conv1', 1: 'bn1', 3: 'conv2', 4: 'bn2', 6: 'conv3', 7: 'bn3'}
PUBLIC_LAYOUTS = (
    # Conv biases (folded), and a ReLU between each residual branch's last BN and its SE block.
    Layout('weiaicunzai/pytorch-cifar100 senet.py', (
        (r'^pre\.0\.', 'conv1.'), (r'^pre\.1\.', 'bn1.'),
        *((rf'^stage(\d+)\.(\d+)\.residual\.{i}\.', rf'layer\1.\2.{name}.')
          for i, name in _RESIDUAL.items()),
        (r'^stage(\d+)\.(\d+)\.excitation\.0\.', r'layer\1.\2.se.reduce.'),
        (r'^stage(\d+)\.(\d+)\.excitation\.2\.', r'layer\1.\2.se.expand.'),
        (r'^stage(\d+)\.(\d+)\.shortcut\.', r'layer\1.\2.shortcut.')),
        options=(('relu_before_se', True),)),
    Layout('weiaicunzai/pytorch-cifar100 resnet.py', (
        (r'^conv1\.0\.', 'conv1.'), (r'^conv1\.1\.', 'bn1.'), (r'^fc\.', 'linear.'),
        *((rf'^conv{s + 1}_x\.(\d+)\.residual_function\.{i}\.', rf'layer{s}.\1.{name}.')
          for s in range(1, 5) for i, name in _RESIDUAL.items()),
        *((rf'^conv{s + 1}_x\.(\d+)\.shortcut\.', rf'layer{s}.\1.shortcut.')
          for s in range(1, 5)))),
    Layout('kuangliu/pytorch-cifar senet.py', (
        (r'^(layer\d+\.\d+)\.fc1\.', r'\1.se.reduce.'),
        (r'^(layer\d+\.\d+)\.fc2\.', r'\1.se.expand.'))),
    # CifarSEResNet (se_resnet20/32/56). Its CifarSEPreActResNet is not read: its forward
    # returns nothing and its final BatchNorm has the stem's width.
    Layout('moskomule/senet.pytorch se_resnet.py (CIFAR)', (
        (r'^(layer\d+\.\d+)\.se\.fc\.0\.', r'\1.se.reduce.'),
        (r'^(layer\d+\.\d+)\.se\.fc\.2\.', r'\1.se.expand.'),
        (r'^(layer\d+\.\d+)\.downsample\.', r'\1.shortcut.'),
        (r'^fc\.', 'linear.')),
        options=(('shortcut', 'B'), ('se_bias', False))),
)
NATIVE_LAYOUT = 'se_resnet_jax.torch_models / kuangliu/pytorch-cifar'


class ConversionError(UserError, ValueError):
  """Weights that do not fit the model, or a file that cannot be read; the message says why."""


@dataclasses.dataclass(frozen=True)
class ConversionReport:
  """What a conversion did beyond copying: the layouts read and the biases folded."""
  layouts: tuple
  folded_biases: tuple  # the file's keys of conv biases folded into the next BatchNorm's mean
  dropped_prefix: Optional[str]

  def summary(self) -> str:
    lines = [f'Read layout: {", ".join(self.layouts)}.']
    if self.dropped_prefix:
      lines.append(f'Dropped the {self.dropped_prefix!r} prefix of every key.')
    if self.folded_biases:
      lines.append(f'Folded {len(self.folded_biases)} convolution biases into the running mean of '
                   'the BatchNorm after each (mean - bias: the same function in eval and train '
                   'mode): ' + ', '.join(self.folded_biases) + '.')
    return '\n'.join(lines)


# Where a PyTorch tensor sits in the Flax variables: collection, path in it, the transpose from
# the Flax array to the PyTorch one (or None), and both shapes.
_Slot = namedtuple('_Slot', 'collection path axes flax_shape torch_shape')


def torch_slots(model: models.SEResNet) -> dict:
  """PyTorch tensor name -> where and how it sits in the Flax variables, from LAYERS."""
  torch_units = [f'layer{stage + 1}.{unit}' for stage, size in enumerate(model.stage_sizes)
                 for unit in range(size)]  # 'ResidualBlock_2' -> 'layer2.0' in SEResNet18
  units = {f'{model.block_cls.__name__}_{n}': name for n, name in enumerate(torch_units)}
  shapes = jax.eval_shape(  # traced, not computed
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  slots = {}
  for (collection, *path), leaf in traverse_util.flatten_dict(shapes).items():
    *module, name = path
    unit = units.get(module[0])
    torch_module = LAYERS['/'.join(['{u}', *module[1:]] if unit else module)].format(u=unit)
    axes = KERNEL_AXES[leaf.ndim] if name == 'kernel' else None
    shape = tuple(leaf.shape[a] for a in axes) if axes else tuple(leaf.shape)
    slots[f'{torch_module}.{TENSORS[name]}'] = _Slot(collection, tuple(path), axes,
                                                     tuple(leaf.shape), shape)
  natural = lambda name: [int(p) if p.isdigit() else p for p in re.split(r'(\d+)', name)]
  return dict(sorted(slots.items(), key=lambda kv: natural(kv[0])))  # layer2 before layer10


def _numpy(tensor) -> np.ndarray:
  if hasattr(tensor, 'detach'):  # a torch.Tensor; numpy has no bfloat16, so floats go to fp32
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
  return np.asarray(tensor)


def normalise_names(state_dict: Mapping[str, Any]) -> tuple:
  """(state dict in LAYERS' names, {new name: name in the file}, layouts read, prefix dropped)."""
  names = list(state_dict)
  dropped = None
  for prefix in PREFIXES:
    if names and all(n.startswith(prefix) for n in names):
      names = [n[len(prefix):] for n in names]
      dropped = prefix
  renamed, origin, layouts = {}, {}, []
  # A key some layouts share ('fc.') is read in the layout that explains most of the file's keys.
  ranked = sorted(PUBLIC_LAYOUTS, key=lambda lay: -sum(_rename(n, lay) != n for n in names))
  for original, name in zip(state_dict, names):
    for layout in ranked:
      new = _rename(name, layout)
      if new != name:
        name = new
        if layout.name not in layouts:
          layouts.append(layout.name)
        break
    renamed[name] = state_dict[original]
    origin[name] = original
  return renamed, origin, tuple(layouts) or (NATIVE_LAYOUT,), dropped


def _rename(name: str, layout: Layout) -> str:
  for pattern, replacement in layout.renames:
    new, count = re.subn(pattern, replacement, name)
    if count:
      return new
  return name


def _named(signature: tuple) -> Optional[str]:
  """The name in models.MODELS of the network with this (stage sizes, pre-activation,
  bottleneck, widen factor, SE) signature; None if none has it."""
  for name, constructor in models.MODELS.items():
    keywords = constructor.keywords
    if signature == (list(keywords['stage_sizes']), constructor.func is models.PreActResNet,
                     keywords['block_cls'].expansion == 4, keywords.get('widen_factor', 1),
                     keywords.get('se_reduction', 16) is not None):
      return name
  return None


def _model_name(model: models.SEResNet) -> str:
  return _named((list(model.stage_sizes), isinstance(model, models.PreActResNet),
                 model.block_cls.expansion == 4, getattr(model, 'widen_factor', 1),
                 model.se_reduction is not None)) or type(model).__name__


def _fitting_options(state_dict: Mapping[str, Any], model: models.SEResNet) -> str:
  """'model SEResNet18, num_filters=8': the create_model name and options a state dict (in
  LAYERS' names) was built with, as far as its shapes tell, where `model` differs."""
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  units = {}
  for name in shapes:
    if m := re.match(r'layer(\d+)\.(\d+)\.', name):
      units[int(m[1])] = max(units.get(int(m[1]), 0), int(m[2]) + 1)
  stage_sizes = [units.get(s, 0) for s in range(1, max(units, default=0) + 1)]
  bottleneck = any(re.match(r'layer\d+\.\d+\.conv3\.weight$', n) for n in shapes)
  preact = 'bn_final.weight' in shapes
  found = {}
  if len(shapes.get('linear.weight', ())) == 2:
    found['num_classes'] = shapes['linear.weight'][0]
  if len(shapes.get('conv1.weight', ())) == 4:
    found['num_filters'] = shapes['conv1.weight'][0]
  widen = 1
  if preact and not bottleneck and found.get('num_filters') and 'layer1.0.conv1.weight' in shapes:
    widen = shapes['layer1.0.conv1.weight'][0] // found['num_filters']
  ratios = []
  for stage in range(1, len(stage_sizes) + 1):
    reduce = shapes.get(f'layer{stage}.0.se.reduce.weight')  # (C/r, C)
    ratios.append(reduce[1] // reduce[0] if reduce and reduce[0] else None)
  if stage_sizes:
    found['se_reduction'] = ratios[0] if len(set(ratios)) == 1 else ratios
  reductions = models.stage_reductions(model.se_reduction, len(model.stage_sizes))
  mine = {'num_classes': model.num_classes, 'num_filters': model.num_filters,
          'se_reduction': reductions[0] if len(set(reductions)) == 1 else reductions}
  name = _named((stage_sizes, preact, bottleneck, widen, any(r is not None for r in ratios)))
  wanted = [f'model {name}'] if name not in (None, _model_name(model)) else []
  return ', '.join(wanted + [f'{k}={v!r}' for k, v in found.items() if v != mine[k]])


def torch_to_flax(state_dict: Mapping[str, Any], model: models.SEResNet) -> tuple:
  """(Flax {'params', 'batch_stats'} for `model`, ConversionReport) from a PyTorch state dict; or,
  before anything is converted, one ConversionError naming every key that cannot be mapped, is
  missing or has the wrong shape, and the model options that would fit the file."""
  renamed, origin, layouts, dropped = normalise_names(state_dict)
  slots = torch_slots(model)
  problems, folds = [], {}
  for layout in PUBLIC_LAYOUTS:
    wrong = [f'{k}={v!r}' for k, v in layout.options
             if layout.name in layouts and getattr(model, k, v) != v]
    if wrong:
      raise ConversionError(f'Weights in the {layout.name} layout come from a network built with '
                            f'{", ".join(wrong)}: build the model with those options (in a '
                            f'config, model.{", model.".join(wrong)}) to compute their function.')

  def key(name):  # the file's key, and the name it was read as when a layout renamed it
    return origin[name] if origin[name] == name else f'{origin[name]} (read as {name})'

  for name, value in renamed.items():
    if name.endswith('num_batches_tracked'):
      continue  # only used by momentum=None BatchNorm; both sides use a fixed momentum
    conv = re.fullmatch(r'(.*)(conv(\d)|shortcut\.0)\.bias', name)  # the BatchNorm after it
    bn = conv and conv[1] + (f'bn{conv[3]}' if conv[3] else 'shortcut.1')
    if bn and not isinstance(model, models.PreActResNet) and f'{bn}.running_mean' in slots:
      folds[name] = bn  # checked against the shape of the running mean it folds into
    shape, slot = tuple(np.shape(value)), slots.get(f'{bn}.running_mean' if name in folds else name)
    if slot is None:
      problems.append(f'{key(name)}: no such tensor in {_model_name(model)} (shape {shape})')
    elif shape not in (slot.torch_shape, slot.torch_shape + (1, 1)):  # or kuangliu's 1x1 SE conv
      problems.append(f'{key(name)}: expected shape {slot.torch_shape}, found {shape}')
  problems += [f'{name}: missing (expected shape {slot.torch_shape})'
               for name, slot in slots.items() if name not in renamed]
  if problems:
    raise ConversionError(_problem_message(problems, renamed, model, layouts))
  bias_of_mean = {f'{bn}.running_mean': bias for bias, bn in folds.items()}
  flat = {}
  for name, slot in slots.items():
    array = _numpy(renamed[name]).astype(np.float32).reshape(slot.torch_shape)
    if name in bias_of_mean:
      array = array - _numpy(renamed[bias_of_mean[name]]).astype(np.float32)
    if slot.axes:
      array = np.transpose(array, np.argsort(slot.axes))
    flat[(slot.collection, *slot.path)] = jnp.asarray(array)
  report = ConversionReport(layouts, tuple(origin[name] for name in folds), dropped)
  return traverse_util.unflatten_dict(flat), report


def _problem_message(problems: list, renamed: Mapping, model: models.SEResNet,
                     layouts: tuple) -> str:
  lines = [f'These PyTorch weights do not fit {_model_name(model)}(num_classes='
           f'{model.num_classes}, num_filters={model.num_filters}, se_reduction='
           f'{model.se_reduction!r}) (layout read: {", ".join(layouts)}):']
  lines += [f'  {p}' for p in problems[:12]]
  if len(problems) > 12:
    lines.append(f'  ... and {len(problems) - 12} more.')
  shortcuts = {m[1] for m in (re.match(r'layer\d+\.\d+\.shortcut\.(\d)\.weight$', n)
                               for n in renamed) if m}
  if shortcuts == {'0'} and not isinstance(model, models.PreActResNet):
    lines.append('The shortcuts have a convolution but no BatchNorm: these are pre-activation '
                 'units (BN-ReLU before each conv, as kuangliu\'s PreActBlock), a different '
                 'network: build a pre-activation one (ResNet164, WRN16_8, WRN28_10 or their SE '
                 'versions) if the stem, units and final BatchNorm match those.')
  elif fitting := _fitting_options(renamed, model):
    lines.append(f'The file\'s shapes fit: {fitting}.')
  return '\n'.join(lines)


def flax_to_torch(variables: Mapping[str, Any], model: models.SEResNet) -> 'OrderedDict':
  """A state dict of torch tensors that `torch_models.create_model(...)` of the same name and
  options loads with `load_state_dict` (strict), computing the same function."""
  import torch

  flat = traverse_util.flatten_dict(
      {k: jax.device_get(variables[k]) for k in ('params', 'batch_stats')})
  state = OrderedDict()
  for name, slot in torch_slots(model).items():
    key = (slot.collection, *slot.path)
    if key not in flat:
      raise ConversionError(f'The Flax variables have no {"/".join(key)} (PyTorch {name}): they '
                            f'are not {_model_name(model)} variables.')
    array = np.asarray(flat[key], np.float32)
    if array.shape != slot.flax_shape:
      raise ConversionError(f'{"/".join(key)} (PyTorch {name}): expected shape {slot.flax_shape}, '
                            f'found {array.shape}.')
    if slot.axes:
      array = np.transpose(array, slot.axes)
    state[name] = torch.from_numpy(np.array(array, order='C'))
    if name.endswith('.running_var'):
      state[name[:-len('running_var')] + 'num_batches_tracked'] = torch.tensor(0)
  return state


class NotATorchFileError(ConversionError):
  """A weights file that is no PyTorch file at all (random or damaged bytes); `path`, `reason`.
  Told apart from a whole pickled model, so damaged bytes never get advice to --trust_pickle."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path} is not a PyTorch weights file ({reason}): give a file written by '
                     'torch.save (a state_dict) or a .safetensors file.')
    self.path, self.reason = path, reason


def load_torch_file(path: str, trust_pickle: bool = False) -> 'OrderedDict':
  """The state dict in a .pth/.pt or .safetensors file, unwrapped from whatever holds it.

  A whole pickled model can only be read by running code from the file: `trust_pickle=True`, for
  files from a source you trust (the model's class must be importable)."""
  if not os.path.isfile(path):
    raise ConversionError(f'No PyTorch weights file at {path}.')
  if path.endswith('.safetensors'):
    from safetensors.torch import load_file
    return OrderedDict(load_file(path))
  import pickle

  import torch
  with open(path, 'rb') as f:
    head = f.read(4)
  if not (head.startswith(b'PK\x03\x04') or head[:1] == b'\x80'):  # torch.save's zip, or pickle
    raise NotATorchFileError(path, 'it is neither a zip archive (torch.save) nor a pickle')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    if trust_pickle or 'Unsupported global' not in str(e):  # damaged bytes, not a whole model
      raise NotATorchFileError(path, str(e).splitlines()[-1][:200]) from None
    raise ConversionError(
        f'{path} holds pickled Python objects beyond tensors (a whole model, for one), which only '
        'loading with code execution can read. If you trust the file\'s source, pass '
        'trust_pickle=True (--trust_pickle on the command line); or save model.state_dict() '
        f'instead. ({str(e).splitlines()[0][:200]})') from None
  except (RuntimeError, EOFError, ValueError, OSError) as e:  # a damaged zip or truncated pickle
    raise NotATorchFileError(path, f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
                             ) from None
  return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: Any, where: str = 'the object') -> 'OrderedDict':
  """A state dict from a module, a state dict, or a dict holding either under WRAPPER_KEYS."""
  if callable(getattr(obj, 'state_dict', None)):  # a whole nn.Module
    obj = obj.state_dict()
  if isinstance(obj, Mapping) and obj and all(hasattr(v, 'shape') for v in obj.values()):
    return OrderedDict(obj)
  key = next((k for k in WRAPPER_KEYS if k in obj), None) if isinstance(obj, Mapping) else None
  if key is not None:
    return unwrap_state_dict(obj[key], where)
  keys = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
  raise ConversionError(f'Found no state dict in {where}: expected a model, a state dict, or a '
                        f'dict holding one under one of {WRAPPER_KEYS}; found {keys}.')


def import_torch_weights(path: str, config: ml_collections.ConfigDict, workdir: str,
                         mean: Sequence[float], std: Sequence[float],
                         trust_pickle: bool = False) -> ConversionReport:
  """Writes PyTorch weights as step 0 of a new run in `workdir`, for `evaluate` to report on and
  training to start from; `mean`, `std`: the per-channel normalisation (of images in [0, 1]) the
  PyTorch network was trained with. All is checked before anything is written."""
  validate_config(config, jax.device_count())
  for name, values in (('mean', mean), ('std', std)):
    if len(values) != 3 or (name == 'std' and min(values) <= 0):
      raise ConfigError(f'--{name} must be three numbers (one per RGB channel'
                        f'{", each > 0" if name == "std" else ""}), got {list(values)}.')
  directory = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(directory) and os.listdir(directory):
    raise CheckpointError(f'{directory} already holds checkpoints: convert into a new --workdir. '
                          'Nothing was written.')
  plan = plan_run(config)
  variables, report = torch_to_flax(load_torch_file(path, trust_pickle), plan.model)
  prepare_workdir(workdir)

  state = TrainState.create(apply_fn=plan.model.apply, params=variables['params'], tx=plan.tx,
                            batch_stats=variables['batch_stats'],
                            ema_params=ema_variables(config, variables))
  meta = Progress(plan.architecture).to_meta()
  meta['converted_from'] = {'file': os.path.abspath(path), 'layouts': list(report.layouts),
                            'folded_biases': list(report.folded_biases)}
  names = input_pipeline.default_class_names(config.dataset, plan.num_classes)
  record = rundir.RunRecord(rundir.new_run_id(), rundir.now(), plan.architecture, plan.data,
                            list(names), [float(m) for m in mean], [float(s) for s in std])
  rundir.write_record(workdir, record, config)
  with contextlib.closing(RunCheckpoints(workdir, run_id=record.run_id)) as checkpoints:
    checkpoints.save(0, state, meta, best=True)
  return report


def export_torch_weights(workdir: str, path: str, checkpoint: str = 'best',
                         overwrite: bool = False) -> str:
  """Writes a run's checkpoint as a PyTorch state dict (.pth/.pt, .safetensors) for
  `se_resnet_jax.torch_models`, naming its run id and step (safetensors metadata, or the state
  dict's `se_resnet_jax` attribute); returns the call that builds that model."""
  import io

  import torch
  from safetensors.torch import save as safetensors_bytes

  if not path.endswith(('.pth', '.pt', '.safetensors')):
    raise ConversionError(f'--to_torch={path}: name the file .pth, .pt or .safetensors.')
  files.check_output(path, '--to_torch', overwrite)
  run = rundir.restore_run(workdir, checkpoint)
  state_dict = flax_to_torch(run.variables, run.model)
  weights = {'run_id': run.run_id, 'step': str(run.step), 'checkpoint': checkpoint,
             'library': 'se_resnet_jax'}
  if jax.process_index() == 0:
    if path.endswith('.safetensors'):
      data = safetensors_bytes(state_dict, metadata=weights)
    else:
      state_dict.se_resnet_jax = weights  # pickled with the dict; load_state_dict ignores it
      buffer = io.BytesIO()
      torch.save(state_dict, buffer)
      data = buffer.getvalue()
    files.write_output(path, data, '--to_torch', overwrite)
  options = model_options(run.config, run.model.num_classes)
  return f'torch_models.create_model({run.config.model.name!r}' + ''.join(
      f', {k}={v!r}' for k, v in options.items() if k != 'dropout_rate' or v) + ')'


def define_flags() -> None:
  """The command's flags; defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string('from_torch', None, 'PyTorch weights (.pth/.pt/.safetensors) to write as '
                      'a checkpoint in --workdir; needs --config.')
  flags.DEFINE_string('to_torch', None, 'Where to write the PyTorch state dict (.pth/.pt/'
                      '.safetensors) of a checkpoint of the run in --workdir.')
  flags.DEFINE_string('workdir', None, 'The run directory to write (--from_torch) or read.')
  flags.DEFINE_string('checkpoint', 'best', "With --to_torch: 'best', 'latest' or a step number.")
  flags.DEFINE_bool('overwrite', False, 'With --to_torch: replace the file if it exists.')
  flags.DEFINE_list('mean', None, 'With --from_torch: the per-channel mean (R,G,B, of images '
                    'in [0, 1]) the PyTorch network subtracted, e.g. 0.4914,0.4822,0.4465.')
  flags.DEFINE_list('std', None, 'With --from_torch: the per-channel std it divided by, e.g. '
                    '0.2470,0.2435,0.2616.')
  flags.DEFINE_bool('trust_pickle', False, 'Read a .pth holding a whole pickled model: this runs '
                    'code from the file, so only for files from a source you trust.')
  config_flags.DEFINE_config_file('config', None, 'With --from_torch: the config the weights fit '
                                  '(model, dataset); it is saved as the run\'s config.json.')
  flags.mark_flag_as_required('workdir')


def main(argv):
  def command():
    if bool(FLAGS.from_torch) == bool(FLAGS.to_torch):
      raise ConfigError('Give exactly one of --from_torch=FILE (PyTorch -> a run in --workdir) '
                        'and --to_torch=FILE (a run in --workdir -> PyTorch).')
    if FLAGS.from_torch:
      if FLAGS.config is None:
        raise ConfigError('--from_torch needs --config=<config file>: it says which network '
                          '(model.*) and dataset the weights are for.')
      if not FLAGS.mean or not FLAGS.std:
        raise ConfigError('--from_torch needs --mean=R,G,B and --std=R,G,B: the input '
                          'normalisation the PyTorch network was trained with.')
      try:
        mean, std = [float(v) for v in FLAGS.mean], [float(v) for v in FLAGS.std]
      except ValueError:
        raise ConfigError(f'--mean and --std must be numbers, got {FLAGS.mean} and '
                          f'{FLAGS.std}.') from None
      report = import_torch_weights(FLAGS.from_torch, FLAGS.config, FLAGS.workdir, mean, std,
                                    FLAGS.trust_pickle)
      print(report.summary())
      print(f'Wrote the weights as step 0 of a run in {FLAGS.workdir}. Report on them with:\n'
            f'  python -m se_resnet_jax.evaluate --workdir={FLAGS.workdir}')
    else:
      constructor = export_torch_weights(FLAGS.workdir, FLAGS.to_torch, FLAGS.checkpoint,
                                         FLAGS.overwrite)
      read = ('safetensors.torch.load_file' if FLAGS.to_torch.endswith('.safetensors')
              else 'torch.load')
      print(f'Wrote {FLAGS.to_torch}. Load it with:\n'
            f'  from se_resnet_jax import torch_models\n'
            f'  model = {constructor}\n'
            f'  model.load_state_dict({read}({FLAGS.to_torch!r}))')

  cli.run(argv, command)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
