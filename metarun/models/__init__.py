"""Networks. Each is a plain nn.Module whose parameters the algorithms use as a dict of tensors."""

from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP
from metarun.models.resnet12 import ResNet12

__all__ = ["Conv4", "MLP", "ResNet12"]
