"""SE-ResNet18 on CIFAR-10: the product's recipe (see README "Configs" for how it was chosen)."""

from se_resnet_jax.config import base_config


def get_config():
  config = base_config()
  config.dataset = 'cifar10'
  config.num_epochs = 200
  config.batch_size = 128
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.schedule = 'cosine'
  config.model.dropout_rate = 0.3
  config.augment.cutout_size = 16
  config.label_smoothing = 0.1
  return config
