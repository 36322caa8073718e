"""The decoded-image cache: one folder per dataset and decoding, written whole or not at all.

A store folder holds ``images.bin`` (every image as uint8 (C, H, W), classes one after another) and
``index.json`` (shape, class names, counts, split tags, the sha256 of the image bytes, the dataset's
meta). A writer fills a temporary folder beside the target and renames it onto the target only after
``index.json`` is written and everything is fsynced, so a killed decode leaves no folder a reader could
take for a finished one; the next writer removes the stale temporary folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from metarun.utils.files import STALE_TEMP_SECONDS

log = logging.getLogger("metarun")

STORE_FORMAT = "metarun-image-store"
# Bump when the folder's layout or meaning changes: old folders then stop matching (store_folder hashes it).
STORE_VERSION = 1
IMAGES_FILE = "images.bin"
INDEX_FILE = "index.json"
_HASH_BLOCK = 1 << 20  # fingerprint: bytes hashed at each end of a source file


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for p in folder.iterdir():
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            pass
    return max(times)


WRITER_LOCK = ".writer.lock"  # flocked by the writer of a temporary store folder for as long as it lives


def _writer_gone(tmp: Path) -> bool | None:
    """Whether the writer of ``tmp`` has died (its lock is free), or None where it left no lock to ask."""
    try:
        fd = os.open(tmp / WRITER_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_store_temps(folder: Path, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Temporary folders of writers of ``folder`` that were killed before they finished: at once where the
    writer's lock is free (a killed tieredImageNet decode leaves up to 16.5 GB), else once untouched for
    ``older_than`` s."""
    removed = []
    cutoff = time.time() - older_than
    try:
        candidates = sorted(folder.parent.glob(f".{folder.name}.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        try:
            if not tmp.is_dir() or tmp.is_symlink():
                continue
            gone = _writer_gone(tmp)
            if gone or (gone is None and _newest_mtime(tmp) < cutoff):
                shutil.rmtree(tmp)
                removed.append(tmp)
                log.info(f"removed {tmp}, left by an interrupted decode")
        except OSError:
            continue
    return removed


class StoreWriter:
    """Streams a decoded dataset to ``folder`` class by class; the folder appears, whole, on a clean exit.

    ``with StoreWriter(folder, 3, 84, 84, meta={...}) as w: w.add_class("n01532829", images, "train")``
    """

    def __init__(self, folder: Path, channels: int, height: int, width: int, meta: dict | None = None):
        self.folder = Path(folder)
        self.shape = (int(channels), int(height), int(width))
        self.meta = dict(meta or {})
        self.class_names: list[str] = []
        self.counts: list[int] = []
        self.splits: list[str | None] = []
        self._tmp: Path | None = None
        self._lock: int | None = None
        self._file = None
        self._hash = hashlib.sha256()

    def __enter__(self) -> "StoreWriter":
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_store_temps(self.folder)
        self._tmp = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=f".{self.folder.name}.", suffix=".tmp"))
        self._lock = os.open(self._tmp / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        self._file = open(self._tmp / IMAGES_FILE, "wb")
        return self

    def add_class(self, name: str, images: np.ndarray, split: str | None = None) -> None:
        """Append one class: uint8 (n, C, H, W) in that order. ``split`` tags the class when the source files
        define the split (miniImageNet's train/val/test pickles); None otherwise."""
        if self._file is None:
            raise RuntimeError("StoreWriter.add_class outside its with block")
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"class {name!r}: expected uint8 images of shape (n, {', '.join(map(str, self.shape))}), "
                             f"got {images.dtype} {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError(f"class {name!r} has no images")
        data = np.ascontiguousarray(images).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.class_names.append(str(name))
        self.counts.append(len(images))
        self.splits.append(split)

    def index(self) -> dict:
        return {"format": STORE_FORMAT, "version": STORE_VERSION, "shape": list(self.shape),
                "images": sum(self.counts), "class_names": self.class_names, "counts": self.counts,
                "splits": self.splits, "sha256": self._hash.hexdigest(), "meta": self.meta}

    def __exit__(self, exc_type, exc, tb) -> bool:
        tmp, self._tmp = self._tmp, None
        try:
            if exc_type is None:
                if not self.counts:
                    raise ValueError(f"no class was written to {self.folder}")
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                with open(tmp / INDEX_FILE, "w") as f:  # last: a folder without it is never read
                    json.dump(self.index(), f)
                    f.flush()
                    os.fsync(f.fileno())
                os.unlink(tmp / WRITER_LOCK)  # not part of the store (still held until the end)
                _fsync_dir(tmp)
                old = None
                if self.folder.exists():  # an unusable or concurrent store: moved aside, then removed
                    old = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=f".{self.folder.name}.", suffix=".tmp"))
                    os.replace(self.folder, old / "old")
                os.replace(tmp, self.folder)
                _fsync_dir(self.folder.parent)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                tmp = None
        finally:
            if self._file is not None and not self._file.closed:
                self._file.close()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
        return False


def store_folder(cache_dir: Path, dataset: str, key: dict) -> Path:
    """``<cache_dir>/<dataset>-<16 hex of sha256(key)>``: one folder per content, split and decoding."""
    text = json.dumps({"store_version": STORE_VERSION, **key}, sort_keys=True, default=str)
    return Path(cache_dir) / f"{dataset}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def fingerprint(paths: list[Path]) -> str:
    """Content key of source files: names, sizes and sha256 of each file's first and last MB (fast on GBs,
    and any re-download, truncation or replacement changes it)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(_HASH_BLOCK))
            if size > _HASH_BLOCK:
                f.seek(max(size - _HASH_BLOCK, _HASH_BLOCK))
                h.update(f.read(_HASH_BLOCK))
    return h.hexdigest()
