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

from metarun.data.omniglot_files import OFFICIAL_URL, load_omniglot
from metarun.data.sampler import ClassTaskSampler
from metarun.data.tasks import SPLITS, TaskSource
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


class OmniglotTasks(TaskSource):
    """N-way K-shot Omniglot tasks. ``ways``/``shots``/``queries`` set the validation and test tasks;
    ``train_ways``/``train_shots``/``train_queries`` (None: the same) set the meta-training tasks,
    for the protocols that train on other tasks than they test on (ProtoNets train 60-way,
    Reptile trains on 10 shots). ``train_queries`` may be 0 for algorithms that use no query set.
    The archives are read from ``<root>/omniglot/`` (fetched from ``url`` if missing and ``download``);
    the decoded tensors are cached in ``cache_dir`` (None: next to the archives, or the user cache if
    that is read-only)."""

    problem = "classification"

    def __init__(self, ways: int, shots: int, queries: int, split: str, root: str, cache_dir: str | None = None,
                 url: str = OFFICIAL_URL, download: bool = True, channels: int = 1, image_size: int = 28,
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None):
        # Argument errors name the arguments (metarun.utils.runtime.build says them as data.* keys);
        # what the archives cannot give (more classes or images than they hold) is a DataError.
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        # One class is no classification task (every answer is right): ways start at 2, as in metarun.validation.
        if ways < 2 or min(shots, queries) < 1:
            raise ValueError(f"ways must be at least 2 and shots and queries at least 1 (got {ways}, {shots}, {queries})")
        train = (ways if train_ways is None else train_ways, shots if train_shots is None else train_shots,
                 queries if train_queries is None else train_queries)
        if train[0] < 2 or train[1] < 1 or train[2] < 0:
            raise ValueError(f"train_ways must be at least 2, train_shots at least 1 and train_queries at least 0 "
                             f"(got {train[0]}, {train[1]}, {train[2]})")
        if image_size != 28 or channels != 1:
            raise ValueError("Omniglot is decoded to 1x28x28: channels must be 1 and image_size 28")
        data = load_omniglot(Path(root).expanduser(), cache_dir=cache_dir, url=url, download=download)
        per_class = data.images.shape[1]
        settings = {"train": train, "val": (ways, shots, queries), "test": (ways, shots, queries)}
        for name, (n, k, q) in settings.items():
            if k + q > per_class:
                prefix = "data.train_" if name == "train" and (n, k, q) != (ways, shots, queries) else "data."
                raise DataError(
                    f"{prefix}shots + {prefix}queries = {k + q} exceeds the {per_class} images per Omniglot class: "
                    f"lower {prefix}shots or {prefix}queries"
                )
        self.split_name = split
        split_def = omniglot_splits(split, data.alphabets, data.background)
        sizes = {name: len(c) for name, c in split_def.classes.items()}
        for name, (n, _, _) in settings.items():
            if n > sizes[name]:
                # Each key's limit is the smallest of the splits it sets: data.train_ways only the train
                # split, data.ways the val and test splits, and the train split too unless train_ways is set.
                own = name == "train" and train_ways is not None
                key = "data.train_ways" if own else "data.ways"
                governs = ("train",) if own else ("val", "test") if train_ways is not None else SPLITS
                limit = min(governs, key=sizes.get)
                also = (f" ({key} also sets the {limit} tasks, and the {limit} split has {sizes[limit]} classes)"
                        if sizes[limit] < sizes[name] else "")
                raise DataError(f"{key}={n} exceeds the {sizes[name]} classes of the '{split}' {name} split: "
                                f"use at most {sizes[limit]} ways{also}")
        self.images = data.images
        self.samplers = {
            name: ClassTaskSampler(split_def.classes[name], per_class, *settings[name], split_def.rotate_per_task,
                                   split_def.turns[name])
            for name in SPLITS
        }

    def to(self, device):
        super().to(device)
        self.images = self.images.to(self.device)
        return self

    def draw(self, split, num_tasks, generator):
        return self.samplers[split].draw(num_tasks, generator)

    def materialize(self, split, drawn):
        return self.samplers[split].materialize(self.images, drawn)

    def summary(self):
        sizes = "/".join(str(len(s.classes)) for s in self.samplers.values())
        rotate = ", per-task 90-degree rotations" if self.samplers["train"].rotate else ""
        if any(s.turns is not None for s in self.samplers.values()):
            rotate = ", rotations as classes in " + "/".join(n for n, s in self.samplers.items() if s.turns is not None)
        train = self.samplers["train"]
        return {"split": f"{self.split_name}: {sizes} train/val/test classes{rotate}",
                "train tasks": f"{train.ways}-way {train.shots}-shot, {train.queries} queries"}
