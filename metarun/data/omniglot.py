"""Omniglot few-shot tasks (Lake et al. 2015) under the published splits.

Splits are fixed lists of characters, made with their own constant seed so that they never depend
on the run's seed. The four random splits share one shuffle of the 1623 characters, so they all
test on the same 423 characters:

- ``maml`` (Finn et al. 2017, reference code): 1100 train / 100 validation / 423 test; every task
  rotates each of its classes by a random multiple of 90 degrees, at meta-train and meta-test.
- ``mamlpp`` (Antoniou et al. 2019): 1150 / 50 / 423, rotated per task as in ``maml``.
- ``snell`` (Vinyals et al. 2016, Snell et al. 2017): 1028 / 172 / 423 characters, each rotated
  by 0, 90, 180 and 270 degrees into four classes in every split (4112 / 688 / 1692 classes).
  The papers use Vinyals' fixed character lists, which are not published with the dataset; ours
  are a random draw of the same sizes.
- ``nichol`` (Nichol et al. 2018, Reptile): 1200 training characters, rotations as extra classes
  in training only (4400 classes), 423 unrotated test characters. Reptile has no validation set;
  we hold out 100 of its 1200 characters (unrotated) to choose the checkpoint.
- ``lake`` (Lake et al. 2015): the 30 background alphabets for training, of which 5 alphabets,
  chosen once, are held out for validation; the 20 evaluation alphabets for testing. No rotation.
"""

from pathlib import Path
from typing import NamedTuple

import torch

from metarun.data.images import ImageDataset, ImageTasks
from metarun.data.omniglot_files import (ARCHIVES, ARCHIVE_NAMES, IMAGE_SIZE, IMAGES_PER_CHARACTER, OFFICIAL_URL,
                                         cache_file_name, default_cache_dir, find_or_download_archives, load_omniglot)
from metarun.data.sampler import ClassTaskSampler
from metarun.data.store import ImageStore
from metarun.data.tasks import SPLITS
from metarun.errors import DataError

SPLIT_SEED = 1  # the character shuffle of the named splits; never the run's seed
SPLIT_NAMES = ("maml", "mamlpp", "snell", "nichol", "lake")
# (train, validation) sizes of the random splits; the rest of the shuffle is the test set.
_RANDOM_SIZES = {"maml": (1100, 100), "mamlpp": (1150, 50), "snell": (1028, 172), "nichol": (1100, 100)}
# Splits whose classes are every (character, quarter turn) pair.
_ROTATIONS_AS_CLASSES = {"snell": ("train", "val", "test"), "nichol": ("train",)}


class Split(NamedTuple):
    classes: dict[str, torch.Tensor]  # character indices of each split, repeated for rotated classes
    turns: dict[str, torch.Tensor | None]  # fixed quarter turns of each class, or None
    rotate_per_task: bool


def omniglot_splits(name: str, alphabets: list[str], background: torch.Tensor) -> Split:
    """Characters (and fixed rotations) of each split, and whether tasks are rotated at random."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    if name in _RANDOM_SIZES:
        order = torch.randperm(len(alphabets), generator=generator)
        n_train, n_val = _RANDOM_SIZES[name]
        chars = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
        classes, turns = {}, {}
        for split, c in chars.items():
            if split in _ROTATIONS_AS_CLASSES.get(name, ()):
                classes[split], turns[split] = c.repeat_interleave(4), torch.arange(4).repeat(len(c))
            else:
                classes[split], turns[split] = c, None
        return Split(classes, turns, rotate_per_task=name in ("maml", "mamlpp"))
    if name == "lake":
        names = sorted({a for a, bg in zip(alphabets, background.tolist()) if bg})
        held_out = {names[i] for i in torch.randperm(len(names), generator=generator)[:5].tolist()}
        index = torch.arange(len(alphabets))
        is_val = torch.tensor([a in held_out for a in alphabets])
        classes = {"train": index[background & ~is_val], "val": index[is_val], "test": index[~background]}
        return Split(classes, dict.fromkeys(SPLITS), rotate_per_task=False)
    raise DataError(f"unknown Omniglot split '{name}': set data.split to one of {', '.join(SPLIT_NAMES)}")


class Omniglot(ImageDataset):
    """Omniglot's archives under ``<root>/omniglot/``; decoded and cached by ``metarun.data.omniglot_files``."""

    name, title, channels, image_size = "omniglot", "Omniglot", 1, IMAGE_SIZE
    mean = std = None  # ink on a blank page: only divided by 255, as every Omniglot paper does
    split_names = SPLIT_NAMES
    downloads = True  # from the official repository, verified by md5 and git blob id

    def __init__(self, root: Path, split: str, url: str = OFFICIAL_URL):
        super().__init__(root, split)
        self.url = url

    def locate(self, download: bool) -> list[Path]:
        paths = find_or_download_archives(self.root, url=self.url, download=download)
        return [paths[name] for name in ARCHIVE_NAMES]

    def layout(self) -> str:
        return (f"{self.root}/omniglot/images_background.zip and {self.root}/omniglot/images_evaluation.zip "
                f"(downloaded from {OFFICIAL_URL} when missing)")

    def cache_key(self) -> dict:
        return {"channels": 1, "image_size": IMAGE_SIZE}


class OmniglotSampler(ClassTaskSampler):
    """The generic sampler with Omniglot's rotation scheme: ``rotate`` turns every class of every task by its
    own random multiple of 90 degrees (MAML's protocol: rotations augment tasks); ``turns`` gives each class
    a fixed rotation (rotations as extra classes, the Vinyals/Snell/Nichol protocol: the same character
    appears as up to four classes, told apart by ``turns``)."""

    def __init__(self, classes, counts, ways, shots, queries, rotate: bool, turns: torch.Tensor | None = None):
        super().__init__(classes, counts, ways, shots, queries)
        self.rotate, self.turns = rotate, turns

    @property
    def class_ids(self) -> torch.Tensor:
        return encode_classes(self.classes, self.turns)


def encode_classes(characters: torch.Tensor, turns: torch.Tensor | None) -> torch.Tensor:
    """One id per class: the character index, or 4 * character + turns where rotations are classes."""
    return characters if turns is None else 4 * characters + turns


class OmniglotTasks(ImageTasks):
    """N-way K-shot Omniglot tasks. ``ways``/``shots``/``queries`` set the validation and test tasks;
    ``train_ways``/``train_shots``/``train_queries`` (None: the same) set the meta-training tasks,
    for the protocols that train on other tasks than they test on (ProtoNets train 60-way,
    Reptile trains on 10 shots). ``train_queries`` may be 0 for algorithms that use no query set.
    The archives are read from ``<root>/omniglot/`` (fetched from ``url`` if missing and ``download``);
    the decoded tensors are cached in ``cache_dir`` (None: next to the archives, or the user cache if
    that is read-only). ``residency``, ``memory_share``, ``normalize`` and ``augment`` as for every image
    dataset (``metarun.data.images.ImageTasks``); Omniglot has no channel statistics to normalise with."""

    dataset = Omniglot

    def __init__(self, ways: int, shots: int, queries: int, split: str, root: str, cache_dir: str | None = None,
                 url: str = OFFICIAL_URL, download: bool = True, channels: int = 1, image_size: int = 28,
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None,
                 residency: str = "auto", memory_share: float = 0.5, normalize: bool = True,
                 augment: tuple[str, ...] = ()):
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        self.check_image_shape(channels, image_size)
        self.url = url
        super().__init__(ways, shots, queries, root, split, cache_dir, download, residency, memory_share, normalize,
                         augment, train_ways, train_shots, train_queries, url=url)

    def store_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else default_cache_dir(self.root)

    def load_store(self, download: bool) -> ImageStore:
        # Omniglot keeps its own verified decode cache (omniglot_files); the store wraps its tensor.
        data = load_omniglot(self.root, cache_dir=self.cache_dir, url=self.url, download=download)
        self.alphabets, self.background = data.alphabets, data.background
        characters, per_class = data.images.shape[:2]
        return ImageStore.from_tensor(data.images.reshape(characters * per_class, 1, *data.images.shape[2:]),
                                      [per_class] * characters, data.characters)

    def decoded(self, files):
        # Omniglot's own cache file, keyed by the archives' content (validated when they were decoded).
        path = self.store_dir() / cache_file_name(dict(zip(ARCHIVE_NAMES, files)))
        characters = sum(ARCHIVES[name].characters for name in ARCHIVE_NAMES)
        nbytes = characters * IMAGES_PER_CHARACTER * IMAGE_SIZE * IMAGE_SIZE
        return (path, nbytes) if path.is_file() else (None, None)

    def split_classes(self):
        self.split_def = omniglot_splits(self.split_name, self.alphabets, self.background)
        return self.split_def.classes

    def make_sampler(self, split, classes, ways, shots, queries):
        return OmniglotSampler(classes, self.store.counts, ways, shots, queries, self.split_def.rotate_per_task,
                               self.split_def.turns[split])

    # Rotations are drawn after classes and images, in the order metarun always drew them (same tasks).
    def draw_extra(self, split, slots, generator):
        sampler = self.samplers[split]
        if sampler.rotate:
            turns = torch.randint(0, 4, slots.shape, generator=generator)
        elif sampler.turns is not None:
            turns = sampler.turns[slots]
        else:
            turns = torch.zeros(slots.shape, dtype=torch.long)
        return (turns,)

    def transform(self, split, images, extra):
        sampler = self.samplers[split]
        if not (sampler.rotate or sampler.turns is not None):
            return images
        turns = extra[0].to(images.device)
        rotated = torch.stack([images.rot90(k, dims=(-2, -1)) for k in range(4)])
        tasks = torch.arange(images.shape[0], device=images.device)[:, None]
        return rotated[turns, tasks, torch.arange(sampler.ways, device=images.device)]

    def episode_classes(self, split, classes, extra):
        return encode_classes(classes, None if self.samplers[split].turns is None else extra[0])

    def summary(self):
        out = super().summary()
        rotate = ", per-task 90-degree rotations" if self.samplers["train"].rotate else ""
        if any(s.turns is not None for s in self.samplers.values()):
            rotate = ", rotations as classes in " + "/".join(n for n, s in self.samplers.items() if s.turns is not None)
        out["split"] += rotate
        return out
