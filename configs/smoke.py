"""Tiny SE-ResNet18 on generated images: the whole pipeline offline in about a minute on 2 CPUs."""

from se_resnet_jax.config import base_config


def get_config():
  config = base_config()
  config.dataset = 'synthetic'
  config.synthetic.num_train = 2000
  config.synthetic.num_test = 500
  config.validation_size = 500
  config.model.num_filters = 8
  config.model.se_reduction = 4
  config.model.dropout_rate = 0.1
  config.num_epochs = 6
  config.batch_size = 64
  config.eval_batch_size = 200  # a multiple of 8: runs unchanged on 8 TPU cores
  config.learning_rate = 0.05
  config.warmup_epochs = 0.5
  config.log_every_steps = 10
  return config
