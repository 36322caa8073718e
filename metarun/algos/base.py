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

from metarun import execution
from metarun.data.episode import Episode
from metarun.execution import synchronize  # noqa: F401  (benchmarks time with it)

# The kind of problem a task poses (a few-shot *task* is one draw of support and query sets).
PROBLEMS = ("classification", "regression")
BATCHING = ("auto", "loop", "vmap", "threads", "graphs")


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


def metric_name(problem: str) -> str:
    return "accuracy" if problem == "classification" else "mse"


class MetaAlgorithm(nn.Module):
    """Base class: holds the network and the problem type (``PROBLEMS``); subclasses define the two methods.

    ``transductive`` is the batch-norm protocol for query sets: True normalises all queries of a
    task as one batch (MAML's reference code); False normalises each query in a batch with the
    support set alone (Nichol et al. 2018), so no query sees another. ``batching`` is how a batch
    of tasks runs: one after another (``loop``) or vectorised (``vmap``); with ``auto``,
    ``metarun.execution`` decides per phase and shape and sets ``tuned_batching`` around each call.
    Until decided, ``auto`` means vmap on CUDA and the loop on CPU.
    """

    eval_inner_steps = 0  # adaptation steps at meta-validation and meta-test
    problems = PROBLEMS  # the problem types it learns
    embeds = False  # True: the network must be a headless embedding (no linear head)
    learns_from_queries = True  # False: the meta-loss needs no query set in the training tasks (Reptile)
    capturable = False  # the meta-loss is the same function at every iteration, without random draws (cuda_graphs)
    fixed_task_shape = False  # True: the network is sized for the test tasks' ways and shots; training tasks match

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
        self.execution = None  # the run's metarun.execution.Execution (the trainer sets it): evaluation asks it

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
        """The execution path a batch of tasks takes on ``device``: ``loop``, ``vmap`` or ``threads``
        (which ``metarun.execution`` runs as loops on worker threads; a direct call runs it as the loop)."""
        if self.batching != "auto":
            return self.batching
        if self.tuned_batching is not None:
            return self.tuned_batching
        return "vmap" if device.type == "cuda" else "loop"

    def over_tasks(self, fn: Callable, *batch: torch.Tensor):
        """``fn(*task, functional=...)`` for every task of ``batch`` on this algorithm's path
        (``metarun.execution.over_tasks``); outputs stacked over tasks."""
        return execution.over_tasks(fn, batch, self.path(batch[0].device))

    def tune_batching(self, episode: Episode, iteration: int = 0) -> dict[str, float]:
        """For ``batching="auto"``: race the two paths on the meta-gradient of ``episode``
        (``metarun.execution``), keep the winner in ``tuned_batching`` and return each path's best
        seconds. Changes no parameter, ``.grad`` or random stream. Does nothing for a fixed ``batching``."""
        if self.batching != "auto":
            return {}
        decision = execution.Execution(clock=lambda: time.perf_counter()).tune(self, "train", episode, iteration)
        self.tuned_batching = decision["path"]
        return decision["seconds"]

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn when the meta-optimiser is not the one this algorithm's update is defined with."""

    def meta_loss(self, episode: Episode, iteration: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss whose gradient the meta-optimiser follows, and detached metrics, for one batch of
        tasks at meta-training iteration ``iteration`` (for schedules inside the algorithm)."""
        raise NotImplementedError

    def evaluate(self, episode: Episode, steps: int) -> torch.Tensor:
        """Query metric of each task after 0..steps adaptation steps: shape (T, steps + 1)."""
        raise NotImplementedError


class PredictsQueries(MetaAlgorithm):
    """What the algorithms without an inner loop share (metric-based: ProtoNets, Matching Networks; model-based:
    SNAIL): a subclass gives one task's query loss and metric, ``_task(support_x, support_y, query_x, query_y,
    ways)``; this runs it over a batch of tasks on the algorithm's path, averages it into the meta-loss and
    reports each task's metric as (T, 1)."""

    eval_inner_steps = 0  # nothing adapts: evaluate reports the query metric as predicted
    capturable = True  # the same function at every iteration, without random draws (cuda_graphs)

    def _task(self, support_x, support_y, query_x, query_y, ways: int):
        raise NotImplementedError

    def _over_tasks(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and metric of every task: two tensors of shape (T,)."""
        if episode.query_x.shape[1] == 0:
            raise ValueError(f"{type(self).__name__} learns from query examples, but the episode's tasks have none")
        # ways is the episode's own (training tasks may have more ways than test tasks). Nothing
        # inside differentiates, so the task's code is the same on both paths (functional unused).
        return self.over_tasks(lambda *task, functional: self._task(*task, episode.ways),
                               episode.support_x, episode.support_y, episode.query_x, episode.query_y)

    def meta_loss(self, episode: Episode, iteration: int = 0):
        losses, metrics = self._over_tasks(episode)
        return losses.mean(), {"loss": losses.detach().mean(), self.metric: metrics.mean()}

    def evaluate(self, episode: Episode, steps: int = 0) -> torch.Tensor:
        """Query metric of each task, shape (T, 1): there are no adaptation steps to report."""
        if steps != 0:
            raise ValueError(f"{type(self).__name__} does not adapt: steps must be 0, got {steps}")
        with torch.no_grad():
            return self._over_tasks(episode)[1][:, None]
