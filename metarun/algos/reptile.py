"""Reptile.

Nichol, Achiam and Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999, 2018
(reference code: openai/supervised-reptile). Each task starts from the shared weights θ and runs
``inner_iterations`` steps of an ordinary optimiser (``adam`` with β1 = 0, or ``sgd``) on
mini-batches of ``inner_batch_size`` of its training examples (the episode's support set; Reptile
trains on more shots than it tests with, ``data.train_shots=10``), giving weights φ_i. The outer
update moves θ towards the tasks' solutions: θ ← θ + ε (mean_i φ_i − θ).

The outer step runs in metarun's algorithm-blind trainer: ``meta_loss`` returns the surrogate
½ ||θ − mean_i φ_i||², whose gradient is exactly θ − mean_i φ_i, so ``optimizer=sgd`` with
``train.meta_lr=ε`` is Reptile's step and ``scheduler=linear`` its linear decay of ε to 0. The
surrogate is finite exactly when every φ_i is, so the trainer's divergence check still means
something. The metrics are the query loss and metric of the adapted φ_i when the training tasks
have queries, else those of each task's last inner mini-batch (``data.train_queries=0``).

Mini-batches follow the reference ``_mini_batches``: a random permutation of the task's examples,
cut into batches, reshuffled when exhausted (a batch may straddle two permutations). The orders
are drawn outside any vmap and gathered inside, so the ``loop`` and ``vmap`` paths (``batching``,
``auto`` picks one) see the same batches: at meta-training from torch's global RNG (which
checkpoints save and restore), at evaluation from generators seeded by each task's support set, so
a task scores the same in any batch, on either path and in every call (``metarun eval`` reproduces
a run's test numbers) and validation never shifts the training stream.

Evaluation adapts on the support set for ``steps`` (``eval_inner_steps``, 50 in the paper)
iterations of ``eval_inner_batch_size`` and records the query metric after each. With
``transductive=false`` each query is normalised with the support set alone ("support + one query",
supervised-reptile's default); ``true`` normalises all queries of a task together.

Deviation: the inner Adam starts from fresh moments in every task, at meta-training and
evaluation, so tasks are independent and run in parallel under vmap. supervised-reptile's
``train_step`` resets only the trainable variables between tasks, so TensorFlow's Adam slots (and
its bias-correction powers) carry over across all tasks of the run, and its ``evaluate`` starts
each test task from those trained slots. With fresh moments and bias correction the first step of
a task is lr·g/(|g| + eps), about lr·sign(g) per weight.

The defaults are the paper's Omniglot 5-way values: inner Adam (β1 = 0, as supervised-reptile) at
lr 1e-3 (5e-4 for 20-way), 5 inner iterations of 10 examples at meta-training (one pass over
5 ways x 10 shots), 50 of 5 at evaluation.

Example::

    algo = Reptile(Conv4(out_features=5), problem="classification", inner_optimizer="adam", inner_lr=1e-3,
                   inner_betas=(0.0, 0.999), inner_iterations=5, inner_batch_size=10)
    loss, metrics = algo.meta_loss(episode)        # episode with 10 shots per class
    loss.backward()
    torch.optim.SGD(algo.parameters(), lr=1.0).step()   # θ ← θ + 1.0 · (mean φ − θ)
"""

import logging
import math
import zlib

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from metarun.algos.base import MetaAlgorithm, problem_loss, problem_metric
from metarun.data.episode import Episode

Params = dict[str, torch.Tensor]
INNER_OPTIMIZERS = ("sgd", "adam")
ADAM_EPS = 1e-8  # torch.optim.Adam's and TensorFlow's default


def minibatch_indices(tasks: int, examples: int, iterations: int, batch_size: int,
                      generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """(tasks, iterations, batch_size) example indices: per task, permutations of 0..examples-1
    laid end to end and cut into batches (supervised-reptile's ``_mini_batches``). Drawn from torch's
    global RNG, or from one generator per task."""
    epochs = -(-iterations * batch_size // examples)
    shape = (epochs, examples)
    if generators is None:
        keys = torch.rand(tasks, *shape, dtype=torch.float64)
    else:
        keys = torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in generators])
    # float64 keys make ties (a slightly non-uniform permutation) practically impossible.
    return keys.argsort(dim=-1).flatten(1)[:, : iterations * batch_size].reshape(tasks, iterations, batch_size)


def task_generators(episode: Episode) -> list[torch.Generator]:
    """A generator per task, seeded by a checksum of its support set: random orders that depend on the task alone."""
    support = episode.support_x.detach().cpu().contiguous()
    return [torch.Generator().manual_seed(zlib.crc32(x.flatten().view(torch.uint8).numpy().tobytes())) for x in support]


class Reptile(MetaAlgorithm):
    learns_from_queries = False  # its outer step follows the adapted weights; queries only score the tasks
    parallel_tasks_in_training = False  # its training mini-batch orders come from the global RNG (see task_threads)

    def __init__(
        self,
        model: nn.Module,
        problem: str,
        inner_optimizer: str = "adam",
        inner_lr: float = 1e-3,
        inner_betas: tuple[float, float] = (0.0, 0.999),
        inner_iterations: int = 5,
        inner_batch_size: int = 10,
        eval_inner_steps: int = 50,
        eval_inner_batch_size: int = 5,
        batching: str = "auto",
        transductive: bool = True,
    ):
        super().__init__(model, problem, transductive, batching)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr}")
        betas = tuple(float(b) for b in inner_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"inner_betas must be two numbers in [0, 1), got {list(inner_betas)}")
        if min(inner_iterations, inner_batch_size, eval_inner_batch_size) < 1 or eval_inner_steps < 0:
            raise ValueError(
                f"inner_iterations, inner_batch_size and eval_inner_batch_size must be at least 1 and "
                f"eval_inner_steps at least 0 (got {inner_iterations}, {inner_batch_size}, "
                f"{eval_inner_batch_size}, {eval_inner_steps})"
            )
        self.inner_optimizer = inner_optimizer
        self.inner_lr = inner_lr
        self.inner_betas = betas
        self.inner_iterations = inner_iterations
        self.inner_batch_size = inner_batch_size
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_batch_size = eval_inner_batch_size

    # -- one task, no task dimension ------------------------------------------------------------
    def _forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (x,))

    def _gradients(self, params: Params, x, y, functional: bool):
        """Gradient of the mini-batch loss at ``params``, the loss and the network's output (all detached)."""

        def loss_fn(p):
            out = self._forward(p, x)
            return problem_loss(out, y, self.problem), out

        if functional:
            grads, (loss, out) = grad_and_value(loss_fn, has_aux=True)(params)
        else:
            with torch.enable_grad():
                leaves = {k: p.detach().requires_grad_() for k, p in params.items()}
                loss, out = loss_fn(leaves)
                grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        return grads, loss.detach(), out.detach()

    def _update(self, params: Params, grads: Params, state: Params, step: int) -> tuple[Params, Params]:
        """One step of the inner optimiser (``step`` counts from 1), written on dicts so it runs under vmap.
        Adam is torch.optim.Adam's update (eps outside the bias-corrected root, no weight decay)."""
        if self.inner_optimizer == "sgd":
            return {k: p - self.inner_lr * grads[k] for k, p in params.items()}, state
        beta1, beta2 = self.inner_betas
        step_size = self.inner_lr / (1 - beta1**step)
        root_correction = math.sqrt(1 - beta2**step)
        new_params, new_state = {}, {}
        for k, p in params.items():
            g = grads[k]
            m = beta1 * state[f"m.{k}"] + (1 - beta1) * g
            v = beta2 * state[f"v.{k}"] + (1 - beta2) * g * g
            new_params[k] = p - step_size * m / (v.sqrt() / root_correction + ADAM_EPS)
            new_state[f"m.{k}"], new_state[f"v.{k}"] = m, v
        return new_params, new_state

    def _fresh_state(self, params: Params) -> Params:
        if self.inner_optimizer == "sgd":
            return {}
        return {f"{s}.{k}": torch.zeros_like(p) for k, p in params.items() for s in ("m", "v")}

    def _adapt(self, theta: Params, sx, sy, order: torch.Tensor, functional: bool):
        """Yields the weights after 0, 1, ..., len(order) inner iterations on the mini-batches
        ``sx[order[i]]``, each with the (loss, metric) of the mini-batch it last trained on (None at 0)."""
        params, state = theta, self._fresh_state(theta)
        yield params, None
        for step in range(order.shape[0]):
            x, y = sx[order[step]], sy[order[step]]
            grads, loss, out = self._gradients(params, x, y, functional)
            params, state = self._update(params, grads, state, step + 1)
            yield params, (loss, problem_metric(out, y, self.problem))

    def _query_loss_metric(self, params: Params, sx, qx, qy):
        out = self.query_outputs(lambda x: self._forward(params, x), sx, qx)
        return problem_loss(out, qy, self.problem), problem_metric(out, qy, self.problem)

    def _task_train(self, theta: Params, sx, sy, qx, qy, order, functional: bool):
        """φ for one task, and the loss and metric reported for it."""
        for params, last_batch in self._adapt(theta, sx, sy, order, functional):
            pass
        reported = self._query_loss_metric(params, sx, qx, qy) if qx.shape[0] else last_batch
        return params, *reported

    def _task_evaluate(self, theta: Params, sx, sy, qx, qy, order, functional: bool) -> torch.Tensor:
        return torch.stack([self._query_loss_metric(params, sx, qx, qy)[1]
                            for params, _ in self._adapt(theta, sx, sy, order, functional)])

    def _run(self, fn, episode: Episode, theta: Params, order: torch.Tensor):
        """``fn`` over the tasks of ``episode``, vectorised or one after another; outputs stacked over tasks."""
        return self.over_tasks(lambda *task, functional: fn(theta, *task, functional=functional), episode.support_x,
                               episode.support_y, episode.query_x, episode.query_y, order.to(episode.support_x.device))

    # -- a batch of tasks -------------------------------------------------------------------------
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        plain_sgd = isinstance(optimizer, torch.optim.SGD) and all(
            g["momentum"] == 0 and g["weight_decay"] == 0 for g in optimizer.param_groups)
        if not plain_sgd:
            logging.getLogger("metarun").warning(
                f"algo=reptile with {type(optimizer).__name__} as meta-optimiser is not Reptile's outer step "
                f"theta += eps * (mean phi - theta): use optimizer=sgd train.meta_lr=1.0 scheduler=linear "
                f"(or experiment=reptile_omniglot_5w1s)")

    def meta_loss(self, episode: Episode, iteration: int = 0):
        theta = dict(self.model.named_parameters())
        # Drawn from the global RNG (checkpointed by the trainer), outside vmap: both paths see these batches.
        order = minibatch_indices(episode.num_tasks, episode.support_x.shape[1], self.inner_iterations,
                                  self.inner_batch_size)
        with torch.no_grad():
            start = {k: p.detach() for k, p in theta.items()}
            phi, losses, metrics = self._run(self._task_train, episode, start, order)
        # Gradient θ − mean_i φ_i: a meta-optimiser step of SGD(lr=ε) is θ ← θ + ε (mean_i φ_i − θ).
        loss = sum(0.5 * (p - phi[k].mean(dim=0)).pow(2).sum() for k, p in theta.items())
        return loss, {"loss": losses.mean(), self.metric: metrics.mean()}

    def evaluate(self, episode: Episode, steps: int) -> torch.Tensor:
        theta = {k: p.detach() for k, p in self.model.named_parameters()}
        order = minibatch_indices(episode.num_tasks, episode.support_x.shape[1], steps, self.eval_inner_batch_size,
                                  task_generators(episode))
        with torch.no_grad():
            return self._run(self._task_evaluate, episode, theta, order)
