"""MAML++: MAML with the training fixes of "How to train your MAML".

Antoniou, Edwards and Storkey, "How to train your MAML", ICLR 2019. Four switches on top of
second-order MAML, each one of the engine's hooks (``metarun.algos.gradient``):

- ``lslr`` (per-layer per-step learning rates): every adapted parameter tensor has its own
  inner learning rate for each inner step, initialised to ``inner_lr`` and meta-learned with the
  network. They live in ``inner_lrs``, a ParameterDict keyed by the parameter name with dots
  replaced by ``-`` (a module name may not contain dots), one vector of ``inner_steps`` rates each.
  Evaluation with more steps than ``inner_steps`` reuses the last step's rate.
- ``msl`` (multi-step loss): the meta-loss is a weighted sum of the query losses after each of
  the 1..N inner steps. The weights are the reference code's ``get_per_step_loss_importance_vector``
  with its epoch counter replaced by the fraction of ``msl_iterations`` done (see ``msl_weights``);
  from ``msl_iterations`` on only the final query loss counts, as in the reference.
- ``per_step_bn`` (per-step batch-norm weights and biases): the network after ``k`` inner updates
  normalises with its own copy ``k`` of every batch-norm weight and bias (k = 0..inner_steps,
  clamped to ``inner_steps`` for longer evaluation). Copy 0 is the network's own parameter; copies
  1..inner_steps are the rows of ``step_norms`` (same keys as ``inner_lrs``, shape
  (inner_steps, channels)). All copies are meta-learned and none adapts in the inner loop (MAML++'s
  default, ``enable_inner_loop_optimizable_bn_params: false``). ``forward`` swaps the step's copies
  into the parameter dict, so the loop and vmap paths share it.
- ``first_order_iterations`` (derivative-order annealing): first-order meta-gradients for
  iterations < first_order_iterations, second order afterwards (unless ``first_order`` is set).

The defaults are MAML++'s Omniglot values: inner lr 0.1 (every learned rate's initial value), 5
inner steps at meta-training and at evaluation, all four switches on, MSL over 5000 iterations
(10 epochs of 500), second order throughout.

With ``lslr=False, msl=False, per_step_bn=False, first_order_iterations=0`` MAML++ is MAML, number
for number. The cosine-annealed meta learning rate of the paper is the trainer's
``scheduler=cosine`` (1e-3 -> 1e-5), chosen by the experiment config, not here.

What the reference code (AntreasAntoniou/HowToTrainYourMAMLPytorch, commit 8696470) does, and
where metarun differs:

- Batch statistics: ``MetaBatchNormLayer.forward`` always calls ``F.batch_norm(..., training=True)``,
  at meta-train and meta-test alike, so every pass normalises with the current batch's statistics.
  Its per-step ``running_mean``/``running_var`` are updated (and restored after evaluation) but
  never used to normalise. ``BatchStatNorm`` keeps no running statistics and computes the same.
- BN step index: the reference keeps N = ``number_of_training_steps_per_iter`` copies and indexes
  them by the loop counter, so the support pass of step s and the query pass *after* that step's
  update both use copy s. metarun indexes by the number of updates the network has had (N + 1
  copies): the query after k updates and the support pass at step k both use copy k. So the
  adapted network always meets the copy of its own step, and the query before adaptation (step 0
  of ``evaluate``) is defined.
- LSLR: the reference allocates N + 1 rates per tensor and uses the first N; metarun stores N.
  As in the reference, the batch-norm parameters have no rates when ``per_step_bn`` is on (they do
  not adapt); with ``per_step_bn`` off they adapt like every other parameter (MAML's behaviour).
- Schedules: the reference anneals the MSL weights once per epoch (500 iterations) and switches
  to second order after ``first_order_to_second_order_epoch``; metarun anneals per iteration.
  Its Omniglot configs set ``multi_step_loss_num_epochs: 10`` (5000 iterations) and
  ``first_order_to_second_order_epoch: -1`` (second order from the start).

Example::

    algo = MAMLpp(Conv4(out_features=5), problem="classification", inner_lr=0.1, inner_steps=5,
                  msl_iterations=5000)
    loss, metrics = algo.meta_loss(episode, iteration)   # the iteration drives MSL and DA
    loss.backward()                                      # reaches the network, rates and BN copies
"""

import torch
from torch import nn
from torch.func import functional_call

from metarun.algos.gradient import GradientBased, Params
from metarun.models.batchnorm import BatchStatNorm

# Non-final MSL weights never fall below this fraction of 1/N (the reference's 0.03 / N).
MSL_FLOOR = 0.03


def msl_weights(steps: int, iteration: int, msl_iterations: int) -> list[float] | None:
    """MAML++'s per-step query-loss weights at ``iteration``, or None once only the final loss counts.

    All start at 1/N; the non-final ones fall linearly by 1/N over ``msl_iterations`` to a floor
    of 0.03/N, the final one rises by the same total to 1 - (N-1)*0.03/N; they always sum to 1.
    """
    if iteration >= msl_iterations:
        return None
    progress = iteration / msl_iterations  # the reference's current_epoch / multi_step_loss_num_epochs
    floor = MSL_FLOOR / steps
    early = max(1 / steps - progress / steps, floor)
    final = min(1 / steps + progress * (steps - 1) / steps, 1 - (steps - 1) * floor)
    return [early] * (steps - 1) + [final]


def _key(name: str) -> str:
    return name.replace(".", "-")


class MAMLpp(GradientBased):
    capturable = False  # its per-step loss weights and first-order phase change with the iteration
    def __init__(self, model: nn.Module, problem: str, inner_lr: float = 0.1, inner_steps: int = 5,
                 eval_inner_steps: int = 5, lslr: bool = True, msl: bool = True, msl_iterations: int = 5000,
                 per_step_bn: bool = True, first_order_iterations: int = 0, **engine):
        super().__init__(model, problem, inner_lr=inner_lr, inner_steps=inner_steps, eval_inner_steps=eval_inner_steps,
                         **engine)
        if msl_iterations < 0 or first_order_iterations < 0:
            raise ValueError(f"msl_iterations and first_order_iterations must be at least 0 "
                             f"(got {msl_iterations}, {first_order_iterations})")
        self.lslr, self.msl, self.per_step_bn = lslr, msl, per_step_bn
        self.msl_iterations, self.first_order_iterations = msl_iterations, first_order_iterations
        params = dict(model.named_parameters())
        self.norm_names = [f"{m}.{p}" if m else p for m, module in model.named_modules()
                           if isinstance(module, (BatchStatNorm, nn.modules.batchnorm._BatchNorm))
                           for p, _ in module.named_parameters(recurse=False)]
        if per_step_bn and not self.norm_names:
            raise ValueError(f"per_step_bn=True needs a network with batch norm; {type(model).__name__} has "
                             f"none: use per_step_bn=False")
        # Copies 1..inner_steps of every batch-norm weight and bias; copy 0 is the network's own.
        self.step_norms = nn.ParameterDict({
            _key(n): nn.Parameter(params[n].detach().expand(self.inner_steps, *params[n].shape).clone())
            for n in (self.norm_names if per_step_bn else [])
        })
        self.inner_lrs = nn.ParameterDict({
            _key(n): nn.Parameter(torch.full((self.inner_steps,), float(self.inner_lr), dtype=p.dtype, device=p.device))
            for n, p in params.items() if lslr and self.adapts(n)
        })

    # -- the engine's hooks -----------------------------------------------------------------------
    def adapts(self, name: str) -> bool:
        # Per-step BN copies are meta-learned only (MAML++'s default); without them, MAML adapts all.
        return not (self.per_step_bn and name in self.norm_names)

    def inner_lr_of(self, name: str, step: int):
        if not self.lslr:
            return self.inner_lr
        return self.inner_lrs[_key(name)][min(step, self.inner_steps - 1)]

    def forward(self, params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
        copy = min(step, self.inner_steps)
        if self.per_step_bn and copy > 0:
            params = {**params, **{n: self.step_norms[_key(n)][copy - 1] for n in self.norm_names}}
        return functional_call(self.model, params, (x,))

    def step_loss_weights(self, iteration: int) -> torch.Tensor | None:
        weights = msl_weights(self.inner_steps, iteration, self.msl_iterations) if self.msl else None
        if weights is None:
            return None
        reference = next(self.model.parameters())
        return torch.tensor(weights, dtype=reference.dtype, device=reference.device)

    def first_order_at(self, iteration: int) -> bool:
        return self.first_order or iteration < self.first_order_iterations
