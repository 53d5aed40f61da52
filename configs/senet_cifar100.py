"""The SENet paper's CIFAR-100 comparison: SE-ResNet-110 against ResNet-110 on the 100 fine
classes, with the recipe of configs/senet_cifar10.py (He et al. 2015; see its docstring for the
source of every value and where this library differs). `--config.model.name=SEResNet164` gives
the paper's ResNet-164 row."""

import os

from se_resnet_jax.config import load_config_file


def get_config():
  config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         'senet_cifar10.py'))
  config.dataset = 'cifar100'
  return config
