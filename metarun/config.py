"""Typed schemas for the config groups, generated from the classes they build, and where metarun finds ``conf/``.

Each fact about a knob is stated once. Its type and default are the annotation and default of the
constructor argument it sets (``inner_lr: float = 0.4`` in ``GradientBased.__init__``), its meaning is
that class's docstring, and ``conf/<group>/<name>.yaml`` holds a value only where the option differs
from the constructor (``model=conv4``'s ``out_features: ${data.ways}``). hydra-zen's ``builds(...,
populate_full_signature=True)`` turns each signature into the option's dataclass, so ``--cfg job``
shows every key and a wrong type (``data.shots=abc``) or an unknown key (``data.shot=1``) is rejected
when Hydra composes the config. Each group file starts from its schema:
``defaults: [/schema_<group>_<name>@_here_, _self_]`` (stored without a group, so ``--help`` lists only
the real options).
"""

import inspect
import os
import types
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from hydra_zen import BuildsFn
from omegaconf import MISSING, OmegaConf

from metarun.algos.gradient import GradientBased
from metarun.data.images import ImageTasks


def conf_dir() -> str:
    """Absolute path of the packaged ``conf/`` (a relative config_path breaks console scripts)."""
    return str(Path(str(files("metarun.conf"))).resolve())


def default_data_root() -> str:
    """``$METARUN_DATA_DIR``, else a per-user cache directory."""
    if os.environ.get("METARUN_DATA_DIR"):
        return os.environ["METARUN_DATA_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "metarun", "data")


OmegaConf.register_new_resolver("metarun.data_root", default_data_root, replace=True)


# -- the instantiated groups: one schema per option, generated from its class ------------------------
# The class each option builds, spelled as configs and checkpoints record its ``_target_``
# (utils/targets.py allow-lists exactly these). An option without an entry (algo=fomaml,
# model=conv4_embedding) starts from another option's file.
TARGETS: dict[str, dict[str, str]] = {
    "data": {
        "omniglot": "metarun.data.omniglot.OmniglotTasks",
        "miniimagenet": "metarun.data.miniimagenet.MiniImageNetTasks",
        "tieredimagenet": "metarun.data.tieredimagenet.TieredImageNetTasks",
        "cifarfs": "metarun.data.cifar.CIFARFSTasks",
        "fc100": "metarun.data.cifar.FC100Tasks",
        "cub": "metarun.data.cub.CUBTasks",
        "sinusoid": "metarun.data.sinusoid.SinusoidTasks",
    },
    "model": {"conv4": "metarun.models.Conv4", "mlp": "metarun.models.MLP", "resnet12": "metarun.models.ResNet12"},
    "algo": {
        "maml": "metarun.algos.maml.MAML",
        "anil": "metarun.algos.anil.ANIL",
        "metasgd": "metarun.algos.metasgd.MetaSGD",
        "mamlpp": "metarun.algos.mamlpp.MAMLpp",
        "reptile": "metarun.algos.reptile.Reptile",
        "protonet": "metarun.algos.protonet.ProtoNet",
        "matchingnet": "metarun.algos.matchingnet.MatchingNet",
        "snail": "metarun.algos.snail.SNAIL",
    },
    "optimizer": {"adam": "torch.optim.Adam", "sgd": "torch.optim.SGD"},
    "scheduler": {
        "constant": "torch.optim.lr_scheduler.ConstantLR",
        "cosine": "torch.optim.lr_scheduler.CosineAnnealingLR",
        "linear": "torch.optim.lr_scheduler.LinearLR",
        "step": "torch.optim.lr_scheduler.StepLR",
    },
}

# Constructor arguments no config sets: the trainer passes an algorithm its network and problem type.
PASSED_BY_TRAINER = ("model", "problem")

# Algorithms whose constructor hands ``**engine`` on to the gradient engine take the engine's keys too,
# less those they set themselves (Meta-SGD learns its inner rates: no inner_lr).
ENGINE_KEYS_OF = {"anil": (), "mamlpp": (), "metasgd": ("inner_lr",)}

# The torch keys a config may set; torch's signatures hold more (foreach, fused, last_epoch, ...). The
# first argument (the parameters, or the optimiser) is the trainer's: these build partial objects.
TORCH_KEYS = {
    "adam": ("lr", "betas", "weight_decay"),
    "sgd": ("lr", "momentum", "weight_decay"),
    "constant": ("factor", "total_iters"),
    "cosine": ("T_max", "eta_min"),
    "linear": ("start_factor", "end_factor", "total_iters"),
    "step": ("step_size", "gamma"),
}


class _Builds(BuildsFn):
    """hydra-zen's ``builds``, writing each ``_target_`` as ``TARGETS`` spells it (``metarun.models.Conv4``,
    not the defining module's ``metarun.models.conv4.Conv4``), reading ``int | None`` as ``Optional[int]``
    (hydra-zen would read it as Any, and accept any type), and torch's ``float | Tensor`` hyperparameters
    as floats (a config holds no tensors)."""

    @classmethod
    def _get_obj_path(cls, target: Any) -> str:
        return _PATH_OF.get(target) or super()._get_obj_path(target)

    @classmethod
    def _sanitized_type(cls, type_: Any, **kwargs) -> Any:
        if isinstance(type_, types.UnionType):
            type_ = Union[get_args(type_)]
        if get_origin(type_) is Union and torch.Tensor in get_args(type_):
            rest = tuple(a for a in get_args(type_) if a is not torch.Tensor)
            type_ = rest[0] if len(rest) == 1 else Union[rest]
        return super()._sanitized_type(type_, **kwargs)


_PATH_OF = {get_class(path): path for options in TARGETS.values() for path in options.values()}


def schema(group: str, name: str) -> type:
    """The dataclass of option ``<group>=<name>``: its class's constructor arguments, typed and defaulted."""
    target = get_class(TARGETS[group][name])
    if group in ("optimizer", "scheduler"):
        keys = TORCH_KEYS[name]
        params = inspect.signature(target).parameters
        required = {k: MISSING for k in keys if params[k].default is inspect.Parameter.empty}  # valued by the YAML
        return _Builds.builds(target, zen_partial=True, populate_full_signature=True,
                              zen_exclude=lambda k: k not in keys, **required)
    bases = ()
    if group == "data" and issubclass(target, ImageTasks) and target is not ImageTasks:
        # Every image dataset takes the common image-task keys (residency, augment, ...), whether its class
        # spells them out or passes them on as **kwargs.
        # The base holds only the keys the class does not spell out (its own may be typed or defaulted otherwise).
        own = tuple(inspect.signature(target).parameters)
        bases = (_Builds.builds(ImageTasks, populate_full_signature=True, zen_exclude=own),)
    if name in ENGINE_KEYS_OF:
        bases = (_Builds.builds(GradientBased, populate_full_signature=True,
                                zen_exclude=(*PASSED_BY_TRAINER, *ENGINE_KEYS_OF[name])),)
    return _Builds.builds(target, populate_full_signature=True, zen_exclude=PASSED_BY_TRAINER, builds_bases=bases)


# -- device and the run itself -----------------------------------------------------------------
@dataclass
class DeviceConfig:
    name: str = MISSING  # auto, cpu, cuda or cuda:N


@dataclass
class TrainLoopConfig:
    meta_batch_size: int = MISSING
    iterations: int = MISSING
    meta_lr: float = MISSING
    val_every: int = MISSING
    val_episodes: int = MISSING
    log_every: int = MISSING
    task_chunk: Optional[int] = None  # tasks per chunk of a meta-batch (null: all on CPU, what fits on CUDA)


@dataclass
class TestConfig:
    episodes: int = MISSING
    checkpoint: str = MISSING  # best or last
    eval_seed: int = MISSING


@dataclass
class TrainConfig:
    data: Any = MISSING
    model: Any = MISSING
    algo: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    device: DeviceConfig = field(default_factory=DeviceConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    test: TestConfig = field(default_factory=TestConfig)
    seed: int = MISSING


@dataclass
class EvalDataConfig:
    """Where the data is on this machine; the rest of ``data`` comes from the checkpoint."""

    root: str = MISSING
    cache_dir: Optional[str] = None
    url: Optional[str] = None  # null: as in the checkpoint
    download: bool = True
    residency: Optional[str] = None  # auto, device or memmap; null: as in the checkpoint (image datasets only)


@dataclass
class EvalAlgoConfig:
    eval_inner_steps: Optional[int] = None  # null: as in the checkpoint
    batching: Optional[str] = None


@dataclass
class EvalTestConfig:
    """The test protocol of ``metarun eval``; null means as in the checkpoint's run."""

    episodes: Optional[int] = None
    checkpoint: str = MISSING
    eval_seed: Optional[int] = None


@dataclass
class EvalConfig:
    ckpt: str = MISSING
    batch_size: int = MISSING
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    algo: EvalAlgoConfig = field(default_factory=EvalAlgoConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    test: EvalTestConfig = field(default_factory=EvalTestConfig)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    for group, options in TARGETS.items():
        for name in options:
            cs.store(name=f"schema_{group}_{name}", node=schema(group, name))
    cs.store(name="schema_device_device", node=DeviceConfig)


register_schemas()


# -- run directory names -------------------------------------------------------------------------
def ways_shots(data) -> str:
    """``5w1s`` (ways and shots of the test tasks), or ``10s`` for data without ways (sinusoid): the
    tail of a run directory's name, so single runs are told apart in ``outputs/`` and TensorBoard."""
    ways = data.get("ways") if hasattr(data, "get") else None
    shots = data.get("shots") if hasattr(data, "get") else None
    return f"{ways}w{shots}s" if ways is not None else f"{shots}s"


def checkpoint_name(ckpt) -> str:
    """``maml_omniglot_5w1s_best`` for ``.../2026-11-30_05-41-02_maml_omniglot_5w1s/checkpoints/best.pt``:
    what ``metarun eval`` evaluated, in its run directory's name (the training run's name without its date)."""
    import re

    path = Path(str(ckpt or "checkpoint"))
    name = path.stem
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        run = re.sub(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_?", "", path.parent.parent.name)
        name = f"{run}_{name}" if run else name
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name)[:100] or "checkpoint"


OmegaConf.register_new_resolver("metarun.ways_shots", ways_shots, replace=True)
OmegaConf.register_new_resolver("metarun.checkpoint_name", checkpoint_name, replace=True)
