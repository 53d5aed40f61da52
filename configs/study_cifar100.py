"""The study's CIFAR-100 settings: r=16, dropout 0.6, weight decay 5e-4, 150 epochs, multi-step."""

from se_resnet_jax.config import base_config


def get_config():
  config = base_config()
  config.dataset = 'cifar100'
  config.num_epochs = 150
  config.weight_decay = 5e-4
  config.model.se_reduction = 16
  config.model.dropout_rate = 0.6
  config.schedule = 'multistep'
  config.lr_decay_epochs = (75, 112)
  config.warmup_epochs = 0.0
  config.nesterov = False
  config.augment.brightness = 0.2
  config.augment.contrast = 0.2
  config.augment.saturation = 0.2
  return config
