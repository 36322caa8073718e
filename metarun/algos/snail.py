"""SNAIL: a simple neural attentive meta-learner.

Mishra, Rohaninejad, Chen and Abbeel, "A Simple Neural Attentive Meta-Learner", ICLR 2018. A
model-based meta-learner: nothing adapts in an inner loop; a sequence model reads a task's labelled
support examples and predicts the query's label in its activations.

The model (the paper's section 3 and appendix):

- Each example is embedded by a network of the model group (``conv4_embedding`` on Omniglot,
  ``resnet12_embedding`` on miniImageNet, ``mlp_embedding`` on sinusoid) and its label appended: a
  one-hot vector of ``ways`` for the support examples, zeros for the query. A task of N ways and K
  shots is the sequence of its N*K support pairs followed by one query: T = N*K + 1 steps.
- Blocks alternate: ``AttentionBlock(key, value)``, ``TCBlock(T, filters)``, ``AttentionBlock``, ...
  (``attention_keys``/``attention_values`` and ``tc_filters``; one more attention block than TC
  blocks). The defaults are the paper's, for Omniglot and miniImageNet alike: AttentionBlock(64, 32),
  TCBlock(T, 128), AttentionBlock(256, 128), TCBlock(T, 128), AttentionBlock(512, 256).
- ``DenseBlock(R, D)``: two causal convolutions of kernel 2 and dilation R into D filters each, f and
  g, and ``tanh(f) * sigmoid(g)`` appended to the input. ``TCBlock(T, D)`` is a DenseBlock of
  dilation 2^i for i = 1 .. ceil(log2 T), as the paper's algorithm writes it (dilation 2 first).
- ``AttentionBlock(K, V)``: affine keys and queries of size K and values of size V;
  ``softmax(q k^T / sqrt(K))`` masked causally, its read of the values appended to the input.
- A final 1x1 convolution gives the class logits (``ways``), or the regression value.
- Trained end to end (embedding included) on the cross-entropy (or squared error) of the queries.

Queries never see each other. All of a task's queries run at once: the sequence holds the support
set and then every query, and each query reads only the support set and itself. The attention mask
lets query q attend to the support positions and to q alone. The convolutions give query q the
support position ``N*K - R`` as its tap R steps back (the step before every query is the last support
example). Each query's output is then that of its own sequence ``support + query``. ``SNAILNet.sequence``
computes one such sequence literally (padded ``conv1d``, a lower-triangular mask), and the tests
check both forms against each other in float64.

Batch norm: the support set is embedded alone and each query in a batch with the support set
(``MetaAlgorithm.query_outputs``, ``transductive=False``), so one query's image cannot move another
query's embedding through the batch statistics. ``transductive=True`` is refused.

Order: SNAIL is **not** invariant to the order of the support set. Its convolutions read
positions at fixed distances, so shuffling the support set changes the prediction. The tests check
that it does. Each attention block alone is invariant at the query positions: a query attends to
the support set as a set. The sampler draws the support set in a fixed class-major order, as the
paper's sequences are drawn; that order is part of the protocol.

Sinusoid regression (not in the paper, which has classification and RL): the pair of each support
point is (embedded x, [y, 1]) and the query's (embedded x, [0, 0]). The second entry says whether
y is given, since 0 is also a value y can take. The output is one number and the loss is the
squared error.

Deviations from the paper:

- The embedding is the model group's network: Conv4 with max-pooling for Omniglot (Vinyals et al.'s,
  as the paper's; reimplementations end it in one 64-unit fully connected layer, which
  ``conv4_embedding`` lacks: unconfirmed against the paper's appendix), metarun's ResNet-12 for
  miniImageNet (the paper used its own ResNet with a 384-d output).
- The optimiser, meta-batch and training length of the experiment configs are metarun's: the paper's
  text we carry does not state them.
- Batch norm uses batch statistics at meta-test as at meta-training, as elsewhere in metarun.
- Every query of a training task is a prediction target (the paper's sequences have one query each;
  the loss over Q queries is the mean of Q such sequences' losses).

Example::

    algo = SNAIL(Conv4(out_features=None, variant="maxpool"), "classification", ways=5, shots=1)
    loss, metrics = algo.meta_loss(episode)
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algos.base import PredictsQueries, problem_loss, problem_metric
from metarun.models.batchnorm import BatchStatNorm

PAPER_ATTENTION_KEYS = (64, 256, 512)
PAPER_ATTENTION_VALUES = (32, 128, 256)
PAPER_TC_FILTERS = (128, 128)


def dilations(length: int) -> list[int]:
    """TCBlock(T, D)'s dilations: 2^i for i = 1 .. ceil(log2 T)."""
    return [2 ** i for i in range(1, math.ceil(math.log2(length)) + 1)] if length > 1 else []


def query_mask(support: int, queries: int, device=None) -> torch.Tensor:
    """(S+Q, S+Q) bool, True where a position may read another: each support position reads the support
    positions up to itself, each query the whole support set and itself."""
    i = torch.arange(support + queries, device=device)[:, None]
    j = torch.arange(support + queries, device=device)[None]
    return (j <= i) & ((j < support) | (j == i))


def earlier(x: torch.Tensor, support: int, dilation: int) -> torch.Tensor:
    """For each position of the query layout, the features ``dilation`` steps back in its own sequence
    (zeros before the start): position t - dilation for a support position t; ``support - dilation`` for
    every query, whose own sequence has the query at position ``support``."""
    padded = torch.cat([x.new_zeros(dilation, x.shape[-1]), x[:support]])
    queries = x.shape[0] - support
    return torch.cat([padded[:support], padded[support:support + 1].expand(queries, -1)])


class DenseBlock(nn.Module):
    """Causal convolutions (kernel 2, ``dilation``) into ``filters`` f and g; ``tanh(f) * sigmoid(g)`` appended."""

    def __init__(self, channels: int, dilation: int, filters: int):
        super().__init__()
        self.dilation, self.filters = dilation, filters
        self.conv = nn.Conv1d(channels, 2 * filters, kernel_size=2, dilation=dilation)  # f and g, stacked
        self.out_channels = channels + filters

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        f, g = h.split(self.filters, dim=-1)
        return torch.tanh(f) * torch.sigmoid(g)

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """One sequence (L, C): a left-padded ``conv1d``."""
        h = F.conv1d(F.pad(x.T[None], (self.dilation, 0)), self.conv.weight, self.conv.bias, dilation=self.dilation)
        return torch.cat([x, self._gate(h[0].T)], -1)

    def forward(self, x: torch.Tensor, support: int) -> torch.Tensor:
        """The query layout (S+Q, C). Kernel tap 0 reads ``dilation`` steps back, tap 1 the position itself."""
        weight = self.conv.weight
        h = F.linear(earlier(x, support, self.dilation), weight[:, :, 0]) + F.linear(x, weight[:, :, 1], self.conv.bias)
        return torch.cat([x, self._gate(h)], -1)


class AttentionBlock(nn.Module):
    """Key-query-value attention over the earlier positions; the read values appended."""

    def __init__(self, channels: int, key_size: int, value_size: int):
        super().__init__()
        self.key = nn.Linear(channels, key_size)
        self.query = nn.Linear(channels, key_size)
        self.value = nn.Linear(channels, value_size)
        self.scale = 1.0 / math.sqrt(key_size)
        self.out_channels = channels + value_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = (self.query(x) @ self.key(x).T) * self.scale
        probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return torch.cat([x, probs @ self.value(x)], -1)


class SNAILNet(nn.Module):
    """The blocks after the embedding: attention and TC blocks alternating, then a 1x1 convolution."""

    def __init__(self, channels: int, length: int, out_features: int, attention_keys=PAPER_ATTENTION_KEYS,
                 attention_values=PAPER_ATTENTION_VALUES, tc_filters=PAPER_TC_FILTERS):
        super().__init__()
        attention_keys, attention_values, tc_filters = tuple(attention_keys), tuple(attention_values), tuple(tc_filters)
        if len(attention_keys) != len(attention_values):
            raise ValueError(f"attention_keys and attention_values must have one entry per attention block, got "
                             f"{len(attention_keys)} and {len(attention_values)}")
        if len(attention_keys) != len(tc_filters) + 1:
            raise ValueError(f"attention and TC blocks alternate, starting and ending with attention: attention_keys "
                             f"needs one entry more than tc_filters, got {len(attention_keys)} and {len(tc_filters)}")
        if any(not isinstance(n, int) or n < 1 for n in (*attention_keys, *attention_values, *tc_filters)):
            raise ValueError("attention_keys, attention_values and tc_filters must be integers >= 1")
        blocks = []
        for i, (key, value) in enumerate(zip(attention_keys, attention_values)):
            blocks.append(AttentionBlock(channels, key, value))
            channels = blocks[-1].out_channels
            if i < len(tc_filters):
                for dilation in dilations(length):
                    blocks.append(DenseBlock(channels, dilation, tc_filters[i]))
                    channels = blocks[-1].out_channels
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv1d(channels, out_features, kernel_size=1)
        self.length = length

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.out.weight[:, :, 0], self.out.bias)

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (L, out) of one sequence (L, C) at every position, each from that position and earlier ones."""
        mask = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool, device=x.device).tril()
        for block in self.blocks:
            x = block.sequence(x) if isinstance(block, DenseBlock) else block(x, mask)
        return self._head(x)

    def forward(self, x: torch.Tensor, support: int) -> torch.Tensor:
        """Outputs (S+Q, out) of the query layout (S+Q, C): the support set's S positions, then Q queries,
        each query's output that of the sequence ``support + that query``."""
        mask = query_mask(support, x.shape[0] - support, x.device)
        for block in self.blocks:
            x = block(x, support) if isinstance(block, DenseBlock) else block(x, mask)
        return self._head(x)


class SNAIL(PredictsQueries):
    """SNAIL over a headless embedding network (see the module docstring). ``ways`` and ``shots`` size the
    network for sequences of ``ways * shots + 1`` steps (``shots + 1`` for regression, where ``ways`` is None)."""

    embeds = True  # the network is a headless embedding; SNAIL's own layers make the prediction
    fixed_task_shape = True  # the network is sized for the test tasks' ways and shots: training tasks must match

    def __init__(self, model: nn.Module, problem: str, ways: int | None = None, shots: int = 1,
                 attention_keys: tuple[int, ...] = PAPER_ATTENTION_KEYS,
                 attention_values: tuple[int, ...] = PAPER_ATTENTION_VALUES,
                 tc_filters: tuple[int, ...] = PAPER_TC_FILTERS, batching: str = "auto", transductive: bool = False):
        if transductive:
            raise ValueError("transductive must be false: SNAIL predicts each query from the support set and itself "
                             "alone, so a query's batch-norm statistics may not include the other queries")
        super().__init__(model, problem, transductive, batching)
        net = getattr(model, "net", None)
        if isinstance(getattr(model, "head", None), nn.Linear) or (isinstance(net, nn.Sequential) and len(net)
                                                                    and isinstance(net[-1], nn.Linear)):
            raise ValueError(f"SNAIL needs a headless embedding network as model, but {type(model).__name__} ends in a "
                             f"linear head")
        if not isinstance(getattr(model, "out_dim", None), int):
            raise ValueError(f"SNAIL needs the embedding's width, but {type(model).__name__} has no out_dim")
        if not isinstance(shots, int) or shots < 1:
            raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
        if problem == "classification":
            if not isinstance(ways, int) or ways < 2:
                raise ValueError(f"ways must be an integer >= 2 for classification, got {ways!r}")
            label_size, out_features, self.support_size = ways, ways, ways * shots
        else:
            label_size, out_features, self.support_size = 2, 1, shots  # [y, 1] given, [0, 0] hidden
        self.ways, self.shots = ways, shots
        self.net = SNAILNet(model.out_dim + label_size, self.support_size + 1, out_features,
                            attention_keys, attention_values, tc_filters)
        self._batch_norm = any(isinstance(m, BatchStatNorm) for m in model.modules())

    # -- one task, no task dimension --------------------------------------------------------------
    def embed(self, support_x: torch.Tensor, query_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query embeddings: each query with the support set alone where the network has batch norm."""
        if not self._batch_norm:
            z = self.model(torch.cat([support_x, query_x]))
            return z[: support_x.shape[0]], z[support_x.shape[0]:]
        return self.model(support_x), self.query_outputs(self.model, support_x, query_x)

    def labels(self, support_y: torch.Tensor, queries: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The label part of each step: one-hot for the support set and zeros for the queries (classification);
        ``[y, 1]`` and ``[0, 0]`` (regression)."""
        if self.problem == "classification":
            onehot = (support_y[:, None] == torch.arange(self.ways, device=support_y.device)).to(like.dtype)
            return onehot, like.new_zeros(queries, self.ways)
        given = torch.cat([support_y.to(like.dtype), torch.ones_like(support_y, dtype=like.dtype)], -1)
        return given, like.new_zeros(queries, 2)

    def sequence_inputs(self, support_x, support_y, query_x) -> torch.Tensor:
        """The query layout's inputs (S+Q, C): the support pairs, then every query with its label hidden."""
        if support_x.shape[0] != self.support_size:
            what = f"{self.ways}-way {self.shots}-shot" if self.problem == "classification" else f"{self.shots}-shot"
            raise ValueError(f"this SNAIL is sized for {what} tasks ({self.support_size} support examples), "
                             f"got a task with {support_x.shape[0]}")
        support_z, query_z = self.embed(support_x, query_x)
        support_label, query_label = self.labels(support_y, query_x.shape[0], support_z)
        return torch.cat([torch.cat([support_z, support_label], -1), torch.cat([query_z, query_label], -1)])

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        """Each query's prediction (Q, ways) logits or (Q, 1), from the support set and that query alone."""
        x = self.sequence_inputs(support_x, support_y, query_x)
        return self.net(x, self.support_size)[self.support_size:]

    def _task(self, support_x, support_y, query_x, query_y, ways: int | None = None):
        """One task's query loss and metric (``ways`` is the network's own, ``self.ways``)."""
        out = self.predict(support_x, support_y, query_x)
        return problem_loss(out, query_y, self.problem), problem_metric(out, query_y, self.problem).detach()
