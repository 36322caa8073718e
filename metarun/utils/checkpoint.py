"""Checkpoints: one self-describing dict per file, written atomically, read as untrusted data.

A checkpoint holds everything needed to continue the run exactly or to evaluate it alone:
the algorithm's and optimiser's state, the iteration, the best validation result and the
validation history, the resolved config, the overrides that made it, and the RNG states (torch,
CUDA, the task sampler). It is read with ``weights_only=True`` and every key it must have is checked,
so a damaged, foreign or crafted file is one line of error, never a silent default or a traceback.
"""

import warnings
from pathlib import Path

import torch

from metarun.errors import MetarunError
from metarun.utils.files import atomic_write

FORMAT = "metarun-checkpoint"
# 2: adds "overrides" (what a bare ``metarun train hydra.run.dir=X`` resumes with) and the wall clock.
VERSION = 2
# What every reader needs, and what a resume needs besides (version 1 lacks the keys of version 2).
FOR_EVAL = {"iteration": int, "algo": dict, "config": dict, "metric": str}
FOR_RESUME = {**FOR_EVAL, "optimizer": dict, "scheduler": dict, "rng": dict, "history": list, "seconds": float}


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash, a kill or a full disk during the save leaves the previous checkpoint intact."""
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path: Path, needs: dict = FOR_EVAL) -> dict:
    """The checkpoint at ``path``, with the keys ``needs`` names checked for presence and type."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise MetarunError(f"checkpoint {path} is a folder, not a file: pass the path of a checkpoints/best.pt or last.pt")
    if not path.is_file():
        raise MetarunError(f"checkpoint {path} does not exist: pass the path of a checkpoints/best.pt or last.pt")
    try:
        with warnings.catch_warnings():  # torch's warnings about foreign pickles: the error below says it in one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetarunError(f"checkpoint {path} is unreadable ({reason}): use another checkpoint or a new run directory") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MetarunError(f"{path} is not a metarun checkpoint: pass a checkpoints/best.pt or last.pt written by metarun")
    version = state.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise MetarunError(f"{path} has checkpoint format version {version!r}, and this metarun reads versions 1 to "
                           f"{VERSION}: use the metarun that wrote it (pip install -U metarun)")
    if version == 1 and "seconds" in state and isinstance(state["seconds"], (int, float)):
        state["seconds"] = float(state["seconds"])
    for key, kind in needs.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            got = "missing" if key not in state else f"a {type(value).__name__}"
            raise MetarunError(f"{path} is damaged or incomplete: its '{key}' is {got}, not a {kind.__name__}; "
                               f"use another checkpoint or a new run directory")
    weights = state.get("algo")
    if isinstance(weights, dict) and any(isinstance(t, torch.Tensor) and t.is_floating_point()
                                         and not torch.isfinite(t).all() for t in weights.values()):
        # metarun never saves them (a non-finite meta-loss stops training before the step)
        raise MetarunError(f"{path} holds non-finite (NaN or infinite) weights: it is damaged; "
                           f"use another checkpoint or a new run directory")
    return state


def load_state(target, state: dict, path: Path, what: str) -> None:
    """``target.load_state_dict(state)`` with a mismatch (missing keys, other shapes) as one line."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:300] + "..."
        raise MetarunError(f"{path} does not fit this run's {what} ({reason}): evaluate or resume it with the "
                           f"config it was written with") from None
