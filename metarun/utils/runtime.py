"""Device choice, seeding and object construction from ``_target_`` configs."""

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metarun.errors import MetarunError


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


def build(cfg: DictConfig, **kwargs):
    """The one place that turns a ``_target_`` config into an object (Hydra 1.4 wants a target allow-list)."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, MetarunError):
            raise cause from None
        message = str(cause if cause is not None else e).strip().splitlines()
        raise MetarunError(f"could not build {cfg.get('_target_')}: {message[-1] if message else e}") from None


def require_positive(cfg: DictConfig, *keys: str) -> None:
    """Counts such as iterations and episodes must be at least 1."""
    for key in keys:
        if OmegaConf.select(cfg, key) < 1:
            raise MetarunError(f"{key} must be at least 1, got {OmegaConf.select(cfg, key)}")
