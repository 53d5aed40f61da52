"""The SENet paper's CIFAR-10 comparison: SE-ResNet-110 against ResNet-110, He et al.'s recipe.

Hu et al. (SENet, TPAMI 2019, Sec. 5.1 and the CIFAR-10 table) train each CIFAR ResNet and its SE
counterpart with "the training hyperparameters ... suggested by the original papers" and standard
augmentation (4-pixel zero padding, random 32x32 crop, horizontal flip, mean/std normalisation).
For ResNet-110 that is He et al. 2015 (Deep Residual Learning, Sec. 4.2): SGD with momentum 0.9
(not Nesterov), weight decay 1e-4, batch 128, learning rate 0.1 divided by 10 at 32k and 48k
iterations, stopped at 64k, i.e. epochs 82 and 123 of 164 on 50k images; no dropout, no label
smoothing. He et al. start ResNet-110 at 0.01 until training error is below 80% (about 400
iterations, one epoch); here a linear one-epoch warm-up stands in for that step. ResNet-164
(He et al. 2016) uses the same recipe: `--config.model.name=SEResNet164`.

Differences from the papers, said here so that a result is read with them: 5k of the 50k training
images are held out for validation (best-checkpoint choice never looks at the test set), so an
epoch is 352 steps rather than 391; weight decay applies to kernels only (the papers' Torch and
Caffe code decay every parameter). The ablation command compares SE against no SE on it:

  python -m se_resnet_jax.experiments.ablation --config=configs/senet_cifar10.py \
      --workdir=runs/senet_cifar10 --variants=full,no_se --seeds=3
"""

from se_resnet_jax.config import base_config


def get_config():
  config = base_config()
  config.dataset = 'cifar10'
  config.model.name = 'SEResNet110'
  config.model.num_filters = 16  # He et al.'s CIFAR ResNets: stages of 16-32-64 filters
  config.model.se_reduction = 16  # the SENet paper's r throughout
  config.model.dropout_rate = 0.0
  config.num_epochs = 164
  config.batch_size = 128
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.schedule = 'multistep'
  config.lr_decay_epochs = (82, 123)
  config.lr_decay_factor = 0.1
  config.warmup_epochs = 1.0
  config.label_smoothing = 0.0
  return config  # augment: the default pad-4 crop + flip, no colour jitter, no cutout
