"""Matching Networks.

Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra, "Matching Networks for One Shot
Learning", NeurIPS 2016. A query x̂ attends over the support set with a softmax of cosine
similarities, a(x̂, x_i) = softmax_i cos(f(x̂), g(x_i)), and its class distribution is the
attention mass on each class, p(y | x̂) = Σ_i a(x̂, x_i) onehot(y_i); the loss is the NLL of the
queries. ``log p`` is computed as a difference of log-sum-exps of the cosines, so it is exact and
never the log of an underflowed zero. Nothing adapts at meta-test: ``evaluate`` returns (T, 1).

Full-context embeddings (``fce=True``, the paper's appendix A): with f' = g' the network,
- g(x_i, S) = g'(x_i) + h→_i + h←_i, a bidirectional LSTM over the support embeddings in order;
- f(x̂, S) = h_K after ``fce_steps`` (K) steps of an attention LSTM over g(S):
  ĥ_k, c_k = LSTM(f'(x̂), [h_{k-1}, r_{k-1}], c_{k-1});  h_k = ĥ_k + f'(x̂);
  r_k = Σ_i softmax_i(h_k · g(x_i)) g(x_i).
  The paper does not state K; the default is 5. The LSTM starts from ĥ_0 = c_0 = 0, so h_0 = f'(x̂) and r_0 is the read it attends to.
  ``LSTM(x, [h, r], c)`` is one LSTM cell with input [x, r] and hidden state h: its gates are
  the same linear function of (x, h, r) as the paper's.
All LSTMs have the embedding's width (``model.out_dim``) and belong to this module, so the
meta-optimiser and the checkpoint cover them. They are computed from elementary ops
(``VmapLSTMCell``): ``nn.LSTM`` and ``nn.LSTMCell`` have no ``torch.func.vmap`` batching rule.

Omniglot: the paper's Omniglot results (98.1 / 98.9 / 93.8 / 98.5) are without FCE (its table
shows FCE on miniImageNet only), with the max-pooling Conv4 (``model=conv4_embedding``). Batch
norm follows ``algo.transductive`` (see ``metarun.algos.metric``).

Example::

    algo = MatchingNet(Conv4(out_features=None, variant="maxpool"), problem="classification", fce=True)
    loss, metrics = algo.meta_loss(episode)
    loss.backward()
"""

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algos.metric import MetricBased


class VmapLSTMCell(nn.LSTMCell):
    """``nn.LSTMCell``'s parameters, initialisation and arithmetic, from elementary ops so that it
    runs under ``torch.func.vmap`` (aten::lstm_cell has no batching rule). Any leading shape."""

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh)
        i, f, g, o = gates.chunk(4, dim=-1)  # PyTorch's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class MatchingNet(MetricBased):
    def __init__(self, model: nn.Module, problem: str, fce: bool = False, fce_steps: int = 5, batching: str = "auto",
                 transductive: bool = True):
        super().__init__(model, problem, batching=batching, transductive=transductive)
        self.fce = fce
        self.fce_steps = fce_steps
        if fce:
            if fce_steps < 1:
                raise ValueError(f"fce_steps must be at least 1 with fce=True, got {fce_steps}")
            dim = getattr(model, "out_dim", None)
            if dim is None:
                raise ValueError(f"fce=True sizes its LSTMs from the network's out_dim, which "
                                 f"{type(model).__name__} does not have")
            self.support_forward = VmapLSTMCell(dim, dim)
            self.support_backward = VmapLSTMCell(dim, dim)
            self.query_lstm = VmapLSTMCell(2 * dim, dim)  # input [f'(x̂), r], hidden h

    def full_context(self, support_z: torch.Tensor, query_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g(S) (S, D) and f(x̂, S) (Q, D) of one task, from the embeddings g' = f'."""
        zero = support_z.new_zeros(support_z.shape[1:])

        def run(cell, sequence):
            state, out = (zero, zero), []
            for z in sequence:
                state = cell(z, state)
                out.append(state[0])
            return torch.stack(out)

        steps = support_z.unbind(0)
        forward = run(self.support_forward, steps)
        backward = run(self.support_backward, steps[::-1]).flip(0)
        g = support_z + forward + backward

        h, c = query_z, torch.zeros_like(query_z)
        for _ in range(self.fce_steps):
            read = F.softmax(h @ g.T, dim=-1) @ g
            h, c = self.query_lstm(torch.cat([query_z, read], dim=-1), (h, c))
            h = h + query_z
        return g, h

    def task_log_probs(self, support_z, support_y, query_z, ways):
        g, f = self.full_context(support_z, query_z) if self.fce else (support_z, query_z)
        cosine = F.normalize(f, dim=-1) @ F.normalize(g, dim=-1).T  # (Q, S)
        in_class = support_y == torch.arange(ways, device=support_y.device)[:, None]  # (ways, S)
        # log Σ_{i in class} softmax_i(cos) = logsumexp over the class's cosines - logsumexp over all.
        per_class = torch.where(in_class, cosine[:, None, :], -torch.inf).logsumexp(-1)
        return per_class - cosine.logsumexp(-1, keepdim=True)
