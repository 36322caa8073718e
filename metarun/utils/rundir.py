"""A run directory is owned: one run at a time, by the command that made it, and nothing stray is left.

- ``.metarun`` marks a directory as a metarun run directory and names the command that owns it
  (``train`` or ``eval``), so ``eval`` never writes into a training run and no run overwrites a
  folder that is not a metarun run directory.
- ``.metarun.lock`` is held (``flock``) for the life of the run; a second run on the same directory
  is refused with one line naming the holder (pid, host, start, command). The kernel releases the
  lock when the holder dies, even by SIGKILL, so a crashed run never blocks its own resume.
- Hydra writes ``.hydra/`` and creates the directory before the command runs; metarun turns Hydra's
  own record off (``hydra.output_subdir: null``) and writes ``.hydra/`` itself once the run is
  accepted, so a refused or failed attempt changes nothing in an existing run directory.
- ``RunDirCallback`` notes which folders a single run is about to create; a run that fails or is
  refused before it wrote a checkpoint or metrics removes them again.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from metarun.errors import MetarunError

MARKER, LOCK = ".metarun", ".metarun.lock"
HYDRA_RECORD = ("config.yaml", "hydra.yaml", "overrides.yaml")  # the only names ever written under .hydra/

_new_folders: dict[Path, Path] = {}  # run directory -> the topmost folder this process creates for it


def _topmost_missing(path: Path) -> Path | None:
    path = path.absolute()
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


class RunDirCallback(Callback):
    """Hydra callback (``hydra.callbacks``): before Hydra creates a single run's directory, remember
    which folders do not exist yet, so a refused or failed run can remove exactly those."""

    def on_run_start(self, config, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # as run_job does next: the directory's name may use ${hydra:...}
        run_dir = Path(str(config.hydra.run.dir)).absolute()  # ${now:} is cached: the same path Hydra makes
        missing = _topmost_missing(run_dir)
        if missing is not None:
            _new_folders[run_dir] = missing


def _legacy_train_dir(run_dir: Path) -> bool:
    """A training run directory of a metarun from before the marker (it has .hydra/ and a last.pt)."""
    return (run_dir / ".hydra").is_dir() and (run_dir / "checkpoints" / "last.pt").is_file()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _holder(lock_path: Path) -> str:
    info = _read_json(lock_path)
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
            f"({' '.join(str(a) for a in info.get('command', []))})")


@contextlib.contextmanager
def owned(run_dir: Path, command: str):
    """Hold ``run_dir`` for ``command`` (train or eval) for the duration of the block, or refuse in one line."""
    run_dir = Path(run_dir)
    marker = _read_json(run_dir / MARKER) if (run_dir / MARKER).is_file() else None
    if marker is None:
        contents = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
        if contents and not (command == "train" and _legacy_train_dir(run_dir)):
            raise MetarunError(f"{run_dir} is not empty and is not a metarun run directory ({', '.join(sorted(contents)[:3])}"
                               f"{', ...' if len(contents) > 3 else ''}): choose a new or empty hydra.run.dir")
        if contents:
            marker = {"command": "train"}
    owner = (marker or {}).get("command", (marker or {}).get("task", command))  # "task": the first markers' key
    if owner != command:
        raise MetarunError(f"{run_dir} is a metarun {owner} run directory, which metarun {command} never writes into: "
                           f"leave out hydra.run.dir (metarun {command} makes its own) or choose a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise MetarunError(f"{run_dir} is in use by {_holder(run_dir / LOCK)}: wait for that run to end, "
                               f"or choose another hydra.run.dir") from None
        if marker is None or not (run_dir / MARKER).is_file():
            (run_dir / MARKER).write_text(json.dumps({"command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": ["metarun", command, *sys.argv[1:]]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield run_dir
        finally:
            os.ftruncate(fd, 0)  # released: the holder's details go with the lock
    finally:
        os.close(fd)


def remove_if_stray(run_dir: Path) -> None:
    """After a failed or refused single run: remove the folders it created, unless it wrote a
    checkpoint or metrics (what a run leaves for a person) into them."""
    run_dir = Path(run_dir).absolute()
    top = _new_folders.pop(run_dir, None)
    if top is None or not run_dir.is_dir():
        return
    if (run_dir / "checkpoints").exists() or (run_dir / "metrics.json").exists():
        return
    if (run_dir / LOCK).is_file():
        # Two runs that started on the same new directory both saw it missing: the one refused
        # must not remove what the holder is writing.
        fd = os.open(run_dir / LOCK, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        finally:
            os.close(fd)
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in (run_dir, *run_dir.parents):
        if folder == top.parent:
            break
        with contextlib.suppress(OSError):
            folder.rmdir()  # only while empty


def write_hydra_record(run_dir: Path, cfg) -> dict[str, str]:
    """Write ``.hydra/{config,hydra,overrides}.yaml`` for the accepted run ``cfg``, as Hydra would,
    and return them (checkpoints keep them for reference; nothing is ever written back from one)."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    texts = {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml({"hydra": hydra_cfg}),
             "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task)}
    folder = Path(run_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name in HYDRA_RECORD:
        (folder / name).write_text(texts[name])
    return texts


def run_overrides() -> list[str]:
    """The overrides that made this run (its ``hydra.*`` ones aside): what a bare resume reapplies."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("hydra")]
