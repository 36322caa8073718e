"""Prototypical Networks.

Snell, Swersky and Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017 (reference
code: jakesnell/prototypical-networks). A headless network embeds support and query images; each
class's prototype is the mean of its support embeddings; a query's logits are the negative
squared Euclidean distances to the prototypes (``distance="euclidean"``, the paper's choice) or
the cosine similarities to them (``distance="cosine"``, times ``cosine_scale``); the loss is the
cross-entropy of the queries. Nothing adapts at meta-test: ``evaluate`` returns (T, 1).
``cosine_scale`` is 1 by default (plain cosine, the paper's comparison); cosines lie in [-1, 1], so
their softmax over many ways stays flat, and a larger scale (~10) lets the loss sharpen it.

Omniglot protocol (the paper): Conv4 with max-pooling, 64-d embedding (``model=conv4_embedding``);
trained on 60-way episodes with 5 queries per class and as many shots as at test, one episode per
update, Adam 1e-3 halved every 2000 episodes; rotations as classes in every split; 1000 test
episodes::

    metarun train algo=protonet model=conv4_embedding data.split=snell data.ways=5 data.shots=1 \\
        data.train_ways=60 data.train_queries=5 train.meta_batch_size=1 scheduler=step test.episodes=1000

Batch norm follows ``algo.transductive`` (see ``metarun.algos.metric``); unlike the reference code,
meta-test normalises with batch statistics, since metarun's batch norm keeps no running ones.

Example::

    algo = ProtoNet(Conv4(out_features=None, variant="maxpool"), problem="classification")
    loss, metrics = algo.meta_loss(episode)
    loss.backward()
"""

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algos.metric import MetricBased

DISTANCES = ("euclidean", "cosine")


def class_means(support_z: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean embedding of each class (ways, D). A one-hot product, not indexing, so it runs under vmap."""
    onehot = (support_y[:, None] == torch.arange(ways, device=support_y.device)).to(support_z.dtype)
    return onehot.T @ support_z / onehot.sum(0)[:, None]


class ProtoNet(MetricBased):
    def __init__(self, model: nn.Module, problem: str, distance: str = "euclidean", cosine_scale: float = 1.0,
                 batching: str = "auto", transductive: bool = True):
        super().__init__(model, problem, batching=batching, transductive=transductive)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if cosine_scale <= 0:
            raise ValueError(f"cosine_scale must be positive, got {cosine_scale}")
        self.distance = distance
        self.cosine_scale = cosine_scale

    def logits(self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor,
               ways: int) -> torch.Tensor:
        """Logits (Q, ways) of one task's queries against its class prototypes."""
        prototypes = class_means(support_z, support_y, ways)
        if self.distance == "euclidean":
            return -(query_z[:, None, :] - prototypes[None]).pow(2).sum(-1)
        return self.cosine_scale * F.normalize(query_z, dim=-1) @ F.normalize(prototypes, dim=-1).T

    def task_log_probs(self, support_z, support_y, query_z, ways):
        return F.log_softmax(self.logits(support_z, support_y, query_z, ways), dim=-1)
