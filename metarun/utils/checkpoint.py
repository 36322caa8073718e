"""Checkpoints: one self-describing dict per file, written atomically.

A checkpoint holds everything needed to continue the run exactly or to evaluate it alone:
the algorithm's and optimiser's state, the iteration, the best validation result and the
validation history, the resolved config, and the RNG states (torch, CUDA, the task sampler).
"""

import os
import tempfile
from pathlib import Path

import torch

from metarun.errors import MetarunError
from metarun.utils.task import umask_mode

FORMAT = "metarun-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or kill at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, umask_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
