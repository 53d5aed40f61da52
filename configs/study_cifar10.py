"""The study's CIFAR-10 settings: r=16, dropout 0.5, weight decay 1e-4, 100 epochs, multi-step."""

from se_resnet_jax.config import base_config


def get_config():
  config = base_config()
  config.dataset = 'cifar10'
  config.num_epochs = 100
  config.weight_decay = 1e-4
  config.model.se_reduction = 16
  config.model.dropout_rate = 0.5
  config.schedule = 'multistep'
  config.lr_decay_epochs = (50, 75)
  config.warmup_epochs = 0.0
  config.nesterov = False
  config.augment.brightness = 0.2
  config.augment.contrast = 0.2
  config.augment.saturation = 0.2
  return config
