"""ResNet-12: the residual backbone of few-shot learning since TADAM and MetaOptNet.

Oreshkin, Rodriguez and Lacoste, "TADAM: Task dependent adaptive metric for improved few-shot
learning", NeurIPS 2018; Lee, Maji, Ravichandran and Soatto, "Meta-Learning with Differentiable
Convex Optimization" (MetaOptNet), CVPR 2019 (reference code ``models/ResNet12_embedding.py``).

Four residual blocks of 64-160-320-640 channels (``widths``; one block per entry). Each block is
3 x [3x3 convolution (no bias), batch norm, LeakyReLU(0.1)] with a 1x1 convolution + batch norm
shortcut added before the third activation, then 2x2 max-pooling. The final map is averaged over
space: a 640-d feature on any input of at least 2**len(widths) pixels a side (84x84 miniImageNet:
84 -> 42 -> 21 -> 10 -> 5; 32x32 CIFAR-FS/FC100: 32 -> 16 -> 8 -> 4 -> 2; 28x28 Omniglot ends at 1x1).
``negative_slope`` 0.1 is MetaOptNet's; 0 gives TADAM's plain ReLU.

``out_features=None`` leaves out the linear head: the network is then the embedding of the metric-based
algorithms (``model=resnet12_embedding``); with a head it is the network of MAML, ANIL, Meta-SGD, MAML++
and Reptile, its classifier ``head`` (ANIL's default ``adapt`` pattern).

Batch norm is ``BatchStatNorm`` as in Conv4 (elementary ops, batch statistics at meta-train and
meta-test, no running statistics), so the networks share one batch-norm protocol, MAML++'s per-step
copies find every norm layer (``bn1..bn3`` and ``shortcut.1`` of each block), and second-order
meta-gradients are exact under ``torch.func`` (``vmap(grad(...))``). The forward pass has no in-place
ops and no Python-side state.

Not included: MetaOptNet's DropBlock (and dropout) regularisation, which is stochastic and used only in
its long supervised-style training schedules; the network here is deterministic, so the loop and vmap
paths compute the same numbers.

Example::

    net = ResNet12(out_features=None, in_channels=3)          # 640-d embedding for ProtoNets
    z = net(torch.randn(25, 3, 84, 84))                       # (25, 640)
"""

import torch
import torch.nn.functional as F
from torch import nn

from metarun.models.batchnorm import BatchStatNorm

WIDTHS = (64, 160, 320, 640)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """3 x [3x3 conv, BN, LeakyReLU] with a 1x1 conv + BN shortcut, then 2x2 max-pooling."""

    def __init__(self, cin: int, cout: int, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope
        self.conv1, self.bn1 = _conv3x3(cin, cout), BatchStatNorm(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), BatchStatNorm(cout)
        self.conv3, self.bn3 = _conv3x3(cout, cout), BatchStatNorm(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), BatchStatNorm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), self.negative_slope)
        h = F.leaky_relu(self.bn2(self.conv2(h)), self.negative_slope)
        h = self.bn3(self.conv3(h))
        return F.max_pool2d(F.leaky_relu(h + self.shortcut(x), self.negative_slope), 2)


class ResNet12(nn.Module):
    def __init__(
        self,
        out_features: int | None,
        in_channels: int = 3,
        widths: tuple[int, ...] = WIDTHS,
        negative_slope: float = 0.1,
    ):
        super().__init__()
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of integers >= 1, got {list(widths)}")
        if not 0 <= negative_slope < 1:
            raise ValueError(f"negative_slope must be in [0, 1), got {negative_slope}")
        blocks, cin = [], in_channels
        for width in widths:
            blocks.append(ResidualBlock(cin, width, negative_slope))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.min_size = 2 ** len(widths)  # each block halves the map (floor)
        self.head = nn.Linear(widths[-1], out_features) if out_features is not None else nn.Identity()
        self.out_dim = widths[-1] if out_features is None else out_features
        # MetaOptNet's initialisation; BatchStatNorm starts at weight 1, bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"ResNet12 with {len(self.blocks)} blocks needs images of at least "
                             f"{self.min_size}x{self.min_size}, got {tuple(x.shape[-2:])}")
        return self.head(self.blocks(x).mean(dim=(2, 3)))
