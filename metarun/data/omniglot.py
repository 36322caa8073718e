"""Omniglot few-shot tasks (Lake et al. 2015) under the published splits.

Splits are fixed lists of characters, made with their own constant seed so that they never depend
on the run's seed:

- ``maml`` (Finn et al. 2017, reference code): the 1623 characters shuffled, 1100 train / 100
  validation / 423 test; every task rotates each of its classes by a random multiple of 90
  degrees, at meta-train and meta-test alike.
- ``lake`` (Lake et al. 2015): the 30 background alphabets for training, of which 5 alphabets,
  chosen once, are held out for validation; the 20 evaluation alphabets for testing. No rotation.
"""

from pathlib import Path

import torch

from metarun.data.omniglot_files import OFFICIAL_URL, load_omniglot
from metarun.data.sampler import ClassTaskSampler
from metarun.data.tasks import SPLITS, TaskSource
from metarun.errors import DataError

SPLIT_SEED = 1  # the character shuffle of the named splits; never the run's seed
SPLIT_NAMES = ("maml", "lake")


def omniglot_splits(name: str, alphabets: list[str], background: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
    """Character indices of each split, and whether tasks are rotated."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    if name == "maml":
        order = torch.randperm(len(alphabets), generator=generator)
        return {"train": order[:1100], "val": order[1100:1200], "test": order[1200:]}, True
    if name == "lake":
        names = sorted({a for a, bg in zip(alphabets, background.tolist()) if bg})
        held_out = {names[i] for i in torch.randperm(len(names), generator=generator)[:5].tolist()}
        index = torch.arange(len(alphabets))
        is_val = torch.tensor([a in held_out for a in alphabets])
        return {"train": index[background & ~is_val], "val": index[is_val], "test": index[~background]}, False
    raise DataError(f"unknown Omniglot split '{name}': set data.split to one of {', '.join(SPLIT_NAMES)}")


class OmniglotTasks(TaskSource):
    task = "classification"

    def __init__(self, ways, shots, queries, split, root, cache_dir=None, url=OFFICIAL_URL, download=True, channels=1, image_size=28):
        if split not in SPLIT_NAMES:
            raise DataError(f"unknown Omniglot split '{split}': set data.split to one of {', '.join(SPLIT_NAMES)}")
        if min(ways, shots, queries) < 1:
            raise DataError(f"data.ways, data.shots and data.queries must be at least 1 (got {ways}, {shots}, {queries})")
        if image_size != 28 or channels != 1:
            raise DataError("Omniglot is decoded to 1x28x28: leave data.channels=1 and data.image_size=28")
        data = load_omniglot(Path(root).expanduser(), cache_dir=cache_dir, url=url, download=download)
        per_class = data.images.shape[1]
        if shots + queries > per_class:
            raise DataError(
                f"data.shots + data.queries = {shots + queries} exceeds the {per_class} images per Omniglot class: "
                f"lower data.shots or data.queries"
            )
        self.split_name = split
        classes, rotate = omniglot_splits(split, data.alphabets, data.background)
        for name in SPLITS:
            if ways > len(classes[name]):
                raise DataError(
                    f"data.ways={ways} exceeds the {len(classes[name])} classes of the '{split}' {name} split: "
                    f"use at most {min(len(c) for c in classes.values())} ways"
                )
        self.images = data.images
        self.samplers = {name: ClassTaskSampler(classes[name], per_class, ways, shots, queries, rotate) for name in SPLITS}

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
        return {"split": f"{self.split_name}: {sizes} train/val/test characters{rotate}"}
