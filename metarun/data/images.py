"""N-way K-shot tasks over any image dataset: a dataset is one small ``ImageDataset`` subclass.

``ImageDataset`` says where a dataset's files are, how to decode them (once, into a store folder in
the cache, ``metarun.data.cache``) and which classes form its splits. ``ImageTasks`` does the rest for
every dataset: it opens or builds the store, places it on the run's device or reads it from disk per
batch (``metarun.data.store``), draws tasks (``metarun.data.sampler``), and turns the gathered uint8
images into an ``Episode``: the dataset's own transforms (Omniglot's rotations), division by 255, the
dataset's channel normalisation, and on the training split the augmentations asked for
(``metarun.data.transforms``).

A dataset file is::

    class MiniImageNet(ImageDataset):
        name, title, channels, image_size = "miniimagenet", "miniImageNet", 3, 84
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        split_names = ("ravi",)
        def locate(self, download): ...
        def layout(self): ...
        def decode(self, files, writer): ...
        def split_classes(self, store): ...

    class MiniImageNetTasks(ImageTasks):
        dataset = MiniImageNet
        def __init__(self, ways: int, shots: int, queries: int, root: str, split: str = "ravi", ...):
            super().__init__(ways, shots, queries, root, split, ...)
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
from pathlib import Path
from typing import ClassVar

import torch

from metarun.data.cache import StoreWriter, store_folder, fingerprint
from metarun.data.episode import Episode
from metarun.data.sampler import ClassTaskSampler
from metarun.data.store import RESIDENCIES, ImageStore
from metarun.data.tasks import SPLITS, TaskSource
from metarun.data.transforms import Augment, normalize
from metarun.errors import DataError

log = logging.getLogger("metarun")


def default_store_dir(root: Path, name: str) -> Path:
    """``root/<name>`` (beside the dataset's files) if writable, else ``$XDG_CACHE_HOME/metarun`` or ``~/.cache/metarun``."""
    from metarun.data.omniglot_files import _is_writable_dir

    folder = Path(root) / name
    if _is_writable_dir(folder):
        return folder
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "metarun"


class ImageDataset:
    """What one dataset file defines (the 'one small file' per dataset)."""

    name: ClassVar[str]  # "miniimagenet" (the data=NAME option)
    title: ClassVar[str]  # "miniImageNet"
    channels: ClassVar[int]
    image_size: ClassVar[int]
    mean: ClassVar[tuple[float, ...] | None] = None  # per channel, in [0, 1] units; None: only divide by 255
    std: ClassVar[tuple[float, ...] | None] = None
    split_names: ClassVar[tuple[str, ...]]  # the named splits data.split takes; the first is the default
    checksum: ClassVar[str | None] = None  # "md5" where locate() verifies the files against a published checksum
    downloads: ClassVar[bool] = False  # locate(download=True) fetches the files from an official source

    def __init__(self, root: Path, split: str, **options):
        self.root, self.split, self.options = Path(root), split, options

    def locate(self, download: bool) -> list[Path]:
        """The source files under root (downloaded and verified where an official download exists). Missing
        files: DataError naming exactly which files to put where (self.layout())."""
        raise NotImplementedError

    def layout(self) -> str:
        """The expected files under root, in words, for errors, README, ``metarun data``."""
        raise NotImplementedError

    def disk_bytes(self, files: list[Path]) -> int:
        """The size of the dataset's files on disk (``metarun data list``)."""
        return sum(Path(f).stat().st_size for f in files)

    def cache_key(self) -> dict:
        """Options that change the decoded images ({"crop": True}); sizes included."""
        return {"channels": self.channels, "image_size": self.image_size, **self.options}

    def decode(self, files: list[Path], writer: StoreWriter) -> None:
        """Write every class once (all splits) with ``writer.add_class``."""
        raise NotImplementedError

    def split_classes(self, store: ImageStore) -> dict[str, list[int]]:
        """Class indices of "train", "val", "test" under self.split (disjoint; checked by ImageTasks)."""
        raise NotImplementedError


class ImageTasks(TaskSource):
    """N-way K-shot tasks over an ImageDataset's store. A subclass per dataset sets ``dataset = TheDataset``
    and spells out its own __init__ (its keys and the common ones), passing the common ones on.

    ``ways``/``shots``/``queries`` set the validation and test tasks; ``train_ways``/``train_shots``/
    ``train_queries`` (None: the same) the meta-training tasks. ``residency`` puts the decoded store on
    the run's device (``device``), reads it from disk per batch (``memmap``), or chooses (``auto``: on the
    device when it takes at most ``memory_share`` of the device's memory). ``normalize`` subtracts the
    dataset's channel mean and divides by its std (datasets without them are only divided by 255).
    ``augment`` lists the training-split augmentations (``metarun.data.transforms``); evaluation never
    augments."""

    problem = "classification"
    dataset: ClassVar[type[ImageDataset]]

    def __init__(self, ways: int, shots: int, queries: int, root: str, split: str | None = None,
                 cache_dir: str | None = None, download: bool = True, residency: str = "auto",
                 memory_share: float = 0.5, normalize: bool = True, augment: tuple[str, ...] = (),
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None,
                 **dataset_options):
        # Argument errors name the arguments (metarun.utils.runtime.build says them as data.* keys); what
        # the files cannot give (more classes or images than they hold) is a DataError.
        names = self.dataset.split_names
        split = names[0] if split is None else split
        if split not in names:
            raise ValueError(f"split must be one of {names}, got {split!r}")
        # One class is no classification task (every answer is right): ways start at 2, as in metarun.validation.
        if ways < 2 or min(shots, queries) < 1:
            raise ValueError(f"ways must be at least 2 and shots and queries at least 1 (got {ways}, {shots}, {queries})")
        train = (ways if train_ways is None else train_ways, shots if train_shots is None else train_shots,
                 queries if train_queries is None else train_queries)
        if train[0] < 2 or train[1] < 1 or train[2] < 0:
            raise ValueError(f"train_ways must be at least 2, train_shots at least 1 and train_queries at least 0 "
                             f"(got {train[0]}, {train[1]}, {train[2]})")
        if residency not in RESIDENCIES:
            raise ValueError(f"residency must be one of {', '.join(RESIDENCIES)}, got {residency!r}")
        if not 0 < memory_share <= 1:
            raise ValueError(f"memory_share must be in (0, 1], got {memory_share}")
        if isinstance(augment, str):
            augment = (augment,)
        self.augment = Augment(tuple(augment))
        self.residency, self.memory_share = residency, float(memory_share)
        self.mean, self.std = (self.dataset.mean, self.dataset.std) if normalize else (None, None)
        self._set_source(root, split, cache_dir, dataset_options)
        self.store = self.load_store(download)
        self.settings = {"train": train, "val": (ways, shots, queries), "test": (ways, shots, queries)}
        self.split_class_indices = {name: torch.as_tensor(c, dtype=torch.long)
                                    for name, c in self.split_classes().items()}
        self.check_splits(train_ways is not None)
        self.samplers = {name: self.make_sampler(name, self.split_class_indices[name], *self.settings[name])
                         for name in SPLITS}
        self._placed_on: torch.device | None = None
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending = None  # (drawn indices, future of their host images): the next training batch

    def check_image_shape(self, channels: int, image_size: int) -> None:
        """A dataset is decoded at one size: ``data.channels`` and ``data.image_size`` (which the model's
        input follows) must say that size."""
        d = self.dataset
        if (channels, image_size) != (d.channels, d.image_size):
            raise ValueError(f"{d.title} is decoded to {d.channels}x{d.image_size}x{d.image_size}: channels must be "
                             f"{d.channels} and image_size {d.image_size}")

    def _set_source(self, root: str, split: str, cache_dir: str | None, dataset_options: dict) -> None:
        """Where the files and the store are: all that ``metarun data list`` needs, before anything is read."""
        self.split_name = split
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.data = self.dataset(self.root, split, **dataset_options)

    def decoded(self, files: list[Path]) -> tuple[Path | None, int | None]:
        """The store decoded from ``files`` and its size in memory, or (None, None) if not decoded yet."""
        folder = store_folder(self.store_dir(), self.dataset.name, self.store_key(files))
        try:
            return folder, ImageStore.open(folder).nbytes
        except DataError:
            return None, None

    def store_key(self, files: list[Path]) -> dict:
        """What the decoded store depends on: the files' content, the split and the decoding options."""
        return {"sources": fingerprint(files), "split": self.split_name, **self.data.cache_key()}

    # -- hooks a dataset's tasks class may override ----------------------------------------------
    def store_dir(self) -> Path:
        """The folder holding this dataset's store folders."""
        return self.cache_dir if self.cache_dir is not None else default_store_dir(self.root, self.dataset.name)

    def load_store(self, download: bool) -> ImageStore:
        """The dataset's store: opened from the cache, or decoded into it once (a stale or half-written
        store folder is never used: it is decoded again)."""
        files = self.data.locate(download)
        key = self.store_key(files)
        folder = store_folder(self.store_dir(), self.dataset.name, key)
        if folder.exists():
            try:
                return ImageStore.open(folder)
            except DataError as e:
                log.warning(f"{e}; decoding {self.dataset.title} again")
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file in the way, no permission, a path that cannot exist
            why = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror or e
            raise DataError(f"cannot make the cache folder {folder.parent} ({why}): set data.cache_dir to a writable "
                            f"folder") from None
        log.info(f"decoding {self.dataset.title} once into {folder}")
        size = self.dataset.image_size
        with StoreWriter(folder, self.dataset.channels, size, size, meta={"dataset": self.dataset.name, **key}) as writer:
            self.data.decode(files, writer)
        return ImageStore.open(folder)

    def split_classes(self) -> dict[str, list[int]]:
        """Store class indices of each split (a class may repeat where the dataset's transform tells the
        copies apart, as Omniglot's rotated classes)."""
        return self.data.split_classes(self.store)

    def make_sampler(self, split: str, classes: torch.Tensor, ways: int, shots: int, queries: int) -> ClassTaskSampler:
        return ClassTaskSampler(classes, self.store.counts, ways, shots, queries)

    def draw_extra(self, split: str, slots: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """The dataset's own random choices for tasks whose classes are ``slots`` (T, n) of its split's
        class list, drawn after classes and images (each tensor with T leading). None by default."""
        return ()

    def transform(self, split: str, images: torch.Tensor, extra: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The dataset's own transform of the gathered uint8 (T, n, k, C, H, W) batch. None by default."""
        return images

    def episode_classes(self, split: str, classes: torch.Tensor, extra: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The class ids an Episode reports for store classes ``classes`` (T, n)."""
        return classes

    # -- checks --------------------------------------------------------------------------------
    def check_splits(self, own_train_ways: bool) -> None:
        title, split = self.dataset.title, self.split_name
        parts = {name: set(c.tolist()) for name, c in self.split_class_indices.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            if parts[a] & parts[b]:
                raise DataError(f"the '{split}' split of {title} shares classes between {a} and {b}: "
                                f"its class lists are broken")
        for name, (n, k, q) in self.settings.items():
            counts = self.store.counts[self.split_class_indices[name]]
            if len(counts) == 0:
                continue  # the ways check below names the empty split
            smallest = int(counts.min())
            if k + q > smallest:
                prefix = "data.train_" if name == "train" and (n, k, q) != self.settings["val"] else "data."
                if bool((counts == smallest).all()) and bool((self.store.counts == smallest).all()):
                    where = f"the {smallest} images per {title} class"
                else:
                    i = int(self.split_class_indices[name][counts.argmin()])
                    where = f"the {smallest} images of the smallest {title} {name} class ({self.store.class_names[i]})"
                raise DataError(f"{prefix}shots + {prefix}queries = {k + q} exceeds {where}: "
                                f"lower {prefix}shots or {prefix}queries")
        settings = self.settings
        sizes = {name: len(c) for name, c in self.split_class_indices.items()}
        for name, (n, _, _) in settings.items():
            if n > sizes[name]:
                # Each key's limit is the smallest of the splits it sets: data.train_ways only the train
                # split, data.ways the val and test splits, and the train split too unless train_ways is set.
                key = "data.train_ways" if name == "train" and own_train_ways else "data.ways"
                governs = ("train",) if key == "data.train_ways" else ("val", "test") if own_train_ways else SPLITS
                limit = min(governs, key=sizes.get)
                also = (f" ({key} also sets the {limit} tasks, and the {limit} split has {sizes[limit]} classes)"
                        if sizes[limit] < sizes[name] else "")
                raise DataError(f"{key}={n} exceeds the {sizes[name]} classes of the '{split}' {name} split: "
                                f"use at most {sizes[limit]} ways{also}")

    # -- residency -------------------------------------------------------------------------------
    def to(self, device):
        super().to(device)
        self._place()
        return self

    def _place(self) -> None:
        if self._placed_on == self.device:
            return
        self._drop_pending()
        chosen, _ = self.store.choose(self.device, self.residency, self.memory_share)
        if chosen == "memmap" and self.store.path is None:
            self.store = self._spill(self.store)
        self.store.place(self.device, self.residency, self.memory_share)
        self._placed_on = self.device

    def _spill(self, store: ImageStore) -> ImageStore:
        """A file-backed copy of an in-memory store (Omniglot's), written once into the store folder."""
        images = store.images.cpu().contiguous()
        digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
        key = {"content": digest, "counts": store.counts.tolist()}
        folder = store_folder(self.store_dir(), self.dataset.name, key)
        try:
            return ImageStore.open(folder)
        except DataError:
            pass
        with StoreWriter(folder, *store.shape, meta={"dataset": self.dataset.name, **key}) as writer:
            for i, name in enumerate(store.class_names):
                start, count = int(store.offsets[i]), int(store.counts[i])
                writer.add_class(name, images[start : start + count].numpy(), store.splits_of_class[i])
        return ImageStore.open(folder)

    # -- tasks -----------------------------------------------------------------------------------
    def draw(self, split, num_tasks, generator):
        sampler = self.samplers[split]
        slots, positions = sampler.draw(num_tasks, generator)
        extra = self.draw_extra(split, slots, generator)
        augment = self.augment.draw(positions.shape, generator) if split == "train" and self.augment else ()
        return (sampler.classes[slots], positions, *extra, *augment)

    def materialize(self, split, drawn):
        self._place()
        return self._episode(split, drawn, self.store.gather(drawn[0], drawn[1]))

    def sample(self, split, num_tasks, generator):
        """As TaskSource.sample; from a file-backed store, the next training batch is read in the background
        meanwhile: drawn from a copy of ``generator`` (which itself moves only when that batch is asked for,
        so checkpoints and resumes see the same stream) and used only if it is exactly the batch then drawn."""
        self._place()
        if split != "train" or self.store.residency != "memmap":
            return super().sample(split, num_tasks, generator)
        drawn = self.draw(split, num_tasks, generator)
        images = None
        pending, self._pending = self._pending, None
        if pending is not None:
            ahead, future = pending
            host = future.result()
            if all(torch.equal(a, b) for a, b in zip(ahead, drawn[:2])):
                images = self.store.upload(host)
        if images is None:
            images = self.store.gather(drawn[0], drawn[1])
        copy = torch.Generator().set_state(generator.get_state())
        ahead = self.draw(split, num_tasks, copy)[:2]
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metarun-prefetch")
        self._pending = (ahead, self._reader.submit(self.store.read, *ahead))
        return self._episode(split, drawn, images)

    def _drop_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].cancel()

    def _episode(self, split: str, drawn: tuple[torch.Tensor, ...], images: torch.Tensor) -> Episode:
        n_aug = len(self.augment.names) if split == "train" and self.augment else 0
        classes = drawn[0]
        extra, augment = drawn[2 : len(drawn) - n_aug], drawn[len(drawn) - n_aug :]
        x = self.transform(split, images, extra)
        if n_aug or self.mean is None:
            x = x.float() / 255.0
            if n_aug:
                x = self.augment.apply(x, augment)
            x = normalize(x, self.mean, self.std)
        else:  # (x / 255 - mean) / std as (x - 255 mean) / (255 std), in place: two passes over the batch fewer
            x = normalize(x.float(), [255 * m for m in self.mean], [255 * s for s in self.std], inplace=True)
        sampler = self.samplers[split]
        t, n, s, q = x.shape[0], sampler.ways, sampler.shots, sampler.queries
        labels = torch.arange(n, device=x.device)
        return Episode(
            support_x=x[:, :, :s].reshape(t, n * s, *x.shape[3:]).contiguous(),
            support_y=labels.repeat_interleave(s).expand(t, -1),
            query_x=x[:, :, s:].reshape(t, n * q, *x.shape[3:]).contiguous(),
            query_y=labels.repeat_interleave(q).expand(t, -1),
            ways=n,
            shots=s,
            queries=q,
            classes=self.episode_classes(split, classes, extra).to(x.device),
        )

    def summary(self):
        self._place()
        sizes = "/".join(str(len(s.classes)) for s in self.samplers.values())
        train = self.samplers["train"]
        out = {"split": f"{self.split_name}: {sizes} train/val/test classes",
               "train tasks": f"{train.ways}-way {train.shots}-shot, {train.queries} queries",
               "store": self.store.describe()}
        if self.augment:
            out["augment"] = ", ".join(self.augment.names)
        return out
