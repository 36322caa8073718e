"""MAML and first-order MAML.

Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017. Each task adapts the shared initialisation with ``inner_steps`` steps of SGD on its
support set; the meta-loss is the mean query loss of the adapted networks, differentiated through
the adaptation (second order) or with the inner gradients treated as constants (first order,
``first_order=True``, the paper's FOMAML).

Two execution paths compute the same numbers: ``loop`` adapts one task after another with
``torch.autograd.grad``; ``vmap`` adapts all tasks at once with ``torch.func.grad`` under
``torch.func.vmap``. ``batching="auto"`` picks vmap on CUDA (the team measured it about 12x faster
than a per-task loop on an H100) and the loop on CPU (where benchmarks/bench_maml.py measures vmap
about 2x slower).

Example::

    algo = MAML(Conv4(out_features=5), task="classification", inner_lr=0.4, inner_steps=1)
    loss, metrics = algo.meta_loss(episode)
    loss.backward()
"""

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from metarun.algos.base import BATCHING, MetaAlgorithm, task_loss, task_metric
from metarun.data.episode import Episode

Params = dict[str, torch.Tensor]


class MAML(MetaAlgorithm):
    def __init__(
        self,
        model: nn.Module,
        task: str,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int = 10,
        first_order: bool = False,
        batching: str = "auto",
    ):
        super().__init__(model, task)
        if batching not in BATCHING:
            raise ValueError(f"algo.batching must be one of {BATCHING}, got {batching!r}")
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        self.batching = batching

    def uses_vmap(self, device: torch.device) -> bool:
        if self.batching == "auto":
            return device.type == "cuda"
        return self.batching == "vmap"

    # -- one task, no task dimension ------------------------------------------------------------
    def _loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task_loss(functional_call(self.model, params, (x,)), y, self.task)

    def _step(self, params: Params, x, y, differentiable: bool, functional: bool) -> Params:
        """One SGD step on the task's loss. ``functional`` selects torch.func (needed under vmap)."""
        if functional:
            grads = grad(self._loss)(params, x, y)
            if not differentiable:
                grads = {k: g.detach() for k, g in grads.items()}
        else:
            loss = self._loss(params, x, y)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=differentiable)))
        return {k: p - self.inner_lr * grads[k] for k, p in params.items()}

    def _task_meta_loss(self, params: Params, sx, sy, qx, qy, functional: bool):
        for _ in range(self.inner_steps):
            params = self._step(params, sx, sy, differentiable=not self.first_order, functional=functional)
        out = functional_call(self.model, params, (qx,))
        return task_loss(out, qy, self.task), task_metric(out, qy, self.task).detach()

    def _task_evaluate(self, params: Params, sx, sy, qx, qy, steps: int, functional: bool):
        metrics = []
        for step in range(steps + 1):
            if step:
                params = self._step(params, sx, sy, differentiable=False, functional=functional)
            out = functional_call(self.model, params, (qx,))
            metrics.append(task_metric(out, qy, self.task).detach())
        return torch.stack(metrics)

    # -- a batch of tasks -------------------------------------------------------------------------
    def meta_loss(self, episode: Episode):
        params = dict(self.model.named_parameters())
        batch = (episode.support_x, episode.support_y, episode.query_x, episode.query_y)
        if self.uses_vmap(episode.support_x.device):
            fn = vmap(lambda *task: self._task_meta_loss(params, *task, functional=True))
            losses, metrics = fn(*batch)
        else:
            per_task = [self._task_meta_loss(params, *task, functional=False) for task in zip(*batch)]
            losses, metrics = (torch.stack(v) for v in zip(*per_task))
        return losses.mean(), {"loss": losses.detach().mean(), self.metric: metrics.mean()}

    def evaluate(self, episode: Episode, steps: int) -> torch.Tensor:
        params = {k: p.detach() for k, p in self.model.named_parameters()}
        batch = (episode.support_x, episode.support_y, episode.query_x, episode.query_y)
        if self.uses_vmap(episode.support_x.device):
            # torch.func.grad computes gradients even under no_grad; no graph is kept for the outer level.
            with torch.no_grad():
                return vmap(lambda *task: self._task_evaluate(params, *task, steps, functional=True))(*batch)
        params = {k: p.requires_grad_() for k, p in params.items()}
        with torch.enable_grad():
            return torch.stack([self._task_evaluate(params, *task, steps, functional=False) for task in zip(*batch)])
