"""Meta-validation and meta-test over fixed tasks: mean and 95% CI, after every inner step."""

import itertools

import torch

from metarun.algos.base import MetaAlgorithm
from metarun.data.tasks import TaskSource
from metarun.utils import stop
from metarun.utils.stats import mean_ci95


def meta_test(algo: MetaAlgorithm, data: TaskSource, split: str, episodes: int, batch_size: int, steps: int,
              seed: int, progress=None, world=None) -> dict:
    """Evaluate ``algo`` on ``episodes`` fixed tasks of ``split``.

    The tasks depend only on ``seed`` (not on the run's seed or the batch size), so every run and
    checkpoint evaluated with the same settings is judged on the same tasks. The headline metric
    is the one after ``steps`` inner steps; ``per_step`` holds the means after 0..steps steps.

    Under torchrun (``world``, ``metarun.distributed``) each process evaluates its share of the tasks
    on the path rank 0 decided, and the per-task results of all are gathered: every process returns
    the numbers of all ``episodes`` tasks.
    """
    batches = data.fixed_episodes(split, episodes, batch_size, seed)
    if world is not None and world.active:
        batches = world.fixed_episodes(data, split, episodes, batch_size, seed)
        first = next(batches, None)
        batches = itertools.chain([first], batches) if first is not None else iter(())
        if algo.execution is not None:
            algo.execution.agree(algo, "eval", first, steps=steps)  # every rank takes rank 0's path
    bar = progress.add_task(f"{split}", total=episodes, stats="") if progress is not None else None
    per_task = []
    for episode in batches:
        stop.check()  # a SIGINT/SIGTERM stops between task batches, not after the whole phase
        run = algo.execution.evaluate(algo, episode, steps) if algo.execution else algo.evaluate(episode, steps)
        per_task.append(run.cpu())  # (the run's execution decides the path per evaluation shape)
        if bar is not None:
            progress.advance(bar, episode.num_tasks)
    if bar is not None:
        progress.remove_task(bar)
    per_task = torch.cat(per_task) if per_task else torch.empty(0, steps + 1)
    if world is not None:
        per_task = world.gather_rows(per_task)  # every rank's tasks, in the single-process order
    # (episodes, steps + 1)
    per_step = [mean_ci95(per_task[:, i]) for i in range(per_task.shape[1])]
    mean, ci95 = per_step[-1]
    return {
        algo.metric: mean,
        "ci95": ci95,
        "episodes": episodes,
        "inner_steps": steps,
        "per_step": [m for m, _ in per_step],
        "per_step_ci95": [c for _, c in per_step],
    }
