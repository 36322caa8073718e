"""The interface between a dataset and the training loop: draw tasks, then build their tensors.

Sampling is split in two so that fixed evaluation tasks do not depend on the batch size they are
evaluated in: ``draw`` makes all random choices for ``n`` tasks as small CPU tensors (with a
``torch.Generator``, so a checkpoint can store and restore the stream exactly), ``materialize``
turns a slice of those choices into an ``Episode`` on the data's device.
"""

import hashlib
from collections.abc import Iterator

import torch

from metarun.data.episode import Episode

SPLITS = ("train", "val", "test")
# The training stream (the run's seed), and fixed tasks of each split (test.eval_seed).
PURPOSES = ("train", "train-fixed", "val", "test")


def task_generator(purpose: str, seed: int) -> torch.Generator:
    """The task stream for ``purpose`` under ``seed``: its generator is seeded with 63 bits of a
    sha256 of (purpose, seed), so no pair of settings makes two purposes draw the same tasks (the
    training stream of seed=2 was once the sinusoid test tasks of eval_seed=0), and the streams
    depend on nothing but these two values."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    digest = hashlib.sha256(f"metarun-tasks:{purpose}:{int(seed)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


class TaskSource:
    """Base class of the data sources built from ``data`` configs."""

    problem: str  # "classification" or "regression" (metarun.algos.base.PROBLEMS)
    device = torch.device("cpu")

    def draw(self, split: str, num_tasks: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def materialize(self, split: str, drawn: tuple[torch.Tensor, ...]) -> Episode:
        raise NotImplementedError

    def to(self, device: torch.device) -> "TaskSource":
        self.device = torch.device(device)
        return self

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> Episode:
        return self.materialize(split, self.draw(split, num_tasks, generator))

    def fixed_episodes(self, split: str, count: int, batch_size: int, seed: int) -> Iterator[Episode]:
        """The same ``count`` tasks of ``split`` for every run with this ``seed``, in batches."""
        # Fixed training tasks (none of metarun's loops asks for them) must not replay the training stream.
        generator = task_generator("train-fixed" if split == "train" else split, seed)
        drawn = self.draw(split, count, generator)
        for start in range(0, count, batch_size):
            yield self.materialize(split, tuple(t[start : start + batch_size] for t in drawn))

    def summary(self) -> dict[str, object]:
        """A few facts worth printing at the start of a run."""
        return {}
