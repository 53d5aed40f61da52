"""The SENet paper's wide-ResNet comparison: SE-WRN-16-8 against WRN-16-8 on CIFAR-10.

Recipe of Zagoruyko & Komodakis (Wide Residual Networks, 2016, Sec. 3), which the SENet paper
follows for this row: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, learning rate
0.1 multiplied by 0.2 at epochs 60, 120 and 160 of 200, pad-4 crop and flip. WRN's optional dropout
between a unit's convolutions (0.3) is not built here; there is no dropout. `--config.dataset=
cifar100` gives the CIFAR-100 row. As in configs/senet_cifar10.py, 5k training images validate and
weight decay applies to kernels only.
"""

from se_resnet_jax.config import base_config


def get_config():
  config = base_config()
  config.dataset = 'cifar10'
  config.model.name = 'SEWRN16_8'
  config.model.num_filters = 16  # stem 16; the widen factor 8 gives stages of 128-256-512
  config.model.se_reduction = 16
  config.model.dropout_rate = 0.0
  config.num_epochs = 200
  config.batch_size = 128
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4
  config.schedule = 'multistep'
  config.lr_decay_epochs = (60, 120, 160)
  config.lr_decay_factor = 0.2
  config.warmup_epochs = 0.0
  config.label_smoothing = 0.0
  return config
