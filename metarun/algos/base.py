"""The one interface every meta-learning algorithm implements, and what they share.

The training loop only ever calls ``meta_loss`` (a differentiable scalar over a batch of tasks)
and ``evaluate`` (per-task query metrics after 0..k adaptation steps), so it stays
algorithm-blind. An algorithm is an ``nn.Module`` that owns its network and anything else it
meta-learns, so one optimiser over ``algo.parameters()`` and one ``state_dict`` cover it all.
"""

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.episode import Episode

TASKS = ("classification", "regression")
BATCHING = ("auto", "loop", "vmap")


def task_loss(output: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def task_metric(output: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """Accuracy for classification, mean squared error for regression."""
    if task == "classification":
        return (output.argmax(dim=-1) == target).to(output.dtype).mean()
    return F.mse_loss(output, target)


def metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "mse"


class MetaAlgorithm(nn.Module):
    """Base class: holds the network and the task type; subclasses define the two methods."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.model = model
        self.task = task

    @property
    def metric(self) -> str:
        return metric_name(self.task)

    def uses_vmap(self, device: torch.device) -> bool:
        """Whether tasks run vectorised with torch.func.vmap on ``device`` (else one after another)."""
        return False

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean query loss over the episode's tasks after adaptation, and detached metrics."""
        raise NotImplementedError

    def evaluate(self, episode: Episode, steps: int) -> torch.Tensor:
        """Query metric of each task after 0..steps adaptation steps: shape (T, steps + 1)."""
        raise NotImplementedError
