"""SE-ResNet18 on CIFAR-100 (fine labels): configs/cifar10.py's recipe with a smaller cutout."""

import os

from se_resnet_jax.config import load_config_file


def get_config():
  config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar10.py'))
  config.dataset = 'cifar100'
  config.augment.cutout_size = 8
  return config
