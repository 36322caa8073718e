"""Files that appear whole or not at all: checkpoints, metrics, the decoded-data cache."""

import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
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


# A temporary file untouched this long has lost its writer. Age, not the writer's pid: the pid is not in
# the name (mkstemp picks it) and means nothing on another machine sharing the folder (NFS, a cluster's
# data disk). Live writers touch their file far more often: a cache write takes seconds and a download
# writes at least once per read timeout (60 s) or fails.
STALE_TEMP_SECONDS = 15 * 60


def remove_stale_temps(folder: Path, patterns: Iterable[str], older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete files in ``folder`` matching ``patterns`` (e.g. ``.name.*.tmp`` of ``atomic_write``) that were
    last modified more than ``older_than`` seconds ago: leftovers of a killed writer. Returns what it removed;
    a folder that cannot be read or written is left alone."""
    cutoff = time.time() - older_than
    removed = []
    for pattern in patterns:
        try:
            candidates = sorted(Path(folder).glob(pattern))
        except OSError:
            continue
        for path in candidates:
            try:
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except OSError:  # gone meanwhile, or a read-only folder: nothing to clean here
                continue
    return removed


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
