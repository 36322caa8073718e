"""An experiment from a composed config: the data source, network and algorithm a command runs.

``metarun train`` and ``metarun eval`` share this assembly (and what makes two runs' numbers
comparable, ``protocol``), so the evaluator never imports the trainer.
"""

import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun.config import conf_dir
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
    if algo_class.embeds and cfg.model.get("out_features") is not None:
        # The headless variant of the chosen network where one ships (model=resnet12 -> resnet12_embedding).
        model = group_options()["model"].get(cfg.model.get("_target_"))
        embedding = f"{model}_embedding" if (Path(conf_dir()) / "model" / f"{model}_embedding.yaml").is_file() \
            else "conv4_embedding"
        raise MetarunError(f"{name} needs a headless embedding network, but the model ends in a linear head: "
                           f"use model={embedding} (or an experiment config)")


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
    train_tasks = {f"train_{k}": data.get(f"train_{k}") if data.get(f"train_{k}") is not None else data.get(k)
                   for k in ("ways", "shots", "queries")}
    return {
        "split": data.get("split"), "ways": data.get("ways"), "shots": data.shots, "queries": data.queries,
        **train_tasks, "test_episodes": cfg.test.episodes, "eval_inner_steps": algo.eval_inner_steps,
        "checkpoint": cfg.test.checkpoint, "batch_norm": batch_norm_mode(algo.model, algo.transductive),
        "eval_seed": cfg.test.eval_seed,
    }
