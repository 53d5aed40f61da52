"""se_resnet_jax: Squeeze-and-Excitation ResNets for CIFAR in JAX/Flax.

Importing the package loads only the model code (jax and flax): no TensorFlow, tfds or plotting.
"""

from se_resnet_jax.models import (
    BottleneckBlock,
    Excitation,
    ResidualBlock,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    SEBlock,
    SEResNet,
    SEResNet18,
    SEResNet34,
    SEResNet50,
    SEResNet101,
    SEResNet152,
    Squeeze,
    create_model,
)

__version__ = '0.1.0'

__all__ = [
    'BottleneckBlock', 'Excitation', 'ResidualBlock', 'ResNet18', 'ResNet34', 'ResNet50',
    'ResNet101', 'ResNet152', 'SEBlock', 'SEResNet', 'SEResNet18', 'SEResNet34', 'SEResNet50',
    'SEResNet101', 'SEResNet152', 'Squeeze', 'create_model',
]
