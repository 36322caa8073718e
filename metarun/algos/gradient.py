"""The functional inner loop every gradient-based algorithm shares (MAML, FOMAML, ANIL, Meta-SGD, MAML++).

Each task adapts (a subset of) the network's parameters with steps of gradient descent on its
support set; the meta-loss is the query loss of the adapted network, differentiated through the
adaptation (second order) or with the inner gradients treated as constants (first order).
Parameters are dicts of tensors and the network is called through ``functional_call``: nothing is
monkey-patched, and one definition serves both execution paths:

- ``loop``: one task after another, inner gradients from ``torch.autograd.grad``;
- ``vmap``: all tasks at once, inner gradients from ``torch.func.grad`` under ``torch.func.vmap``.

``batching="auto"`` lets ``metarun.execution`` time both per phase and shape and keep the faster:
the faster path depends on the device (the team measured vmap about 12x faster than a per-task
loop on an H100) and on the workload (benchmarks/bench_algos.py on a 2-core CPU: vmap 2x faster
with one query per class, 2x slower with fifteen).

Subclasses change the algorithm through five small hooks: which parameters adapt (``adapts``), the
learning rate of a parameter at a step (``inner_lr_of``), the network call at a step (``forward``),
the weights of the per-step query losses (``step_loss_weights``) and the derivative order at an
iteration (``first_order_at``).
"""

import torch
from torch import nn
from torch.func import functional_call, grad

from metarun.algos.base import MetaAlgorithm, problem_loss, problem_metric
from metarun.data.episode import Episode
from metarun.utils import stop

Params = dict[str, torch.Tensor]


class GradientBased(MetaAlgorithm):
    """The engine's arguments (MAML's; its Omniglot 5-way values by default): ``inner_lr``, the step
    size of the inner SGD; ``inner_steps``, adaptation steps per task at meta-training;
    ``eval_inner_steps``, adaptation steps at meta-validation and meta-test (metrics logged after
    each); ``first_order``, inner gradients treated as constants in the meta-gradient (FOMAML);
    ``batching`` and ``transductive`` as in ``MetaAlgorithm``."""
    capturable = True  # (MAML++ is not: its loss weights and derivative order follow the iteration)

    def __init__(
        self,
        model: nn.Module,
        problem: str,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int = 10,
        first_order: bool = False,
        batching: str = "auto",
        transductive: bool = True,
    ):
        super().__init__(model, problem, transductive, batching)
        if inner_steps < 1 or eval_inner_steps < 0:
            raise ValueError(f"inner_steps must be at least 1 and eval_inner_steps at least 0 "
                             f"(got {inner_steps}, {eval_inner_steps})")
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order

    # -- hooks ------------------------------------------------------------------------------------
    def adapts(self, name: str) -> bool:
        """Whether the inner loop adapts parameter ``name`` (all of them in MAML)."""
        return True

    def inner_lr_of(self, name: str, step: int):
        """Learning rate of parameter ``name`` at inner step ``step``: a number or a tensor."""
        return self.inner_lr

    def forward(self, params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
        """The network with ``params`` after ``step`` inner updates."""
        return functional_call(self.model, params, (x,))

    def step_loss_weights(self, iteration: int) -> torch.Tensor | None:
        """Weights of the query losses after 1..inner_steps updates, or None for the final loss alone."""
        return None

    def first_order_at(self, iteration: int) -> bool:
        return self.first_order

    # -- one task, no task dimension ------------------------------------------------------------
    def _inner_loss(self, adapted: Params, fixed: Params, x, y, step: int) -> torch.Tensor:
        return problem_loss(self.forward({**fixed, **adapted}, x, step), y, self.problem)

    def _step(self, adapted: Params, fixed: Params, x, y, step: int, differentiable: bool, functional: bool) -> Params:
        """One gradient step on the support loss. ``functional`` selects torch.func (needed under vmap)."""
        stop.check()  # a long inner loop stops between its steps on SIGINT/SIGTERM (a no-op otherwise)
        if functional:
            grads = grad(self._inner_loss)(adapted, fixed, x, y, step)
            if not differentiable:
                grads = {k: g.detach() for k, g in grads.items()}
        else:
            loss = self._inner_loss(adapted, fixed, x, y, step)
            grads = dict(zip(adapted, torch.autograd.grad(loss, list(adapted.values()), create_graph=differentiable)))
        return {k: p - self.inner_lr_of(k, step) * grads[k] for k, p in adapted.items()}

    def _query_output(self, adapted: Params, fixed: Params, sx, qx, step: int) -> torch.Tensor:
        return self.query_outputs(lambda x: self.forward({**fixed, **adapted}, x, step), sx, qx)

    def _split(self, params: Params) -> tuple[Params, Params]:
        adapted = {k: p for k, p in params.items() if self.adapts(k)}
        return adapted, {k: p for k, p in params.items() if k not in adapted}

    def _task_meta_loss(self, params: Params, sx, sy, qx, qy, weights, first_order: bool, functional: bool):
        adapted, fixed = self._split(params)
        losses = []
        for step in range(self.inner_steps):
            adapted = self._step(adapted, fixed, sx, sy, step, differentiable=not first_order, functional=functional)
            if weights is not None and step + 1 < self.inner_steps:
                losses.append(problem_loss(self._query_output(adapted, fixed, sx, qx, step + 1), qy, self.problem))
        out = self._query_output(adapted, fixed, sx, qx, self.inner_steps)
        loss = problem_loss(out, qy, self.problem)
        if weights is not None:
            loss = (weights * torch.stack(losses + [loss])).sum()
        return loss, problem_metric(out, qy, self.problem).detach()

    def _task_evaluate(self, params: Params, sx, sy, qx, qy, steps: int, functional: bool):
        adapted, fixed = self._split(params)
        metrics = []
        for step in range(steps + 1):
            if step:
                adapted = self._step(adapted, fixed, sx, sy, step - 1, differentiable=False, functional=functional)
            metrics.append(problem_metric(self._query_output(adapted, fixed, sx, qx, step), qy, self.problem).detach())
        return torch.stack(metrics)

    # -- a batch of tasks -------------------------------------------------------------------------
    def meta_loss(self, episode: Episode, iteration: int = 0):
        if episode.query_x.shape[1] == 0:
            raise ValueError("the meta-loss of gradient-based algorithms is a query loss, but the episode's tasks "
                             "have no queries")
        params = dict(self.model.named_parameters())
        weights, first_order = self.step_loss_weights(iteration), self.first_order_at(iteration)
        losses, metrics = self.over_tasks(
            lambda *task, functional: self._task_meta_loss(params, *task, weights, first_order, functional=functional),
            episode.support_x, episode.support_y, episode.query_x, episode.query_y)
        return losses.mean(), {"loss": losses.detach().mean(), self.metric: metrics.mean()}

    def evaluate(self, episode: Episode, steps: int) -> torch.Tensor:
        vmapped = self.path(episode.support_x.device) == "vmap"
        params = {k: p.detach() if vmapped else p.detach().requires_grad_() for k, p in self.model.named_parameters()}
        # torch.func.grad computes gradients even under no_grad, and no graph is kept for the outer level;
        # the loop's torch.autograd.grad needs grad mode (meta_test runs under no_grad).
        with torch.no_grad() if vmapped else torch.enable_grad():
            return self.over_tasks(
                lambda *task, functional: self._task_evaluate(params, *task, steps, functional=functional),
                episode.support_x, episode.support_y, episode.query_x, episode.query_y)
