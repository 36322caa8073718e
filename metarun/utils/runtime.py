"""Device choice, seeding and object construction from ``_target_`` configs."""

import re

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from metarun.errors import MetarunError
from metarun.utils.targets import check_target


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = f"unknown device '{name}': use device=auto, device=cpu or device=cuda (device.name=cuda:N)"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise MetarunError(unknown) from None
    if device.type not in ("cpu", "cuda", "mps") or (device.index is not None and device.index < 0):
        raise MetarunError(unknown)  # meta, xla, ...: torch names them, but a run cannot compute there
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MetarunError("device.name=mps was asked for but MPS (Apple GPUs) is not available here: "
                           "use device=auto or device=cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MetarunError("device=cuda was asked for but CUDA is not available here: use device=auto or device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MetarunError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                           f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _targets(node) -> list:
    """Every ``_target_`` in a config tree (Hydra instantiates nested ones too)."""
    if isinstance(node, dict):
        return [node["_target_"]] * ("_target_" in node) + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


_YAML = {"True": "true", "False": "false", "None": "null"}


def in_config_keys(message: str, cfg: DictConfig) -> str:
    """A library's message about its own arguments, in the keys of the config that passed them.

    metarun's classes raise ``ValueError``/``TypeError`` naming their constructor arguments
    (``inner_lr must be positive``); the user set them as ``<group>.<key>`` (``algo.inner_lr``), in
    YAML's spelling (``algo.fce=true``). Only the keys of ``cfg`` are translated, and only where
    ``cfg`` sits in a group of the composed config."""
    group, keys = cfg._key(), [k for k in cfg.keys() if isinstance(k, str) and not k.startswith("_")]
    if not isinstance(group, str) or not keys:
        return message
    names = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))

    def key(found: re.Match) -> str:
        value = found.group(2)
        return f"{group}.{found.group(1)}" + (f"={_YAML[value]}" if value else "")

    return re.sub(rf"(?<![\w.])({names})\b(?:=(True|False|None)\b)?", key, message)


def target_class(cfg: DictConfig) -> type:
    """The class a config's ``_target_`` names, checked against the allow-list, without building it."""
    check_target(cfg.get("_target_"), "the config")
    return get_class(cfg._target_)


def build(cfg: DictConfig, **kwargs):
    """The one place that turns a ``_target_`` config into an object, and only into metarun's own
    classes (the allow-list of ``utils/targets.py``): a config read from disk is data, never code.
    A constructor's complaint about its arguments reaches the user in the config's keys."""
    for target in _targets(OmegaConf.to_container(cfg, resolve=False)):
        check_target(target, "the config")
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, MetarunError):
            raise cause from None
        message = str(cause if cause is not None else e).strip().splitlines()
        reason = message[-1] if message else str(e)
        if isinstance(cause, (ValueError, TypeError)):
            reason = in_config_keys(reason, cfg)
        raise MetarunError(f"could not build {cfg.get('_target_')}: {reason}") from None
