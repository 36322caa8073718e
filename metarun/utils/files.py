"""Files that appear whole or not at all: checkpoints, metrics, the decoded-data cache."""

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any writer thread starts
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator:
    """Write through a temporary file beside ``path``, fsync, then rename it over ``path``.

    A crash or kill at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, 0o666 & ~_UMASK)  # the mode a plain open() gives; mkstemp's own is 0600
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict_json(value):
    """``value`` with every non-finite float (a diverged metric) as None: standard JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Standard JSON (``jq`` and every parser read it): non-finite numbers are written as null."""
    with atomic_write(path, "w") as f:
        json.dump(strict_json(data), f, indent=2, allow_nan=False)
        f.write("\n")
