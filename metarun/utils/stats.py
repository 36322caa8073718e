"""Summary statistics over test tasks."""

import math

import torch


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width, 1.96 * std / sqrt(n), over the leading dimension."""
    values = values.double().cpu()
    n = values.shape[0]
    std = values.std(dim=0, unbiased=True).item() if n > 1 else 0.0
    return values.mean(dim=0).item(), 1.96 * std / math.sqrt(n)
