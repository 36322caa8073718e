"""The ``threads`` execution path: a batch's tasks split over worker threads with one intra-op thread each.

On a CPU, PyTorch's intra-op parallelism splits every kernel of one task over the cores; for the
small kernels of few-shot learning most of that is synchronisation (benchmarks/bench_paths.py:
MAML with 15 queries is only 1.2x faster on 2 intra-op threads than on 1). Running whole tasks
side by side instead, one core each, keeps every core busy with its own kernels.

Each worker takes a contiguous block of the batch's tasks and runs them on the ``loop`` path with a
copy of the algorithm object whose parameters and buffers *are* the original's tensors (``torch.func
.functional_call`` swaps a module's attributes while it runs, so two threads must not share module
objects); workers return gradients (never write ``.grad``) and the caller sums them in worker
order, so a run's numbers do not depend on which thread finishes first. Autograd and grad mode are
per thread in PyTorch; the intra-op thread count is process-wide, so it is set to one while the
workers run and restored after.

Algorithms that draw random numbers inside their meta-loss (Reptile's mini-batch orders) would
draw them in a thread-dependent order: ``parallel_tasks_in_training = False`` keeps them off this
path at meta-training.
"""

import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from metarun.data.episode import Episode


def workers_for(device: torch.device, tasks: int) -> int:
    """How many workers the path would use: one per intra-op thread of the process, at most one per task
    (fewer than 2: the path is not available). CPU only: a GPU runs one stream of kernels."""
    if device.type != "cpu":
        return 0
    return min(torch.get_num_threads(), tasks)


def available(algo, phase: str, episode: Episode) -> bool:
    if phase == "train" and not getattr(algo, "parallel_tasks_in_training", True):
        return False
    return workers_for(episode.support_x.device, episode.num_tasks) >= 2


def blocks(tasks: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` blocks of near-equal size, one per worker."""
    return [(tasks * w // workers, tasks * (w + 1) // workers) for w in range(workers)]


class TaskThreads:
    """A pool of worker threads and, per algorithm object, the workers' copies of it."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._copies: dict[int, tuple[tuple, list]] = {}
        self._lock = threading.Lock()

    def copies(self, algo, workers: int) -> list:
        """``workers`` shallow-state copies of ``algo`` on the ``loop`` path, sharing its parameters and buffers
        (rebuilt when a tensor was replaced, e.g. by ``.to()`` or ``.double()``)."""
        tensors = [*algo.parameters(), *algo.buffers()]
        ident = tuple(id(t) for t in tensors)
        known = self._copies.get(id(algo))
        if known is None or known[0] != ident or len(known[1]) < workers:
            memo = {id(t): t for t in tensors}
            memo[id(algo.execution)] = None  # the copies are driven by this run's execution, not their own
            made = [copy.deepcopy(algo, memo=dict(memo)) for _ in range(workers)]
            for c in made:
                c.batching, c.tuned_batching = "loop", None
            known = self._copies[id(algo)] = (ident, made)
        return known[1][:workers]

    def map(self, algo, episode: Episode, work: Callable) -> list:
        """``work(copy, tasks_block)`` for each worker's block of ``episode``'s tasks, concurrently; results in block order."""
        workers = workers_for(episode.support_x.device, episode.num_tasks)
        with self._lock:  # one batch at a time through the pool (a second caller waits)
            if self._pool is None or self._pool._max_workers < workers:
                if self._pool is not None:
                    self._pool.shutdown()
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="metarun-task")
            saved = torch.get_num_threads()
            copies = self.copies(algo, workers)

            def job(worker: int, start: int, stop: int):
                torch.set_num_threads(1)
                return work(copies[worker], episode.tasks(start, stop))

            try:
                futures = [self._pool.submit(job, w, a, b) for w, (a, b) in enumerate(blocks(episode.num_tasks, workers))]
                for error in [f.exception() for f in futures]:  # every worker has finished before anything is raised
                    if error is not None:
                        raise error
                return [f.result() for f in futures]
            finally:
                torch.set_num_threads(saved)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._copies.clear()
