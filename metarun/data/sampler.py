"""N-way K-shot episodes drawn from a uint8 image tensor with tensor indexing on its device.

No PIL and no Python loop per image: one gather builds a whole batch of tasks.
"""

import torch

from metarun.data.episode import Episode


def encode_classes(characters: torch.Tensor, turns: torch.Tensor | None) -> torch.Tensor:
    """One id per class: the character index, or 4 * character + turns where rotations are classes."""
    return characters if turns is None else 4 * characters + turns


class ClassTaskSampler:
    """Tasks over the classes ``classes`` of ``images`` (num_classes, per_class, H, W) uint8.

    Each task picks ``ways`` distinct classes in random order (so labels 0..ways-1 are a fresh
    permutation per task), then ``shots + queries`` distinct images of each. Two rotation schemes:
    ``rotate`` turns every class of every task by its own random multiple of 90 degrees (MAML's
    Omniglot protocol: rotations augment tasks); ``turns`` gives each class a fixed rotation
    (rotations as extra classes, the Vinyals/Snell/Nichol protocol: the same character appears
    as up to four classes, told apart by ``turns``).
    """

    def __init__(self, classes: torch.Tensor, per_class: int, ways: int, shots: int, queries: int, rotate: bool,
                 turns: torch.Tensor | None = None):
        self.classes, self.per_class = classes, per_class
        self.ways, self.shots, self.queries, self.rotate = ways, shots, queries, rotate
        self.turns = turns

    @property
    def class_ids(self) -> torch.Tensor:
        """The id of every class this sampler draws from (``encode_classes``)."""
        return encode_classes(self.classes, self.turns)

    def draw(self, num_tasks: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        n, k = self.ways, self.shots + self.queries
        positions = torch.rand(num_tasks, len(self.classes), generator=generator).argsort(dim=1)[:, :n]
        images = torch.rand(num_tasks, n, self.per_class, generator=generator).argsort(dim=2)[..., :k]
        if self.rotate:
            turns = torch.randint(0, 4, (num_tasks, n), generator=generator)
        elif self.turns is not None:
            turns = self.turns[positions]
        else:
            turns = torch.zeros(num_tasks, n, dtype=torch.long)
        return self.classes[positions], images, turns

    def materialize(self, data: torch.Tensor, drawn: tuple[torch.Tensor, ...]) -> Episode:
        classes, images, turns = (t.to(data.device) for t in drawn)
        x = data[classes[..., None], images]  # (T, N, S+Q, H, W) uint8
        if self.rotate or self.turns is not None:
            rotated = torch.stack([x.rot90(k, dims=(-2, -1)) for k in range(4)])
            tasks = torch.arange(x.shape[0], device=x.device)[:, None]
            x = rotated[turns, tasks, torch.arange(self.ways, device=x.device)]
        x = (x.float() / 255.0).unsqueeze(3)  # channel dimension
        t, n, s = x.shape[0], self.ways, self.shots
        labels = torch.arange(n, device=x.device)
        return Episode(
            support_x=x[:, :, :s].reshape(t, n * s, *x.shape[3:]).contiguous(),
            support_y=labels.repeat_interleave(s).expand(t, -1),
            query_x=x[:, :, s:].reshape(t, n * self.queries, *x.shape[3:]).contiguous(),
            query_y=labels.repeat_interleave(self.queries).expand(t, -1),
            ways=n,
            shots=s,
            queries=self.queries,
            classes=encode_classes(classes, None if self.turns is None else turns),
        )
