"""MAML and first-order MAML.

Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017. Each task adapts the shared initialisation with ``inner_steps`` steps of SGD at
``inner_lr`` on its support set; the meta-loss is the mean query loss of the adapted networks,
differentiated through the adaptation (second order) or with the inner gradients treated as
constants (``first_order=True``, the paper's FOMAML). The engine is ``metarun.algos.gradient``.

Example::

    algo = MAML(Conv4(out_features=5), problem="classification", inner_lr=0.4, inner_steps=1)
    loss, metrics = algo.meta_loss(episode)
    loss.backward()
"""

from metarun.algos.gradient import GradientBased


class MAML(GradientBased):
    """MAML as the engine defines it: every parameter adapts, one inner learning rate."""
