"""Sinusoid regression, the protocol of Finn et al. 2017 (MAML), Section 5.1.

Each task is y = A sin(x - phase) with A ~ U[0.1, 5], phase ~ U[0, pi]; inputs x ~ U[-5, 5].
The support set has ``shots`` (K) points and the query set ``queries`` fresh points of the same task.
"""

import torch

from metarun.data.episode import Episode
from metarun.data.tasks import TaskSource


class SinusoidTasks(TaskSource):
    problem = "regression"

    def __init__(self, shots: int, queries: int, amplitude: tuple[float, float] = (0.1, 5.0),
                 phase: tuple[float, float] = (0.0, torch.pi), x_range: tuple[float, float] = (-5.0, 5.0)):
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def draw(self, split, num_tasks, generator):
        def uniform(shape, bounds):
            low, high = bounds
            return torch.rand(shape, generator=generator) * (high - low) + low

        amplitude = uniform((num_tasks, 1, 1), self.amplitude)
        phase = uniform((num_tasks, 1, 1), self.phase)
        x = uniform((num_tasks, self.shots + self.queries, 1), self.x_range)
        return amplitude, phase, x

    def materialize(self, split, drawn):
        amplitude, phase, x = (t.to(self.device) for t in drawn)
        y = amplitude * torch.sin(x - phase)
        k = self.shots
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:], ways=1, shots=k, queries=self.queries)

    def summary(self):
        return {"tasks": f"A~U{list(self.amplitude)}, phase~U{[round(p, 3) for p in self.phase]}, x~U{list(self.x_range)}"}
