"""ANIL: Almost No Inner Loop.

Raghu, Raghu, Bengio and Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML", ICLR 2020. MAML's settings, but the inner loop adapts only the parameters
whose names match ``adapt`` (a regular expression; by default the classifier head, ``head.``);
the body is meta-learned through the query loss alone. Inner gradients are taken only with
respect to the adapted parameters, so the backward pass of the inner loop stops at the head.

Example::

    algo = ANIL(Conv4(out_features=5), problem="classification", inner_lr=0.4, adapt=r"^head\\.")
"""

import re

from torch import nn

from metarun.algos.gradient import GradientBased


class ANIL(GradientBased):
    def __init__(self, model: nn.Module, problem: str, adapt: str = r"^head\.", **engine):
        super().__init__(model, problem, **engine)
        try:
            self.pattern = re.compile(adapt)
        except re.error as e:
            raise ValueError(f"adapt is not a regular expression ({e}): {adapt!r}") from None
        names = [n for n, _ in model.named_parameters()]
        if not any(self.pattern.search(n) for n in names):
            raise ValueError(f"adapt={adapt!r} matches none of the network's parameters ({', '.join(names)})")
        self.adapt = adapt

    def adapts(self, name: str) -> bool:
        return self.pattern.search(name) is not None
