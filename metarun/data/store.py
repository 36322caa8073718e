"""One image store for every dataset: flat (N, C, H, W) uint8 images, per-class offsets and counts.

Two residencies. ``device``: the whole store is one tensor on the run's device and a batch of tasks is
one indexing operation. ``memmap``: the store stays in its file (``metarun.data.cache``) and each batch
reads only its images, with positional reads (``os.preadv``) straight into pinned host memory, then
copies them to the device without blocking. Positional reads map nothing, so however many episodes a
run draws, the process holds only the batch it reads (a tieredImageNet store is 16.5 GB; a memory map
would pile its touched pages up in the process's resident memory).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import torch

from metarun.data.cache import IMAGES_FILE, INDEX_FILE, STORE_FORMAT, STORE_VERSION
from metarun.errors import DataError

RESIDENCIES = ("auto", "device", "memmap")
_LOAD_CHUNK = 256 << 20  # bytes per read when a file-backed store is loaded onto a device


def size_text(nbytes: int) -> str:
    """``25.4 MB``, ``16.5 GB``: decimal units, as disk sizes are quoted."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def device_memory(device: torch.device) -> int:
    """Total memory of ``device`` in bytes: the GPU's (CUDA), else the machine's physical RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ImageStore:
    """Flat (N, C, H, W) uint8 images; class i is images[offsets[i] : offsets[i] + counts[i]]."""

    def __init__(self, shape: tuple[int, int, int], counts, class_names: list[str],
                 splits_of_class: list[str | None] | None = None, images: torch.Tensor | None = None,
                 path: Path | None = None, meta: dict | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.class_names = list(class_names)
        self.splits_of_class = list(splits_of_class) if splits_of_class is not None else [None] * len(self.counts)
        if len(self.class_names) != len(self.counts) or len(self.splits_of_class) != len(self.counts):
            raise ValueError("class_names, counts and splits_of_class must have one entry per class")
        self.num_images = int(self.counts.sum())
        self.image_bytes = int(np.prod(self.shape))
        self.nbytes = self.num_images * self.image_bytes
        self.meta = dict(meta or {})
        self.path = Path(path) if path is not None else None  # the images file, where the store has one
        self.images = images  # (N, C, H, W) uint8 on self.device when resident there, else None
        self.device = images.device if images is not None else torch.device("cpu")
        self.residency = "device" if images is not None else "memmap"
        self.reason = "in memory" if images is not None else "read from its file per batch"
        self._fd: int | None = None
        self._fd_lock = threading.Lock()  # the prefetch thread and the loop may open it first

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path) -> "ImageStore":
        """The store in ``folder`` (written by StoreWriter), checked against its image file; a missing,
        unfinished or inconsistent folder is a DataError (the caller rebuilds it)."""
        folder = Path(folder)
        index_path, images_path = folder / INDEX_FILE, folder / IMAGES_FILE
        try:
            index = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise DataError(f"image store {folder} is unfinished or missing (no {INDEX_FILE}): delete it to decode again") from None
        except (OSError, ValueError) as e:
            raise DataError(f"image store {folder} has an unreadable {INDEX_FILE} ({e}): delete the folder to decode again") from None
        try:
            if index["format"] != STORE_FORMAT or index["version"] != STORE_VERSION:
                raise ValueError(f"format {index['format']} v{index['version']}, expected {STORE_FORMAT} v{STORE_VERSION}")
            shape = tuple(int(s) for s in index["shape"])
            counts = [int(c) for c in index["counts"]]
            names, splits = [str(n) for n in index["class_names"]], list(index["splits"])
            if len(shape) != 3 or min(shape) < 1 or not counts or min(counts) < 1:
                raise ValueError("bad shape or counts")
            if len(names) != len(counts) or len(splits) != len(counts) or sum(counts) != int(index["images"]):
                raise ValueError("class names, counts, splits and image count disagree")
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"image store {folder} has an invalid {INDEX_FILE} ({e}): delete the folder to decode again") from None
        expected = sum(counts) * int(np.prod(shape))
        try:
            actual = images_path.stat().st_size
        except OSError:
            actual = -1
        if actual != expected:
            raise DataError(f"image store {folder}: {IMAGES_FILE} holds {actual} bytes, its index says {expected}: "
                            f"delete the folder to decode again")
        return cls(shape, counts, names, splits, path=images_path, meta=index.get("meta"))

    @classmethod
    def from_tensor(cls, images: torch.Tensor, counts, class_names: list[str],
                    splits_of_class: list[str | None] | None = None) -> "ImageStore":
        """An in-memory store over ``images`` (N, C, H, W) uint8 (Omniglot, decoded by its own cache)."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        store = cls(tuple(images.shape[1:]), counts, class_names, splits_of_class, images=images)
        if store.num_images != len(images):
            raise ValueError(f"counts sum to {store.num_images}, but there are {len(images)} images")
        return store

    # -- residency -------------------------------------------------------------------------------
    def choose(self, device, residency: str = "auto", memory_share: float = 0.5) -> tuple[str, str]:
        """The residency for ``device`` and why, in one line."""
        if residency not in RESIDENCIES:
            raise ValueError(f"residency must be one of {', '.join(RESIDENCIES)}, got {residency!r}")
        device = torch.device(device)
        total = device_memory(device)
        size, where = size_text(self.nbytes), f"{device.type} memory ({size_text(total)})"
        if residency == "device":
            if self.nbytes > total:
                raise DataError(f"data.residency=device: the {size} image store exceeds the {where}: "
                                f"use data.residency=memmap (or auto)")
            return "device", f"{size} store on {device} (data.residency=device)"
        if residency == "memmap":
            return "memmap", f"{size} store read from disk per batch (data.residency=memmap)"
        if self.nbytes <= memory_share * total:
            return "device", f"{size} store on {device}: fits in data.memory_share={memory_share:g} of {where}"
        return "memmap", (f"{size} store read from disk per batch: more than data.memory_share={memory_share:g} "
                          f"of {where}")

    def place(self, device, residency: str = "auto", memory_share: float = 0.5) -> str:
        """Put the store where ``residency`` (auto: where it fits) says for ``device``; returns the reason."""
        device = torch.device(device)
        chosen, reason = self.choose(device, residency, memory_share)
        if chosen == "memmap":
            if self.path is None:
                raise ValueError("an in-memory store has no file to read from: write it with StoreWriter and open it")
            self.images = None
        elif self.images is None:
            self.images = self._load(device)
        else:
            self.images = self.images.to(device)
        self.device, self.residency, self.reason = device, chosen, reason
        return reason

    def _load(self, device: torch.device) -> torch.Tensor:
        """The whole file on ``device``, read in chunks (no second full copy in host memory)."""
        out = torch.empty((self.num_images, *self.shape), dtype=torch.uint8, device=device)
        flat = out.view(-1)
        pin = device.type == "cuda"
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, self.nbytes, _LOAD_CHUNK):
                n = min(_LOAD_CHUNK, self.nbytes - start)
                host = flat[start : start + n] if device.type == "cpu" else torch.empty(n, dtype=torch.uint8, pin_memory=pin)
                if f.readinto(memoryview(host.numpy())) != n:
                    raise DataError(f"image store {self.path.parent} is truncated: delete it to decode again")
                if device.type != "cpu":
                    flat[start : start + n].copy_(host)
        return out

    # -- reading ---------------------------------------------------------------------------------
    def indices(self, classes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat image indices (T, n, k) of ``positions`` (T, n, k) within ``classes`` (T, n)."""
        return self.offsets[classes.cpu()][..., None] + positions.cpu()

    def read(self, classes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The images (T, n, k, C, H, W) in host memory (pinned when the store serves a CUDA device), read
        from the file: safe to call from a background thread."""
        index = self.indices(classes, positions)
        pin = self.device.type == "cuda"
        out = torch.empty((*index.shape, *self.shape), dtype=torch.uint8, pin_memory=pin)
        rows = out.view(-1, self.image_bytes).numpy()
        with self._fd_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
        step = self.image_bytes
        for row, i in zip(rows, index.reshape(-1).tolist()):
            if os.preadv(self._fd, [row], i * step) != step:
                raise DataError(f"image store {self.path.parent} is truncated: delete it to decode again")
        return out

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` (from ``read``) on the store's device, without blocking the host on a pinned copy."""
        return host.to(self.device, non_blocking=host.is_pinned())

    def gather(self, classes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """classes (T, n) class indices, positions (T, n, k) image positions within each class ->
        uint8 (T, n, k, C, H, W) on the run's device (memmap: read through pinned host memory, non_blocking)."""
        if self.images is not None:
            index = self.indices(classes, positions).to(self.images.device)
            return self.images[index]
        return self.upload(self.read(classes, positions))

    def class_images(self, i: int) -> torch.Tensor:
        """All images of class ``i`` (count, C, H, W), on the CPU."""
        count = int(self.counts[i])
        positions = torch.arange(count)[None, None]
        return self.gather(torch.tensor([[i]]), positions)[0, 0].cpu()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def describe(self) -> str:
        """``device, 25.4 MB store on cpu: fits in ...``: the residency, the size and why, for summary()."""
        return f"{self.residency}, {self.reason}"
