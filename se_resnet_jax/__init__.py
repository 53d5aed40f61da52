"""se_resnet_jax: Squeeze-and-Excitation ResNets for CIFAR in JAX/Flax.

Importing the package loads only the model code (jax and flax): no TensorFlow, tfds or plotting.
"""

from se_resnet_jax.models import (
    SEWRN16_8,
    SEWRN28_10,
    WRN16_8,
    WRN28_10,
    BottleneckBlock,
    Excitation,
    PreActBlock,
    PreActBottleneck,
    PreActResNet,
    ResidualBlock,
    ResNet18,
    ResNet20,
    ResNet32,
    ResNet34,
    ResNet44,
    ResNet50,
    ResNet56,
    ResNet101,
    ResNet110,
    ResNet152,
    ResNet164,
    SEBlock,
    SEResNet,
    SEResNet18,
    SEResNet20,
    SEResNet32,
    SEResNet34,
    SEResNet44,
    SEResNet50,
    SEResNet56,
    SEResNet101,
    SEResNet110,
    SEResNet152,
    SEResNet164,
    Squeeze,
    create_model,
    gates_by_block,
    replace_head,
)

__version__ = '0.1.0'

__all__ = [
    'BottleneckBlock', 'Excitation', 'PreActBlock', 'PreActBottleneck', 'PreActResNet',
    'ResidualBlock', 'ResNet18', 'ResNet20', 'ResNet32', 'ResNet34', 'ResNet44', 'ResNet50',
    'ResNet56', 'ResNet101', 'ResNet110', 'ResNet152', 'ResNet164', 'SEBlock', 'SEResNet',
    'SEResNet18', 'SEResNet20', 'SEResNet32', 'SEResNet34', 'SEResNet44', 'SEResNet50',
    'SEResNet56', 'SEResNet101', 'SEResNet110', 'SEResNet152', 'SEResNet164', 'SEWRN16_8',
    'SEWRN28_10', 'Squeeze', 'WRN16_8', 'WRN28_10', 'create_model', 'gates_by_block',
    'replace_head',
]
