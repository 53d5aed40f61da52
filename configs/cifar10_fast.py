"""SE-ResNet18 on CIFAR-10 in the least time on one GPU: batch 512, bf16, 35 epochs.

Why each value, and its measured time to accuracy: BENCHMARKS.md, "The fast recipe".
"""

from se_resnet_jax.config import base_config


def get_config():
  config = base_config()
  config.dataset = 'cifar10'
  config.num_epochs = 35
  config.batch_size = 512
  config.learning_rate = 0.4
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4
  config.schedule = 'cosine'
  config.warmup_epochs = 3.0
  config.label_smoothing = 0.1
  config.half_precision = True
  config.model.dropout_rate = 0.0
  config.augment.cutout_size = 8
  config.tta_flip = True
  config.ema_decay = 0.0
  config.checkpoint_every_epochs = 5  # the best weights are still saved at every improvement
  return config
