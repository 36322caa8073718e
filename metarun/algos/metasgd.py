"""Meta-SGD: learning the inner learning rate of every parameter.

Li, Zhou, Chen and Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017. MAML's
networks and one inner step, but the inner update is θ - α ∘ ∇L with a learned vector α of the
same shape as each parameter, initialised U[lr_init] = U[0.005, 0.1] and meta-learned jointly with
the initialisation θ (both are parameters of this module, so the meta-optimiser covers them).
The ``eval_inner_steps`` steps at meta-test reuse the learned rates.

Example::

    algo = MetaSGD(MLP(), problem="regression", inner_steps=1)
"""

import torch
from torch import nn

from metarun.algos.gradient import GradientBased


class MetaSGD(GradientBased):
    def __init__(self, model: nn.Module, problem: str, lr_init: tuple[float, float] = (0.005, 0.1), **engine):
        super().__init__(model, problem, inner_lr=0.0, **engine)
        low, high = lr_init
        if not 0 <= low <= high:
            raise ValueError(f"lr_init must be [low, high] with 0 <= low <= high, got {list(lr_init)}")
        # Parameter names hold dots, which module names may not: the rates are keyed by position.
        self.lrs = nn.ParameterList(nn.Parameter(torch.empty_like(p).uniform_(low, high)) for p in model.parameters())
        self._index = {n: i for i, (n, _) in enumerate(model.named_parameters())}

    def inner_lr_of(self, name: str, step: int) -> torch.Tensor:
        return self.lrs[self._index[name]]
