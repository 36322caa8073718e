"""An experiment from a composed config: the data source, network and algorithm a command runs.

``metarun train`` and ``metarun eval`` share this assembly (and what makes two runs' numbers
comparable, ``protocol``), so the evaluator never imports the trainer.
"""

import dataclasses
import inspect
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun.algos.base import MetaAlgorithm
from metarun.algos.gradient import GradientBased
from metarun.config import conf_dir, schema
from metarun.data.store import device_memory, size_text
from metarun.errors import MetarunError
from metarun.models.batchnorm import batch_norm_mode
from metarun.utils.runtime import build, resolve_device, target_class
from metarun.utils.targets import group_options


# model.flatten (bool) became model.final_map: true flattened the strided network's last map
# (final_map=flatten); false took the variant's own (final_map=null), as the maxpool variant always flattened.
_FLATTEN_OVERRIDE = re.compile(r"^model\.flatten=(true|false)$", re.IGNORECASE)


def upgraded_config(saved: dict) -> dict:
    """A checkpoint's config in today's key names, for checkpoints written before a key was renamed."""
    model = saved.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("flatten"), bool)):
        return saved  # (a non-bool flatten stays, and the model's schema refuses it)
    model = {k: v for k, v in model.items() if k != "flatten"} | {"final_map": "flatten" if model["flatten"] else None}
    return {**saved, "model": model}


def upgraded_override(override: str) -> str:
    """A saved command-line override in today's key names (see ``upgraded_config``)."""
    found = _FLATTEN_OVERRIDE.match(override)
    if found is None:
        return override
    return "model.final_map=flatten" if found.group(1).lower() == "true" else "model.final_map=null"


def build_experiment(cfg: DictConfig):
    """Device, task source and algorithm (with its freshly seeded network) from a composed config."""
    device = resolve_device(cfg.device.name)
    check_algorithm_fits(cfg)
    data = build(cfg.data)
    check_network_fits(cfg, data.problem, device)
    torch.manual_seed(cfg.seed)
    try:
        model = build(cfg.model)
    except OmegaConfBaseException as e:
        raise MetarunError(
            f"model {cfg.model._target_} does not fit data {cfg.data._target_} ({str(e).splitlines()[0]}): "
            f"choose the model made for this data (model=conv4 for images, model=mlp for sinusoid)"
        ) from None
    train_ways, ways = cfg.data.get("train_ways"), cfg.data.get("ways")
    if train_ways is not None and train_ways != ways and cfg.model.get("out_features") is not None:
        raise MetarunError(
            f"data.train_ways={train_ways} differs from data.ways={ways}, but the network ends in a {ways}-way head: "
            f"only the metric-based algorithms (algo=protonet, algo=matchingnet with model=conv4_embedding) train "
            f"on other ways than they test on"
        )
    algo = build(cfg.algo, model=model, problem=data.problem)
    return device, data.to(device), algo.to(device)


# Bytes a parameter holds at least while it trains: itself, its gradient and two moment estimates (Adam).
TRAINING_COPIES = 4


def check_network_fits(cfg: DictConfig, problem: str, device: torch.device) -> None:
    """Refuse, in one line, a network whose parameters alone (with their gradients and optimiser state) exceed
    the device's memory: a huge ``model.hidden`` or ``algo.attention_keys`` would otherwise end in the kernel's
    out-of-memory kill, with no message. Counted on the meta device, so nothing is allocated; a config that
    does not build there is left to the real build, which reports it."""
    try:
        with torch.device("meta"):
            algo = build(cfg.algo, model=build(cfg.model), problem=problem)
    except Exception:  # noqa: BLE001 (the real build below reports what is wrong)
        return
    count = sum(p.numel() for p in algo.parameters())
    need = TRAINING_COPIES * sum(p.numel() * p.element_size() for p in algo.parameters())
    total = device_memory(device)
    if need > total:
        raise MetarunError(f"the network has {count:,} parameters: with their gradients and optimiser state they "
                           f"need {size_text(need)}, more than the {size_text(total)} of {device.type}: make it "
                           f"smaller (the model.* and algo.* sizes)")


def check_algorithm_fits(cfg: DictConfig) -> None:
    """The algorithm's needs of the other groups, with the option that meets them, before anything is
    built. (Its constructor checks the same in terms of its own arguments; the fix is another group's
    option, which only the config knows.)"""
    algo_class, problem = target_class(cfg.algo), target_class(cfg.data).problem
    name = f"algo={group_options()['algo'].get(cfg.algo._target_, algo_class.__name__)}"
    if problem not in algo_class.problems:
        raise MetarunError(f"{name} classifies queries by their labelled support images: it needs "
                           f"{' or '.join(algo_class.problems)} data (data=omniglot), not {problem} tasks")
    queries = cfg.data.get("train_queries")
    queries = cfg.data.get("queries") if queries is None else queries
    if algo_class.learns_from_queries and queries == 0:
        # Only classification data has separate training tasks (data.train_queries); regression has data.queries.
        key = "data.train_queries" if "train_queries" in cfg.data else "data.queries"
        raise MetarunError(f"{name} learns from the query examples of its training tasks, but they have none: "
                           f"set {key} to at least 1")
    for key in cfg.algo:  # a key the algorithm lacks, appended (+algo.inner_lr=0.1): refused before its constructor
        if line := inapplicable(f"algo.{key}", cfg.algo._target_):
            raise MetarunError(line)
    # Unresolved: a head sized by the data (out_features: ${data.ways}) is a head even where the data has no ways.
    if algo_class.embeds and OmegaConf.to_container(cfg.model, resolve=False).get("out_features") is not None:
        raise MetarunError(f"{name} needs a headless embedding network, but the model ends in a linear head: "
                           f"use model={embedding_for(cfg)} (or an experiment config)")
    if algo_class.fixed_task_shape:
        for key in ("ways", "shots"):
            train, test = cfg.data.get(f"train_{key}"), cfg.data.get(key)
            if train is not None and train != test:
                raise MetarunError(f"{name} is sized for the test tasks' {key} (data.{key}={test}), so it trains on "
                                   f"tasks of the same {key}: leave out data.train_{key}={train} (or set data.{key})")
            # The algorithm's own copy (algo.ways: ${data.ways}) sizes the network: an override that parts them
            # would fail on the first task, mid-run.
            sized = cfg.algo.get(key)
            if key in cfg.algo and test is not None and sized != test:
                raise MetarunError(f"{name} sizes its network with algo.{key}={sized}, but the tasks have "
                                   f"data.{key}={test}: leave out algo.{key} (it follows data.{key})")


def embedding_for(cfg: DictConfig) -> str:
    """The headless network for this data: the chosen network's own variant where one ships and it takes
    this data's input (model=resnet12 -> resnet12_embedding), else the default for images or vectors."""
    images = "channels" in cfg.data
    own = f"{group_options()['model'].get(cfg.model.get('_target_'))}_embedding"
    if (Path(conf_dir()) / "model" / f"{own}.yaml").is_file() and ("in_channels" in cfg.model) == images:
        return own
    return "conv4_embedding" if images else "mlp_embedding"


def inner_loop_keys() -> list[str]:
    """The gradient engine's inner-loop settings: ``GradientBased``'s own constructor arguments."""
    shared = inspect.signature(MetaAlgorithm.__init__).parameters
    return [k for k in inspect.signature(GradientBased.__init__).parameters if k not in shared]


def not_applicable(algo: DictConfig | dict) -> list[str]:
    """The inner-loop keys (``inner_loop_keys``) an algorithm's config lacks: all of them where it has no inner
    loop (ProtoNets, SNAIL), those it replaces with its own otherwise (Reptile's inner_iterations)."""
    return [f"algo.{k}" for k in inner_loop_keys() if k not in algo]


def inapplicable(key: str, target: object, command: str = "train") -> str | None:
    """The one line for an inner-loop key (``algo.inner_steps``) set on the algorithm ``target`` names, which
    lacks it (``not_applicable``); None for any other key."""
    name = group_options()["algo"].get(target) if isinstance(target, str) else None
    if name is None or not key.startswith("algo."):
        return None
    missing = not_applicable({f.name for f in dataclasses.fields(schema("algo", name))})
    if key not in missing:
        return None
    if len(missing) == len(inner_loop_keys()):
        return (f"{key} does not apply to algo={name}: it has no inner loop ({', '.join(missing)} are the "
                f"gradient-based algorithms' keys); leave it out")
    return (f"{key} does not apply to algo={name}: its inner loop takes its own keys instead "
            f"('metarun {command} algo={name} --cfg job' lists them); leave it out")


def flat_config(cfg: DictConfig) -> dict:
    """Resolved config as ``{"group.key": value}``, the form TensorBoard's hparams and diffs want."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def protocol(cfg: DictConfig, algo) -> dict:
    """What makes two runs' numbers comparable, in one place (metrics.json and the TensorBoard hparams)."""
    data = cfg.data
    # Where the algorithm has no inner loop (ProtoNets, SNAIL), none of the engine's keys applies and its
    # eval_inner_steps is 0 by nature; an inner-loop algorithm's own keys (Reptile's inner_iterations) are in its config.
    missing = not_applicable(cfg.algo)
    no_inner_loop = {"not_applicable": missing} if len(missing) == len(inner_loop_keys()) else {}
    train_tasks = {f"train_{k}": data.get(f"train_{k}") if data.get(f"train_{k}") is not None else data.get(k)
                   for k in ("ways", "shots", "queries")}
    return {
        "split": data.get("split"), "ways": data.get("ways"), "shots": data.shots, "queries": data.queries,
        **train_tasks, "test_episodes": cfg.test.episodes, "eval_inner_steps": algo.eval_inner_steps,
        "checkpoint": cfg.test.checkpoint, "batch_norm": batch_norm_mode(algo.model, algo.transductive),
        "eval_seed": cfg.test.eval_seed, **no_inner_loop,
    }
