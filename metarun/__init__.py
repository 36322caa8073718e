"""metarun: a command-line experiment runner for meta-learning in PyTorch.

The algorithms, networks and task sources are also a library, usable without Hydra::

    from metarun import MAML, Conv4, OmniglotTasks, meta_test, task_generator

(see the README's "Use it as a library"). The names load on first use, so ``metarun --help`` and
shell completion do not import torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # algorithms
    "MAML": "metarun.algos.maml", "MAMLpp": "metarun.algos.mamlpp", "ANIL": "metarun.algos.anil",
    "MetaSGD": "metarun.algos.metasgd", "Reptile": "metarun.algos.reptile", "ProtoNet": "metarun.algos.protonet",
    "MatchingNet": "metarun.algos.matchingnet", "MetaAlgorithm": "metarun.algos.base",
    # networks
    "Conv4": "metarun.models.conv4", "MLP": "metarun.models.mlp",
    # few-shot tasks
    "OmniglotTasks": "metarun.data.omniglot", "SinusoidTasks": "metarun.data.sinusoid", "Episode": "metarun.data.episode",
    "task_generator": "metarun.data.tasks",
    # evaluation over fixed tasks
    "meta_test": "metarun.metatest",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metarun' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
