"""Conv4: the four-block convolutional network of the meta-learning literature.

Two variants, both 4 x [3x3 conv, batch norm, ReLU]:
- ``stride``: MAML's Omniglot network (Finn et al. 2017, reference code): stride-2 convolutions,
  no pooling, features averaged over the final spatial map.
- ``maxpool``: the Vinyals/Snell/MAML-miniImageNet network: stride-1 convolutions, each block
  followed by 2x2 max-pooling, features flattened.

``final_map`` says how the last feature map becomes the feature vector: ``"mean"`` averages it,
``"flatten"`` flattens it, ``None`` takes the variant's published choice (``stride``: mean, as MAML's
reference code; ``maxpool``: flatten). The strided network with ``final_map="flatten"`` is Nichol et
al.'s Reptile network (256 features on Omniglot).

``out_features=None`` leaves out the linear head: the network is then the embedding of the
metric-based algorithms (ProtoNets, Matching Networks), 64-d on 28x28 Omniglot with max-pooling.
"""

import torch
from torch import nn

from metarun.models.batchnorm import BatchStatNorm

VARIANTS = ("stride", "maxpool")
FINAL_MAPS = ("mean", "flatten")
PUBLISHED_FINAL_MAP = {"stride": "mean", "maxpool": "flatten"}


class Conv4(nn.Module):
    def __init__(
        self,
        out_features: int | None,
        in_channels: int = 1,
        hidden: int = 64,
        variant: str = "stride",
        image_size: int = 28,
        final_map: str | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if final_map is not None and final_map not in FINAL_MAPS:
            raise ValueError(f"final_map must be one of {FINAL_MAPS} or None (the variant's own), got {final_map!r}")
        self.variant = variant
        self.final_map = final_map if final_map is not None else PUBLISHED_FINAL_MAP[variant]
        stride = 2 if variant == "stride" else 1
        blocks = []
        for i in range(4):
            layers = [
                nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, stride=stride, padding=1),
                BatchStatNorm(hidden),
                nn.ReLU(),
            ]
            if variant == "maxpool":
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        with torch.no_grad():
            dim = self._embed(torch.zeros(2, in_channels, image_size, image_size)).shape[1]
        self.head = nn.Linear(dim, out_features) if out_features is not None else nn.Identity()
        self.out_dim = dim if out_features is None else out_features

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return h.flatten(1) if self.final_map == "flatten" else h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._embed(x))
