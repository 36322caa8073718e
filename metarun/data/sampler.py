"""Which classes and images make each N-way K-shot task: small index tensors drawn on the CPU.

No images are touched here (``metarun.data.store`` reads them): the draws are a few random tensors
from the task generator, so a checkpoint that stores the generator replays them exactly.
"""

import torch


class ClassTaskSampler:
    """Tasks over ``classes`` (store class indices; one may appear more than once, as Omniglot's rotated
    classes do), whose store classes hold ``counts`` images each (the store's counts, indexed by store class).

    Each task picks ``ways`` distinct entries of ``classes`` in random order (so labels 0..ways-1 are a fresh
    permutation per task), then ``shots + queries`` distinct images of each, uniformly among that class's
    images. Classes of equal size draw exactly as metarun always has (``rand(T, n, size).argsort()``),
    so Omniglot's tasks do not change; unequal classes draw ``rand(T, n, largest)`` and rank the positions
    a class does not have last.
    """

    def __init__(self, classes: torch.Tensor, counts: torch.Tensor, ways: int, shots: int, queries: int):
        self.classes = torch.as_tensor(classes, dtype=torch.long)
        self.class_counts = torch.as_tensor(counts, dtype=torch.long)[self.classes]
        self.ways, self.shots, self.queries = ways, shots, queries
        self.largest = int(self.class_counts.max()) if len(self.classes) else 0
        self.equal = bool((self.class_counts == self.largest).all())

    @property
    def class_ids(self) -> torch.Tensor:
        """The id of every class this sampler draws from (its store class index)."""
        return self.classes

    def draw(self, num_tasks: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots (T, n): entries of ``classes``, positions (T, n, k): images within each class)."""
        n, k = self.ways, self.shots + self.queries
        slots = torch.rand(num_tasks, len(self.classes), generator=generator).argsort(dim=1)[:, :n]
        keys = torch.rand(num_tasks, n, self.largest, generator=generator)
        if not self.equal:
            missing = torch.arange(self.largest) >= self.class_counts[slots][..., None]
            keys = keys.masked_fill(missing, 2.0)  # above every draw in [0, 1): never among the first k
        return slots, keys.argsort(dim=2)[..., :k]
