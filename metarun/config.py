"""Typed schemas for the config groups, and where metarun finds its ``conf/`` directory.

The YAML files in ``conf/`` hold the values; these dataclasses hold the types, so a wrong type
(``data.shots=abc``) or an unknown key (``data.shot=1``) is rejected when Hydra composes the
config. Each group file starts from its schema: ``defaults: [/schema_<group>_<name>@_here_, _self_]``
(stored without a group, so ``--help`` lists only the real options).
"""

import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


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


# -- data --------------------------------------------------------------------------------------
@dataclass
class OmniglotConfig:
    _target_: str = MISSING
    ways: int = MISSING
    shots: int = MISSING
    queries: int = MISSING
    split: str = MISSING
    root: str = MISSING
    cache_dir: Optional[str] = None
    url: str = MISSING
    download: bool = True
    channels: int = 1
    image_size: int = 28
    train_ways: Optional[int] = None  # meta-training tasks; None: as ways/shots/queries
    train_shots: Optional[int] = None
    train_queries: Optional[int] = None


@dataclass
class SinusoidConfig:
    _target_: str = MISSING
    shots: int = MISSING
    queries: int = MISSING
    amplitude: list[float] = MISSING
    phase: list[float] = MISSING
    x_range: list[float] = MISSING


# -- models ------------------------------------------------------------------------------------
@dataclass
class Conv4Config:
    _target_: str = MISSING
    out_features: Optional[int] = MISSING  # null: no head (an embedding network)
    in_channels: int = MISSING
    image_size: int = MISSING
    hidden: int = MISSING
    variant: str = MISSING
    final_map: Optional[str] = None  # mean | flatten | null: the variant's own (stride: mean, maxpool: flatten)


@dataclass
class MLPConfig:
    _target_: str = MISSING
    in_features: int = MISSING
    hidden: list[int] = MISSING
    out_features: int = MISSING
    batch_norm: bool = False  # batch norm after each hidden layer (MAML's fully connected Omniglot network)


# -- algorithms --------------------------------------------------------------------------------
@dataclass
class AlgoConfig:
    """What every algorithm takes: how a batch of tasks runs, and the batch-norm protocol."""
    _target_: str = MISSING
    batching: str = MISSING  # auto (time both paths, keep the faster), loop or vmap
    transductive: bool = MISSING  # batch norm over all of a task's queries at once, or each with the support set


@dataclass
class MAMLConfig(AlgoConfig):
    inner_lr: float = MISSING
    inner_steps: int = MISSING
    eval_inner_steps: int = MISSING
    first_order: bool = MISSING


@dataclass
class ANILConfig(MAMLConfig):
    adapt: str = MISSING  # regular expression over parameter names: the parameters the inner loop adapts


@dataclass
class MetaSGDConfig(AlgoConfig):
    inner_steps: int = MISSING
    eval_inner_steps: int = MISSING
    lr_init: list[float] = MISSING  # the learned per-parameter inner lrs start U[low, high]
    first_order: bool = MISSING


@dataclass
class MAMLppConfig(MAMLConfig):
    lslr: bool = MISSING  # per-layer, per-step learned inner lrs
    msl: bool = MISSING  # multi-step loss with annealed weights
    msl_iterations: int = MISSING  # iterations over which the multi-step loss weights anneal to the final step
    per_step_bn: bool = MISSING  # batch-norm weights and biases per inner step
    first_order_iterations: int = MISSING  # derivative-order annealing: first order for this many iterations


@dataclass
class ReptileConfig(AlgoConfig):
    inner_optimizer: str = MISSING  # sgd or adam
    inner_lr: float = MISSING
    inner_betas: list[float] = MISSING  # Adam's betas in the inner loop (Reptile: beta1 = 0)
    inner_iterations: int = MISSING
    inner_batch_size: int = MISSING
    eval_inner_steps: int = MISSING
    eval_inner_batch_size: int = MISSING


@dataclass
class ProtoNetConfig(AlgoConfig):
    distance: str = MISSING  # euclidean (squared) or cosine
    cosine_scale: float = MISSING  # distance=cosine: logits are cosine similarities times this


@dataclass
class MatchingNetConfig(AlgoConfig):
    fce: bool = MISSING  # full-context embeddings (bi-LSTM over the support set, attention LSTM for queries)
    fce_steps: int = MISSING  # processing steps of the attention LSTM


# -- meta-optimiser and its learning-rate schedule -----------------------------------------------
@dataclass
class PartialConfig:
    """A torch class that the trainer completes with its first argument (the parameters to
    optimise, or the optimiser to schedule)."""
    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class AdamConfig(PartialConfig):
    lr: float = MISSING
    betas: list[float] = MISSING
    weight_decay: float = 0.0


@dataclass
class SGDConfig(PartialConfig):
    lr: float = MISSING
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class ConstantScheduleConfig(PartialConfig):
    factor: float = 1.0
    total_iters: int = 0


@dataclass
class CosineScheduleConfig(PartialConfig):
    T_max: int = MISSING
    eta_min: float = MISSING


@dataclass
class LinearScheduleConfig(PartialConfig):
    start_factor: float = MISSING
    end_factor: float = MISSING
    total_iters: int = MISSING


@dataclass
class StepScheduleConfig(PartialConfig):
    step_size: int = MISSING
    gamma: float = MISSING


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
    for group, name, node in [
        ("data", "omniglot", OmniglotConfig),
        ("data", "sinusoid", SinusoidConfig),
        ("model", "conv4", Conv4Config),
        ("model", "mlp", MLPConfig),
        ("algo", "maml", MAMLConfig),
        ("algo", "anil", ANILConfig),
        ("algo", "metasgd", MetaSGDConfig),
        ("algo", "mamlpp", MAMLppConfig),
        ("algo", "reptile", ReptileConfig),
        ("algo", "protonet", ProtoNetConfig),
        ("algo", "matchingnet", MatchingNetConfig),
        ("optimizer", "adam", AdamConfig),
        ("optimizer", "sgd", SGDConfig),
        ("scheduler", "constant", ConstantScheduleConfig),
        ("scheduler", "cosine", CosineScheduleConfig),
        ("scheduler", "linear", LinearScheduleConfig),
        ("scheduler", "step", StepScheduleConfig),
        ("device", "device", DeviceConfig),
    ]:
        cs.store(name=f"schema_{group}_{name}", node=node)


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
