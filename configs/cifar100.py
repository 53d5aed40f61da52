"""SE-ResNet18 on CIFAR-100 (fine labels): the product's recipe."""

from se_resnet_jax.config import base_config


def get_config():
  config = base_config()
  config.dataset = 'cifar100'
  config.num_epochs = 200
  config.batch_size = 128
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.schedule = 'cosine'
  config.model.dropout_rate = 0.3
  config.augment.cutout_size = 8
  config.label_smoothing = 0.1
  return config
