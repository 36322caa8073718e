"""The disk cache of execution decisions: one JSON file per user, keyed by machine and torch version,
so the jobs of a sweep (and every later run on the machine) tune a shape once (see metarun.execution)."""

import json
import logging
import os
import platform
import socket
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("metarun")

CACHE_ENV = "METARUN_EXECUTION_CACHE"


def cache_path() -> Path:
    """``$METARUN_EXECUTION_CACHE``, else ``$XDG_CACHE_HOME/metarun/execution.json`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metarun" / "execution.json"


def machine(device: torch.device) -> str:
    """What a timing holds for: the host, its CPU model or GPU name, and the torch version."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    chip = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"{socket.gethostname()}|{chip}|torch {torch.__version__}"


def read_cache(path: Path, warn: bool = True) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError("not a JSON object of machines")
        return data
    except (OSError, ValueError) as e:
        if warn:
            log.warning(f"ignoring the execution cache {path} ({' '.join(str(e).split())[:100]}); it will be rewritten")
        return {}


def write_cache(path: Path, machine_id: str, decisions: dict) -> None:
    """Merge ``decisions`` into the cache under ``machine_id``, atomically (a reader never sees half a file)."""
    try:
        data = read_cache(path, warn=False)  # a damaged file was reported when it was read for the decision
        data.setdefault(machine_id, {}).update(decisions)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home only costs the next run its tuning
        log.warning(f"could not write the execution cache {path}: {e}")
