"""The commands' --help: what the command does, its own flags, and every config field.

A field's meaning is the comment where `base_config()` sets it, so the two cannot drift apart.
"""

import ast
import inspect
import io
import re
import sys
import textwrap
import tokenize
from typing import Callable, Dict, Optional, Sequence

from absl import flags
from flax import traverse_util

from se_resnet_jax import augment
from se_resnet_jax.config import base_config, load_config_file

HELP_ARGUMENTS = ('--help', '-h', '-?', '--helpshort', '--help=true', '--helpshort=true')


def field_meanings(function: Callable, prefix: str = '') -> Dict[str, str]:
  """{field: meaning} from the comments of `function`, which sets `c.name = ...` or
  `c.group = ConfigDict(dict(name=..., ...))`: the first sentence of the comment on the field's
  line, else of the block above it (where a line sets several fields, the one that starts `name:`).
  """
  source = textwrap.dedent(inspect.getsource(function))
  comments = {t.start[0]: (t.string.lstrip('#').strip(), t.line.lstrip().startswith('#'))
              for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.COMMENT}
  fields = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
      name, value = prefix + node.targets[0].attr, node.value
      group = value.args[0] if isinstance(value, ast.Call) and value.args else None
      if isinstance(group, ast.Call) and getattr(group.func, 'id', '') == 'dict':
        fields += [(f'{name}.{k.arg}', k.lineno) for k in group.keywords]
      else:
        fields.append((name, node.lineno))
  meanings = {}
  for name, line in fields:
    first = line
    while comments.get(first - 1, ('', False))[1]:
      first -= 1
    own = [comments[line][0]] if line in comments else []
    block = [comments[n][0] for n in range(first, line)]
    label = name.rsplit('.', 1)[-1] + ':'
    labelled = [text[len(label):].strip() for text in own + block if text.startswith(label)]
    shared = sum(other_line == line for _, other_line in fields) > 1
    text = labelled[0] if labelled else '' if shared else ' '.join(own or block)
    meanings[name] = re.split(r'(?<=\.)(?<!e\.g\.)\s+(?=[A-Z])', text)[0].rstrip('.')
  return meanings


def all_field_meanings() -> Dict[str, str]:
  """Meanings of every field of base_config(), its `augment` group included."""
  return {**field_meanings(base_config),
          **field_meanings(augment.default_augment_config, prefix='augment.')}


def _show(value) -> str:
  if isinstance(value, str):
    return repr(value) if not value or ' ' in value else value
  return str(value).replace(' ', '')


def command_help(argv: Sequence[str], doc: Optional[str]) -> str:
  """--help of a command: its docstring, its own flags and, when it takes --config, the fields."""
  config_path = next((a.split('=', 1)[1] for a in reversed(argv) if a.startswith('--config=')),
                     None)
  lines = [(doc or '').strip(), '', 'Flags (--helpfull lists every library\'s flags too):',
           flags.FLAGS.main_module_help().strip().split('\n', 1)[-1], '']
  if 'config' in flags.FLAGS:
    config, source = base_config(), 'defaults of se_resnet_jax.config.base_config()'
    if config_path:
      try:
        config, source = load_config_file(config_path), f'values of {config_path}'
      except Exception as e:  # noqa: BLE001 - help still shows the defaults
        source += f' ({config_path} does not load: {type(e).__name__}: {e})'
    flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
    settings = [f'--config.{name}={_show(value)}' for name, value in flat.items()]
    width, meanings = min(max(map(len, settings)), 48), all_field_meanings()
    lines += [f'Config fields, set with --config.<field>=<value> ({source}):',
              *(f'  {setting.ljust(width)}  {meanings.get(name, "")}'.rstrip()
                for setting, name in zip(settings, flat)), '',
              '-v 1 (or --verbosity=1) also shows the libraries\' INFO logs (JAX, orbax, ...).']
  return '\n'.join(lines)


def exit_with_help_if_asked(argv: Sequence[str]) -> None:
  """Prints the command's help on stdout and exits 0 when argv asks for it."""
  if any(arg in HELP_ARGUMENTS for arg in argv[1:]):
    print(command_help(argv, getattr(sys.modules.get('__main__'), '__doc__', None)))
    sys.exit(0)
