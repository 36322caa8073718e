"""Fully connected networks of MAML's experiments.

- Sinusoid regression: 1-40-40-1 with ReLU (the default).
- Omniglot, "MAML, fully connected" (Finn et al. 2017): 784-256-128-64-64-N, each hidden layer
  followed by batch norm and ReLU (``batch_norm=True``); images are flattened.

``out_features=None`` leaves out the last linear layer: the network is then the embedding of the last
hidden layer (``model=mlp_embedding``, SNAIL's embedding of sinusoid inputs).
"""

import torch
from torch import nn

from metarun.models.batchnorm import BatchStatNorm


class MLP(nn.Module):
    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int | None = 1,
                 batch_norm: bool = False):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), BatchStatNorm(h), nn.ReLU()] if batch_norm else [nn.Linear(width, h), nn.ReLU()]
            width = h
        if out_features is not None:
            layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)
        self.out_dim = width if out_features is None else out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1) if x.dim() > 2 else x)
