"""What the metric-based algorithms share (Prototypical Networks, Matching Networks).

A metric-based algorithm does not adapt: it embeds a task's support and query images with one
headless network and classifies each query by a differentiable comparison with the labelled
support embeddings. A subclass defines that comparison (``task_log_probs``); this module owns the
rest: the checks on the problem type and network, the embedding under the batch-norm protocol, the
cross-entropy on the queries. Running a batch of tasks on the chosen path (``metarun.execution``)
and averaging it into the meta-loss is ``base.PredictsQueries``', shared with SNAIL.

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

from metarun.algos.base import PredictsQueries, problem_metric


class MetricBased(PredictsQueries):
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
