"""The one interface every meta-learning algorithm implements, and what they share.

The training loop only ever calls ``meta_loss`` (a differentiable scalar over a batch of tasks)
and ``evaluate`` (per-task query metrics after 0..k adaptation steps), so it stays
algorithm-blind. An algorithm is an ``nn.Module`` that owns its network and anything else it
meta-learns, so one optimiser over ``algo.parameters()`` and one ``state_dict`` cover it all.
"""

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from metarun.data.episode import Episode
from metarun.utils import stop

# The kind of problem a task poses (a few-shot *task* is one draw of support and query sets).
PROBLEMS = ("classification", "regression")
BATCHING = ("auto", "loop", "vmap")


def problem_loss(output: torch.Tensor, target: torch.Tensor, problem: str) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for regression."""
    if problem == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def problem_metric(output: torch.Tensor, target: torch.Tensor, problem: str) -> torch.Tensor:
    """Accuracy for classification, mean squared error for regression."""
    if problem == "classification":
        return (output.argmax(dim=-1) == target).to(output.dtype).mean()
    return F.mse_loss(output, target)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stack_tasks(per_task: list):
    """Per-task results (tensors, or tuples and dicts of them) stacked along a new task dimension, as vmap would."""
    first = per_task[0]
    if isinstance(first, dict):
        return {k: torch.stack([r[k] for r in per_task]) for k in first}
    if isinstance(first, tuple):
        return tuple(stack_tasks(list(parts)) for parts in zip(*per_task))
    return torch.stack(per_task)


def metric_name(problem: str) -> str:
    return "accuracy" if problem == "classification" else "mse"


class MetaAlgorithm(nn.Module):
    """Base class: holds the network and the problem type (``PROBLEMS``); subclasses define the two methods.

    ``transductive`` is the batch-norm protocol for query sets: True normalises all queries of a
    task as one batch (MAML's reference code); False normalises each query in a batch with the
    support set alone (Nichol et al. 2018), so no query sees another. ``batching`` is how a batch
    of tasks runs: one after another (``loop``) or vectorised (``vmap``). Both give the same numbers
    (the float64 tests of every algorithm), but which is faster depends on the device and the
    protocol (vmap gains most where each task is small), so ``auto`` times both on the run's first
    meta-batch and keeps the faster one (``tune_batching``), as ``cudnn.benchmark`` does for kernels.
    Until tuned, ``auto`` means vmap on CUDA and the loop on CPU.
    """

    eval_inner_steps = 0  # adaptation steps at meta-validation and meta-test
    problems = PROBLEMS  # the problem types it learns
    embeds = False  # True: the network must be a headless embedding (no linear head)
    learns_from_queries = True  # False: the meta-loss needs no query set in the training tasks (Reptile)

    def __init__(self, model: nn.Module, problem: str, transductive: bool = True, batching: str = "auto"):
        super().__init__()
        if problem not in PROBLEMS:
            raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.model = model
        self.problem = problem
        self.transductive = transductive
        self.batching = batching
        self.tuned_batching: str | None = None  # the path ``auto`` chose (tune_batching or a checkpoint)

    def query_outputs(self, forward: Callable[[torch.Tensor], torch.Tensor], support_x: torch.Tensor,
                      query_x: torch.Tensor) -> torch.Tensor:
        """``forward`` on one task's queries under the batch-norm protocol (see ``transductive``)."""
        if self.transductive or query_x.shape[0] == 0:
            return forward(query_x)
        return vmap(lambda q: forward(torch.cat([support_x, q[None]]))[-1])(query_x)

    @property
    def metric(self) -> str:
        return metric_name(self.problem)

    def path(self, device: torch.device) -> str:
        """The execution path a batch of tasks takes on ``device``: ``loop`` or ``vmap``."""
        if self.batching != "auto":
            return self.batching
        if self.tuned_batching is not None:
            return self.tuned_batching
        return "vmap" if device.type == "cuda" else "loop"

    def over_tasks(self, fn: Callable, *batch: torch.Tensor):
        """``fn(*task, functional=...)`` for every task of ``batch`` (tensors with a leading task
        dimension), as the execution path says: all at once under ``torch.func.vmap``
        (``functional=True``: ``fn`` must use torch.func inside) or one after another
        (``functional=False``). The outputs are stacked over tasks either way."""
        if self.path(batch[0].device) == "vmap":
            return vmap(lambda *task: fn(*task, functional=True))(*batch)
        return stack_tasks([stop.checked(fn(*task, functional=False)) for task in zip(*batch)])

    def tune_batching(self, episode: Episode, iteration: int = 0, repeats: int = 2) -> dict[str, float]:
        """For ``batching="auto"``: time one meta-gradient (``meta_loss`` and its backward pass) of
        ``episode`` on each path, keep the faster in ``tuned_batching``, and return the seconds each
        took (best of ``repeats``, after one warm-up). Parameters, their ``.grad`` and the random
        number streams are left as they were, so tuning changes no number of the run. A path that
        runs out of GPU memory loses. Does nothing for a fixed ``batching``."""
        if self.batching != "auto":
            return {}
        device = episode.support_x.device
        params = [p for p in self.parameters() if p.requires_grad]
        seconds = {path: float("inf") for path in ("loop", "vmap")}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for path in ("loop", "vmap"):
                self.tuned_batching = path
                try:
                    for attempt in range(repeats + 1):
                        synchronize(device)
                        tic = time.perf_counter()
                        loss, _ = self.meta_loss(episode, iteration)
                        torch.autograd.grad(loss, params, allow_unused=True)
                        synchronize(device)
                        if attempt:
                            seconds[path] = min(seconds[path], time.perf_counter() - tic)
                except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError is newer than torch 2.4)
                    seconds[path] = float("inf")
                    torch.cuda.empty_cache()
        self.tuned_batching = min(seconds, key=seconds.get)
        return seconds

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn when the meta-optimiser is not the one this algorithm's update is defined with."""

    def meta_loss(self, episode: Episode, iteration: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss whose gradient the meta-optimiser follows, and detached metrics, for one batch of
        tasks at meta-training iteration ``iteration`` (for schedules inside the algorithm)."""
        raise NotImplementedError

    def evaluate(self, episode: Episode, steps: int) -> torch.Tensor:
        """Query metric of each task after 0..steps adaptation steps: shape (T, steps + 1)."""
        raise NotImplementedError
