"""A batch of few-shot tasks, the unit every algorithm consumes."""

from dataclasses import dataclass, replace

import torch


@dataclass
class Episode:
    """Support and query sets of ``T`` tasks, stacked along a leading task dimension.

    Classification: ``support_x`` is (T, ways*shots, C, H, W) and ``support_y`` (T, ways*shots)
    holds labels 0..ways-1; the query set likewise with ``queries`` images per class.
    Regression: ``support_x``/``support_y`` are (T, shots, 1) and the query set (T, queries, 1).
    ``classes`` (T, ways) names the dataset classes behind each task's labels (None for regression).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int
    shots: int
    queries: int
    classes: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device=None, dtype=None) -> "Episode":
        """Move to a device; ``dtype`` converts the inputs and float targets, never the labels."""

        def move(t, is_target=False):
            if t is None:
                return None
            cast = dtype if (dtype is not None and t.is_floating_point()) else None
            return t.to(device=device, dtype=cast)

        return replace(
            self,
            support_x=move(self.support_x),
            support_y=move(self.support_y, True),
            query_x=move(self.query_x),
            query_y=move(self.query_y, True),
        )

    def tasks(self, start: int, stop: int) -> "Episode":
        """The tasks ``start:stop`` as an episode of their own."""
        return replace(
            self,
            support_x=self.support_x[start:stop],
            support_y=self.support_y[start:stop],
            query_x=self.query_x[start:stop],
            query_y=self.query_y[start:stop],
            classes=None if self.classes is None else self.classes[start:stop],
        )
