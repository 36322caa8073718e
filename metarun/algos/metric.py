"""What the metric-based algorithms share (Prototypical Networks, Matching Networks).

A metric-based algorithm does not adapt: it embeds a task's support and query images with one
headless network and classifies each query by a differentiable comparison with the labelled
support embeddings. A subclass defines that comparison (``task_log_probs``); this module owns the
rest: the checks on the problem type and network, the embedding under the batch-norm protocol, the
cross-entropy on the queries, and running a batch of tasks one after another (``loop``) or all
at once with ``torch.func.vmap`` (``vmap``; ``auto`` times both and keeps the faster, as
``metarun.execution`` decides).

Batch norm (``transductive``):

- ``True``: support and queries of a task go through the network as one batch, as Snell's
  reference code does in training (``torch.cat([xs, xq])`` through the encoder).
- ``False``: the support set is embedded alone and each query in a batch with the support set
  (``MetaAlgorithm.query_outputs``), so no query's embedding depends on another query.

Deviation: the reference code evaluates in ``model.eval()``, normalising with running statistics
collected in training. metarun's batch norm has no running statistics (``BatchStatNorm``): it
always normalises with the current batch, at meta-training and meta-test alike, under the
protocol above.
"""

import torch
from torch import nn

from metarun.algos.base import MetaAlgorithm, problem_metric
from metarun.data.episode import Episode


class MetricBased(MetaAlgorithm):
    capturable = True
    eval_inner_steps = 0  # nothing adapts: evaluate reports the query accuracy as embedded
    problems = ("classification",)  # queries are classified by their labelled support examples
    embeds = True  # the network is a headless embedding

    def __init__(self, model: nn.Module, problem: str, batching: str = "auto", transductive: bool = True):
        name = type(self).__name__
        if problem not in self.problems:
            raise ValueError(f"{name} classifies queries by their labelled support examples: problem must be "
                             f"'classification', got {problem!r}")
        if isinstance(getattr(model, "head", None), nn.Linear):
            raise ValueError(f"{name} needs a headless embedding network as model (such as Conv4(out_features=None)), "
                             f"but {type(model).__name__} ends in a linear head")
        super().__init__(model, problem, transductive, batching)

    # -- one task, no task dimension --------------------------------------------------------------
    def embed(self, support_x: torch.Tensor, query_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query embeddings of one task under the batch-norm protocol."""
        if self.transductive:
            z = self.model(torch.cat([support_x, query_x]))
            return z[: support_x.shape[0]], z[support_x.shape[0]:]
        return self.model(support_x), self.query_outputs(self.model, support_x, query_x)

    def task_log_probs(self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor,
                       ways: int) -> torch.Tensor:
        """Log-probabilities (Q, ways) of each query's class, from the embeddings of one task."""
        raise NotImplementedError

    def _task(self, support_x, support_y, query_x, query_y, ways: int):
        support_z, query_z = self.embed(support_x, query_x)
        log_probs = self.task_log_probs(support_z, support_y, query_z, ways)
        loss = nn.functional.nll_loss(log_probs, query_y)
        return loss, problem_metric(log_probs, query_y, self.problem).detach()

    # -- a batch of tasks -------------------------------------------------------------------------
    def _over_tasks(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and accuracy of every task: two tensors of shape (T,)."""
        if episode.query_x.shape[1] == 0:
            raise ValueError(f"{type(self).__name__} learns from query images, but the episode's tasks have none")
        # ways is the episode's own (training tasks may have more ways than test tasks). Nothing
        # inside differentiates, so the task's code is the same on both paths (functional unused).
        return self.over_tasks(lambda *task, functional: self._task(*task, episode.ways),
                               episode.support_x, episode.support_y, episode.query_x, episode.query_y)

    def meta_loss(self, episode: Episode, iteration: int = 0):
        losses, metrics = self._over_tasks(episode)
        return losses.mean(), {"loss": losses.detach().mean(), self.metric: metrics.mean()}

    def evaluate(self, episode: Episode, steps: int = 0) -> torch.Tensor:
        """Query accuracy of each task, shape (T, 1): there are no adaptation steps to report."""
        if steps != 0:
            raise ValueError(f"{type(self).__name__} does not adapt: steps must be 0, got {steps}")
        with torch.no_grad():
            return self._over_tasks(episode)[1][:, None]
