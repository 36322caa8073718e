"""Every user-facing key checked when the config is composed, before anything is built or written.

The schemas in ``metarun.config`` check types; the tables here check values: one rule per key,
declared once, each saying in words what the key takes. A key that the chosen options do not have
(``data.ways`` under ``data=sinusoid``) is skipped, and so is ``null`` where the schema allows it
("as elsewhere"). A rule that fails raises one ``MetarunError`` naming the key, the value and what
is allowed. Limits that need the data itself (an Omniglot split's class count) are checked where
the data is loaded.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from metarun.algos.base import BATCHING as BATCHING_OPTIONS
from metarun.algos.protonet import DISTANCES
from metarun.algos.reptile import INNER_OPTIMIZERS
from metarun.data.images import ImageTasks
from metarun.data.store import RESIDENCIES
from metarun.data.transforms import AUGMENTS
from metarun.data.omniglot_files import IMAGES_PER_CHARACTER
from metarun.errors import MetarunError
from metarun.models.conv4 import FINAL_MAPS, VARIANTS

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes [-2**63, 2**64): negatives alias 2**64 + seed


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    allowed: str  # what the key takes, in words: "an integer >= 1"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _augments_ok(v) -> bool:
    return (isinstance(v, list) and all(isinstance(x, str) and x in AUGMENTS for x in v) and len(set(v)) == len(v)
            and not {"resized_crop", "pad_crop"} <= set(v))


COUNT_LIMIT = 2**31 - 1  # counts beyond it overflow tensor sizes and loops long before they mean anything


def integer(low: int, high: int | None = None, allowed: str | None = None) -> Rule:
    text = allowed or (f"an integer >= {low}" if high is None else f"an integer from {low} to {high}")
    if high is None:
        high, text = COUNT_LIMIT, f"{text} (at most {COUNT_LIMIT})"
    return Rule(lambda v: _integer(v) and low <= v <= high, text)


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite number in [low, high], either end open as asked; high None: no upper bound."""
    def ok(v):
        return (_number(v) and (v > low if low_open else v >= low)
                and (high is None or (v < high if high_open else v <= high)))
    if high is None:
        return Rule(ok, f"a number {'>' if low_open else '>='} {low}")
    return Rule(ok, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def one_of(*options: str) -> Rule:
    return Rule(lambda v: v in options, f"one of {', '.join(options)}")


def pattern(regex: str, allowed: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and re.fullmatch(regex, v) is not None, allowed)


def interval(strict: bool = False, low: float | None = None, high_open: float | None = None) -> Rule:
    """Two numbers [low, high] with low <= high (low < high if strict), optionally inside [low, high_open)."""
    def ok(v):
        if not (isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v)):
            return False
        a, b = v
        return ((a < b if strict else a <= b) and (low is None or a >= low)
                and (high_open is None or b < high_open))
    bounds = f" inside [{low}, {'inf' if high_open is None else high_open})" if low is not None else ""
    return Rule(ok, f"two numbers [low, high] with low {'<' if strict else '<='} high{bounds}")


def each(rule: Rule, length: int | None = None) -> Rule:
    count = f"{length} " if length is not None else ""
    return Rule(lambda v: isinstance(v, list) and (length is None or len(v) == length) and all(rule.ok(x) for x in v),
                f"a list of {count}values, each {rule.allowed}")


def regex() -> Rule:
    def ok(v):
        try:
            re.compile(v)
        except (re.error, TypeError):
            return False
        return True
    return Rule(ok, "a regular expression over parameter names")


COUNT = integer(1)
SEED = integer(0, MAX_SEED, f"an integer from 0 to 2**63-1 ({MAX_SEED})")
# One task gives no confidence interval (it would print ± 0.0000): ask for at least two.
EPISODES = integer(2, allowed="an integer >= 2 (a 95% confidence interval needs at least two tasks)")
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
BATCHING = one_of(*BATCHING_OPTIONS)
DEVICE = pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N (N a GPU index) or mps")
BETAS = each(number(0, 1, high_open=True), 2)

COMMON_RULES: dict[str, Rule] = {
    "device.name": DEVICE,
    "test.checkpoint": one_of("best", "last"),
    "test.eval_seed": SEED,
    "test.episodes": EPISODES,
    "algo.eval_inner_steps": integer(0),
    "algo.batching": BATCHING,
}

TRAIN_RULES: dict[str, Rule] = {
    "seed": SEED,
    "train.meta_batch_size": COUNT,
    "train.iterations": COUNT,
    "train.meta_lr": POSITIVE,
    "train.val_every": COUNT,
    "train.val_episodes": EPISODES,
    "train.log_every": COUNT,
    "train.task_chunk": integer(1, allowed="an integer >= 1, or null (the whole meta-batch on CPU, what fits on CUDA)"),
    **COMMON_RULES,
    # image datasets (data=omniglot, ...); a dataset's own split names, channels and image size: image_rules
    "data.ways": integer(2, allowed="an integer >= 2 (one class is no classification task)"),
    "data.train_ways": integer(2, allowed="an integer >= 2 (one class is no classification task), or null"),
    "data.shots": COUNT,
    "data.queries": COUNT,
    "data.train_shots": integer(1, allowed="an integer >= 1, or null"),
    "data.train_queries": integer(0, allowed="an integer >= 0 (0: algorithms without a query set), or null"),
    "data.split": pattern(r".+", "the name of one of the dataset's splits"),
    "data.channels": Rule(lambda v: v in (1, 3) and _integer(v), "1 (grayscale) or 3 (colour)"),
    "data.image_size": COUNT,
    "data.residency": one_of(*RESIDENCIES),
    "data.memory_share": number(0, 1, low_open=True),
    "data.normalize": Rule(lambda v: isinstance(v, bool), "true or false"),
    "data.augment": Rule(_augments_ok, f"a list of {', '.join(AUGMENTS)} (resized_crop or pad_crop, not both; "
                                       f"[] for none)"),
    # data=sinusoid
    "data.amplitude": interval(),
    "data.phase": interval(),
    "data.x_range": interval(strict=True),
    # model
    "model.hidden": Rule(lambda v: COUNT.ok(v) or each(COUNT).ok(v), "an integer >= 1 (model=mlp: a list of them)"),
    "model.in_features": COUNT,
    "model.out_features": integer(1, allowed="an integer >= 1 (null: no head)"),
    "model.in_channels": COUNT,
    "model.image_size": COUNT,
    "model.variant": one_of(*VARIANTS),
    "model.final_map": one_of(*FINAL_MAPS),
    "model.widths": Rule(lambda v: isinstance(v, list) and len(v) > 0 and each(COUNT).ok(v),
                         "a non-empty list of integers >= 1 (one residual block each)"),
    "model.negative_slope": number(0, 1, high_open=True),
    # algo
    "algo.inner_lr": POSITIVE,
    "algo.inner_steps": COUNT,
    "algo.first_order_iterations": integer(0),
    "algo.msl_iterations": integer(0),
    "algo.lr_init": interval(low=0),
    "algo.adapt": regex(),
    "algo.inner_optimizer": one_of(*INNER_OPTIMIZERS),
    "algo.inner_betas": BETAS,
    "algo.inner_iterations": COUNT,
    "algo.inner_batch_size": COUNT,
    "algo.eval_inner_batch_size": COUNT,
    "algo.distance": one_of(*DISTANCES),
    "algo.cosine_scale": POSITIVE,
    "algo.fce_steps": COUNT,
    "algo.ways": integer(2, allowed="an integer >= 2 (it follows data.ways), or null (regression)"),
    "algo.shots": COUNT,
    "algo.attention_keys": Rule(lambda v: isinstance(v, list) and len(v) > 0 and each(COUNT).ok(v),
                                "a non-empty list of integers >= 1 (one per attention block)"),
    "algo.attention_values": Rule(lambda v: isinstance(v, list) and len(v) > 0 and each(COUNT).ok(v),
                                  "a non-empty list of integers >= 1 (one per attention block)"),
    "algo.tc_filters": Rule(lambda v: isinstance(v, list) and each(COUNT).ok(v),
                            "a list of integers >= 1 (one per TC block: one fewer than the attention blocks)"),
    # optimizer (lr is train.meta_lr unless set directly)
    "optimizer.lr": POSITIVE,
    "optimizer.betas": BETAS,
    "optimizer.momentum": number(0, 1, high_open=True),
    "optimizer.weight_decay": NON_NEGATIVE,
    # scheduler
    "scheduler.factor": number(0, 1),
    "scheduler.total_iters": integer(0),
    "scheduler.T_max": COUNT,
    "scheduler.eta_min": NON_NEGATIVE,
    "scheduler.start_factor": number(0, 1, low_open=True),
    "scheduler.end_factor": number(0, 1),
    "scheduler.step_size": COUNT,
    "scheduler.gamma": POSITIVE,
}

EVAL_RULES: dict[str, Rule] = {
    "batch_size": COUNT,
    "data.residency": one_of(*RESIDENCIES),
    **COMMON_RULES,
}


@dataclass(frozen=True)
class Joint:
    """A rule over several keys of one data source (by its ``_target_``); ``message`` is formatted
    with the keys in effect as {0}, {1}, ... and the sum of their values as {total}."""
    target: str
    keys: tuple[str, ...]
    ok: Callable[..., bool]
    message: str


OMNIGLOT = "metarun.data.omniglot.OmniglotTasks"
# The wording of metarun.data.omniglot, which checks the same against the decoded data.
TOO_MANY_IMAGES = (f"{{0}} + {{1}} = {{total}} exceeds the {IMAGES_PER_CHARACTER} images per Omniglot class: "
                   f"lower {{0}} or {{1}}")
JOINT_RULES = (
    Joint(OMNIGLOT, ("data.shots", "data.queries"), lambda s, q: s + q <= IMAGES_PER_CHARACTER, TOO_MANY_IMAGES),
    Joint(OMNIGLOT, ("data.train_shots", "data.train_queries"), lambda s, q: s + q <= IMAGES_PER_CHARACTER,
          TOO_MANY_IMAGES),
)


def _set_key(cfg: DictConfig, key: str) -> str:
    """``data.train_X`` null means ``data.X``: the key that holds the value in effect."""
    if ".train_" in key and OmegaConf.select(cfg, key, default=None) is None:
        return key.replace(".train_", ".")
    return key


def _value(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _shown(value) -> str:
    return "''" if value == "" else str(value)


def check(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    """Raise one MetarunError for the first key whose value its rule does not allow."""
    for key, rule in rules.items():
        # An interpolation that does not resolve (model=conv4 on sinusoid data) is reported where
        # the object is built, with the fix; absent keys belong to options not chosen.
        node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        value = _value(node)
        if value is None:
            continue
        if not rule.ok(value):
            raise MetarunError(f"{key}={_shown(value)} is not allowed: {key} takes {rule.allowed}")


def check_joint(cfg: DictConfig) -> None:
    target = OmegaConf.select(cfg, "data._target_", default=None)
    for joint in JOINT_RULES:
        if joint.target != target:
            continue
        keys = [_set_key(cfg, k) for k in joint.keys]
        values = [OmegaConf.select(cfg, k, default=None) for k in keys]
        if any(v is None for v in values) or joint.ok(*values):
            continue
        raise MetarunError(joint.message.format(*keys, total=sum(values)))


def image_rules(cfg: DictConfig) -> dict[str, Rule]:
    """The rules a chosen image dataset sets for itself: its split names, channels and image size."""
    from hydra.utils import get_class

    from metarun.config import TARGETS

    target = OmegaConf.select(cfg, "data._target_", default=None)
    if target not in TARGETS["data"].values():  # only classes metarun ships are imported
        return {}
    tasks = get_class(target)
    if not (isinstance(tasks, type) and issubclass(tasks, ImageTasks)):
        return {}
    d = tasks.dataset
    size = d.image_size
    return {
        "data.split": one_of(*d.split_names),
        "data.channels": integer(d.channels, d.channels,
                                 f"{d.channels} ({d.title} is {'grayscale' if d.channels == 1 else 'in colour'})"),
        "data.image_size": integer(size, size, f"{size} ({d.title} is decoded to {size}x{size})"),
    }


def validate_train(cfg: DictConfig) -> None:
    """Every key of a ``metarun train`` config, before the run builds or writes anything."""
    check(cfg, TRAIN_RULES)
    check(cfg, image_rules(cfg))
    check_joint(cfg)


def validate_eval(cfg: DictConfig) -> None:
    """The keys ``metarun eval`` takes itself (the rest comes from the checkpoint's validated run)."""
    check(cfg, EVAL_RULES)
