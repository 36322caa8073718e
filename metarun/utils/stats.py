"""Summary statistics over test tasks."""

import math

import torch


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width, 1.96 * std / sqrt(n), over the leading dimension.

    With one value there is no interval: the half-width is NaN (null in metrics.json, n/a in the
    results table), never a confident-looking 0."""
    values = values.double().cpu()
    n = values.shape[0]
    if n < 2:
        return values.mean(dim=0).item(), math.nan
    return values.mean(dim=0).item(), 1.96 * values.std(dim=0, unbiased=True).item() / math.sqrt(n)
