"""Checkpoints: one self-describing dict per file, written atomically.

A checkpoint holds everything needed to continue the run exactly or to evaluate it alone:
the algorithm's and optimiser's state, the iteration, the best validation result and the
validation history, the resolved config, and the RNG states (torch, CUDA, the task sampler).
"""

from pathlib import Path

import torch

from metarun.errors import MetarunError
from metarun.utils.files import atomic_write

FORMAT = "metarun-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash or kill during the save leaves the previous checkpoint intact."""
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MetarunError(f"checkpoint {path} does not exist: pass the path of a checkpoints/best.pt or last.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetarunError(f"checkpoint {path} is unreadable ({reason}): use another checkpoint or a new run directory") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MetarunError(f"{path} is not a metarun checkpoint: pass a checkpoints/best.pt or last.pt written by metarun")
    return state
