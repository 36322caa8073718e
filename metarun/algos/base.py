"""The one interface every meta-learning algorithm implements, and what they share.

The training loop only ever calls ``meta_loss`` (a differentiable scalar over a batch of tasks)
and ``evaluate`` (per-task query metrics after 0..k adaptation steps), so it stays
algorithm-blind. An algorithm is an ``nn.Module`` that owns its network and anything else it
meta-learns, so one optimiser over ``algo.parameters()`` and one ``state_dict`` cover it all.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

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
    """Base class: holds the network and the task type; subclasses define the two methods.

    ``transductive`` is the batch-norm protocol for query sets: True normalises all queries of a
    task as one batch (MAML's reference code); False normalises each query in a batch with the
    support set alone (Nichol et al. 2018), so no query sees another. ``batching`` is how a batch
    of tasks runs: one after another (``loop``) or vectorised (``vmap``); ``auto`` is vmap on CUDA
    and the loop on CPU. Both give the same numbers (the float64 tests of every algorithm).
    """

    eval_inner_steps = 0  # adaptation steps at meta-validation and meta-test

    def __init__(self, model: nn.Module, task: str, transductive: bool = True, batching: str = "auto"):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if batching not in BATCHING:
            raise ValueError(f"algo.batching must be one of {BATCHING}, got {batching!r}")
        self.model = model
        self.task = task
        self.transductive = transductive
        self.batching = batching

    def query_outputs(self, forward: Callable[[torch.Tensor], torch.Tensor], support_x: torch.Tensor,
                      query_x: torch.Tensor) -> torch.Tensor:
        """``forward`` on one task's queries under the batch-norm protocol (see ``transductive``)."""
        if self.transductive or query_x.shape[0] == 0:
            return forward(query_x)
        return vmap(lambda q: forward(torch.cat([support_x, q[None]]))[-1])(query_x)

    @property
    def metric(self) -> str:
        return metric_name(self.task)

    def uses_vmap(self, device: torch.device) -> bool:
        """Whether tasks run vectorised with torch.func.vmap on ``device`` (else one after another)."""
        if self.batching == "auto":
            return device.type == "cuda"
        return self.batching == "vmap"

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn when the meta-optimiser is not the one this algorithm's update is defined with."""

    def meta_loss(self, episode: Episode, iteration: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss whose gradient the meta-optimiser follows, and detached metrics, for one batch of
        tasks at meta-training iteration ``iteration`` (for schedules inside the algorithm)."""
        raise NotImplementedError

    def evaluate(self, episode: Episode, steps: int) -> torch.Tensor:
        """Query metric of each task after 0..steps adaptation steps: shape (T, steps + 1)."""
        raise NotImplementedError
