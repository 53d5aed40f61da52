"""The study's CIFAR-100 settings: configs/study_cifar10.py's, with dropout 0.6, weight decay 5e-4
and 150 epochs (decay steps at 75 and 112)."""

import os

from se_resnet_jax.config import load_config_file


def get_config():
  config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         'study_cifar10.py'))
  config.dataset = 'cifar100'
  config.num_epochs = 150
  config.weight_decay = 5e-4
  config.model.dropout_rate = 0.6
  config.lr_decay_epochs = (75, 112)
  return config
