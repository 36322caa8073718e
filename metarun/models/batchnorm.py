"""Batch norm from elementary ops, so higher-order gradients are exact under torch.func.

Native ``nn.BatchNorm2d`` under ``vmap(grad(...))`` returns wrong second-order meta-gradients
(off by a few percent in float64, on CPU and CUDA; tests/test_maml_gradients.py would catch it).
Written from mean, var and rsqrt, the same computation is exact. It always normalises with the statistics of the current batch, as MAML's
reference code does at meta-train and meta-test (transductive batch norm); there are no running
statistics, so ``train()``/``eval()`` cannot silently change what a model computes.
"""

import torch
from torch import nn


class BatchStatNorm(nn.Module):
    """Normalise each channel (dim 1) with the current batch's mean and biased variance."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)


def batch_norm_mode(model: nn.Module, transductive: bool = True) -> str:
    """How a network normalises, for the record in metrics.json."""
    if any(isinstance(m, BatchStatNorm) for m in model.modules()):
        if transductive:
            return "batch statistics at meta-train and meta-test (transductive)"
        return "batch statistics; each query normalised with the support set alone (non-transductive)"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "torch.nn batch norm (mode follows train()/eval())"
    return "none"
