"""How a batch of tasks runs: one after another (``loop``), vectorised (``vmap``) or side by side on the
CPU's cores (``threads``), in chunks of tasks.

Every path gives the same numbers (the float64 meta-gradient tests of every algorithm), but which
is fastest depends on the device and the shape of the work: vmap gains most where each task is
small (one query per class) or on a GPU, the loop or the threads where each task is large
(fifteen). So ``algo.batching=auto`` decides per *phase* (``train``: a meta-gradient; ``eval``:
adaptation and query metrics) and per *shape* (tasks, ways, shots, queries, inner steps,
derivative order, network, dtype, device, CPU threads), the first time that shape is met, as
``cudnn.benchmark`` caches a kernel per input shape:

- the candidate paths are timed with interleaved repeats (loop, vmap, threads, then the reverse
  order, ...) after a warm-up, until the fastest beats every other by ``MARGIN``, for at most
  ``MAX_REPEATS`` rounds and ``BUDGET_S`` seconds; paths within the margin of the fastest tie, and a
  tie goes to the first of ``PREFERENCE`` (the loop first), so a loaded machine cannot make two runs
  of one command take different paths on a coin toss;
- every decision is logged in one line with what the tuning cost, saved in the checkpoint (a
  resumed run keeps its paths) and cached on disk per machine and torch version
  (``cache_path()``), so the jobs of a sweep tune once.

``algo.batching=loop|vmap|threads|graphs`` pins the path; a pinned run equals an auto run that
chose it. ``threads`` (``metarun.task_threads``) needs a CPU with two or more intra-op threads,
``graphs`` (``metarun.cuda_graphs``) CUDA and an iteration-independent meta-loss; elsewhere the loop runs.

Memory: a meta-batch runs in chunks of at most ``task_chunk`` tasks (``train.task_chunk``), each
chunk's meta-loss scaled by its share and backpropagated on its own: the gradient is the unchunked
one (tested in float64 for every algorithm) with one chunk's graph alive. ``task_chunk=null`` runs
whole meta-batches on the CPU and, on CUDA, a chunk that fits the free memory (one task's peak measured).
"""

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import vmap

from metarun import cuda_graphs, task_threads
from metarun.execution_cache import CACHE_ENV, cache_path, machine, read_cache, write_cache  # noqa: F401
from metarun.utils import stop

log = logging.getLogger("metarun")

PATHS = ("loop", "vmap", "threads", "graphs")
PREFERENCE = ("loop", "threads", "vmap", "graphs")  # who wins a tie (times within MARGIN of the fastest)
DEFAULT = PREFERENCE[0]
MARGIN = 0.10  # the winner's best time must be at least this much below the loser's
MAX_REPEATS = 5  # timed rounds at most (after one warm-up round)
MIN_REPEATS = 2  # timed rounds at least before a winner is declared
DROP = 1.5  # a third path this many times slower than the fastest after a timed round is timed no more
BUDGET_S = 5.0  # no new round starts once tuning one shape has taken this long
MEMORY_SHARE = 0.8  # auto chunks on CUDA fill at most this share of the free memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # wait for the device's queued work, so wall-clock timings measure it
        torch.cuda.synchronize(device)


def stack_tasks(per_task: list):
    """Per-task results (tensors, or tuples and dicts of them) stacked along a new task dimension, as vmap would."""
    first = per_task[0]
    if isinstance(first, dict):
        return {k: torch.stack([r[k] for r in per_task]) for k in first}
    if isinstance(first, tuple):
        return tuple(stack_tasks(list(parts)) for parts in zip(*per_task))
    return torch.stack(per_task)


def over_tasks(fn: Callable, batch: tuple[torch.Tensor, ...], path: str):
    """``fn(*task, functional=...)`` for every task of ``batch`` (tensors with a leading task
    dimension): all at once under ``torch.func.vmap`` (``functional=True``: ``fn`` must use
    torch.func inside) or one after another (``functional=False``). Outputs stacked over tasks."""
    if path == "vmap":
        return vmap(lambda *task: fn(*task, functional=True))(*batch)
    # the loop (``threads`` splits the batch into blocks before it reaches here, each block a loop)
    return stack_tasks([stop.checked(fn(*task, functional=False)) for task in zip(*batch)])


# -- chunks of tasks ------------------------------------------------------------------------------
def chunk_bounds(tasks: int, chunk: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` of each chunk of at most ``chunk`` tasks (one chunk when ``chunk`` is None)."""
    size = tasks if chunk is None else max(1, min(chunk, tasks))
    return [(start, min(start + size, tasks)) for start in range(0, tasks, size)]


def chunk_for_memory(per_task_bytes: int, free_bytes: int, tasks: int, share: float = MEMORY_SHARE) -> int | None:
    """The largest chunk whose meta-gradient fits in ``share`` of ``free_bytes`` (None: the whole meta-batch fits)."""
    if per_task_bytes <= 0 or per_task_bytes * tasks <= share * free_bytes:
        return None
    return max(1, int(share * free_bytes // per_task_bytes))


def meta_gradient(algo, episode, iteration: int, chunk: int | None = None, params: list | None = None,
                  threads: "task_threads.TaskThreads | None" = None):
    """The meta-gradient of ``episode``, in chunks of at most ``chunk`` tasks: each chunk's meta-loss
    times its share of the tasks is backpropagated into ``.grad`` (``params`` None) or returned as
    gradients of ``params`` (for timing, leaving ``.grad`` alone). The metrics are averaged with the
    same weights. With ``threads``, blocks of tasks run on the worker threads (each in its chunks),
    their gradients summed in block order. Returns (loss, metrics, grads): detached, grads None for ``.grad``."""
    if threads is None:
        return _chunked(algo, episode, iteration, chunk, params, episode.num_tasks)
    wanted = params if params is not None else [p for p in algo.parameters() if p.requires_grad]
    parts = threads.map(algo, episode, lambda worker, block: _chunked(worker, block, iteration, chunk, wanted,
                                                                      episode.num_tasks))
    loss, metrics, grads = parts[0]
    for part_loss, part_metrics, part_grads in parts[1:]:
        loss = loss + part_loss
        metrics = {k: v + part_metrics[k] for k, v in metrics.items()}
        grads = _add(grads, part_grads)
    if params is not None:
        return loss, metrics, grads
    for p, g in zip(wanted, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return loss, metrics, None


def _add(grads, more):
    return more if grads is None else tuple(g if a is None else a if g is None else a + g for a, g in zip(grads, more))


def _chunked(algo, episode, iteration: int, chunk: int | None, params: list | None, total: int):
    """``meta_gradient`` of ``episode`` as ``episode.num_tasks`` of ``total`` tasks (its share of their mean)."""
    bounds = chunk_bounds(episode.num_tasks, chunk)
    loss_sum, metrics_sum, grads = 0.0, {}, None
    for start, end in bounds:
        part = episode if len(bounds) == 1 else episode.tasks(start, end)
        loss, metrics = algo.meta_loss(part, iteration)
        weight = (end - start) / total
        scaled = loss if weight == 1 else loss * weight
        if params is None:
            scaled.backward()
        else:
            grads = _add(grads, torch.autograd.grad(scaled, params, allow_unused=True))
        loss_sum = loss_sum + loss.detach() * weight
        for k, v in metrics.items():
            metrics_sum[k] = metrics_sum.get(k, 0.0) + v.detach() * weight
        del loss, scaled  # the chunk's graph is freed before the next chunk builds its own
    return loss_sum, metrics_sum, grads


def measure_chunk(algo, episode, iteration: int, memory=torch.cuda) -> int | None:
    """The chunk that fits: the peak memory of one task's meta-gradient against the free memory
    (``memory``: ``torch.cuda``'s allocator statistics; a test passes a stand-in on the CPU)."""
    device = episode.support_x.device
    params = [p for p in algo.parameters() if p.requires_grad]
    memory.synchronize(device)
    memory.reset_peak_memory_stats(device)
    before = memory.memory_allocated(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        meta_gradient(algo, episode.tasks(0, 1), iteration, params=params)
    memory.synchronize(device)
    per_task = memory.max_memory_allocated(device) - before
    free, _ = memory.mem_get_info(device)
    return chunk_for_memory(per_task, free, episode.num_tasks)


# -- decisions ------------------------------------------------------------------------------------
def shape_key(algo, phase: str, episode, iteration: int = 0, steps: int | None = None) -> str:
    """What a timing depends on: the phase, the algorithm and network, dtype, device and the batch's shape."""
    reference = next(algo.parameters())
    if phase == "train":
        steps = getattr(algo, "inner_steps", getattr(algo, "inner_iterations", 0))
        first_order = algo.first_order_at(iteration) if hasattr(algo, "first_order_at") else None
        order = {True: "first", False: "second", None: "-"}[first_order]
    else:
        order = "-"
    size = sum(p.numel() for p in algo.model.parameters())
    device = reference.device.type + (f":{torch.get_num_threads()}threads" if reference.device.type == "cpu" else "")
    return (f"{phase}|{type(algo).__name__}|{type(algo.model).__name__}:{size}|{str(reference.dtype)[6:]}|"
            f"{device}|tasks={episode.num_tasks}|ways={episode.ways}|shots={episode.shots}|"
            f"queries={episode.queries}|steps={steps}|order={order}|transductive={algo.transductive}")


def race(run: Callable[[str], None], device: torch.device, paths: tuple[str, ...] = ("loop", "vmap"),
         margin: float = MARGIN, max_repeats: int = MAX_REPEATS, budget_s: float = BUDGET_S,
         clock: Callable[[], float] = time.perf_counter) -> tuple[str, dict, str]:
    """Time ``run(path)`` for ``paths``, interleaved, after a warm-up of each. Returns the path, the best
    seconds of each, and why: the fastest when it beats every other by ``margin``, else the first of
    ``PREFERENCE`` among those within the margin of the fastest. A path ``DROP`` times slower than the
    fastest is timed no more; a path out of GPU memory, or whose CUDA graph cannot be captured, loses. Where the warm-up round alone spends
    ``budget_s``, its times decide, so a slow shape costs one call of each path."""
    best, warm = {path: float("inf") for path in paths}, {}
    timed, failed = list(paths), {}  # failed: path -> why it cannot run this shape
    started = clock()
    for round_ in range(max_repeats + 1):
        for path in timed if round_ % 2 == 0 else timed[::-1]:  # no path always runs last (warmer caches)
            try:
                synchronize(device)
                tic = clock()
                run(path)
                synchronize(device)
                seconds = clock() - tic
                if round_:
                    best[path] = min(best[path], seconds)
                else:
                    warm[path] = seconds
            except torch.cuda.OutOfMemoryError:
                failed[path] = "out of memory"
                torch.cuda.empty_cache()
            except cuda_graphs.Unavailable as e:
                failed[path] = str(e)
        timed = [path for path in timed if path not in failed]
        if not round_ and clock() - started > budget_s:  # a shape so slow that the warm-up spent the budget
            best.update(warm)  # decides on the warm-up's times (first-call costs are small beside them)
            break
        if len(timed) < 2:
            break
        fast = min(timed, key=best.get)
        others = [best[p] for p in paths if p != fast and p not in failed]
        # A slow shape spends the budget in one timed round: a clear win then counts, as it would later.
        out_of_time = round_ >= 1 and clock() - started > budget_s
        if (round_ >= MIN_REPEATS or out_of_time) and best[fast] < (1 - margin) * min(others):
            return fast, best, f"{fast} faster by {100 * (1 - best[fast] / min(others)):.0f}%"
        if out_of_time:
            break
        if round_:  # the two fastest race on; a third far behind them is timed no more
            runner_up = sorted(timed, key=best.get)[1]
            timed = [path for path in timed if path in (fast, runner_up) or best[path] <= DROP * best[fast]]
    alive = [p for p in paths if p not in failed]
    if not alive:  # every path failed: the default, which will say why itself
        return DEFAULT, best, "; ".join(f"{p}: {why}" for p, why in sorted(failed.items()))
    if len(alive) == 1:
        return alive[0], best, "; ".join(f"{p}: {why}" for p, why in sorted(failed.items()))
    fastest = min(alive, key=best.get)
    if best[fastest] < (1 - margin) * min(best[p] for p in alive if p != fastest):  # after an out-of-memory
        runner_up = min(best[p] for p in alive if p != fastest)
        return fastest, best, f"{fastest} faster by {100 * (1 - best[fastest] / runner_up):.0f}%"
    tied = [p for p in alive if (1 - margin) * best[p] <= best[fastest]]
    winner = next(p for p in PREFERENCE if p in tied)
    if len(tied) == len(alive) == len(paths):
        return winner, best, f"no path faster by {100 * margin:.0f}%: the default"
    if winner == DEFAULT:
        return winner, best, f"{' and '.join(tied)} within {100 * margin:.0f}%: the default"
    return winner, best, f"{' and '.join(tied)} within {100 * margin:.0f}%: {winner}, preferred ({'/'.join(PREFERENCE)})"


class Execution:
    """The decisions of one run (or of ``metarun eval``): ``decisions[shape_key] = {"path", "why", "seconds"}``.

    ``setting`` is ``algo.batching`` (``auto``, ``loop``, ``vmap``, ``threads``); ``task_chunk`` is
    ``train.task_chunk``; ``cache`` the JSON file shared by the runs of this machine (None: none);
    ``paths`` the candidates ``auto`` races where they are available (all of ``PATHS`` by default)."""

    def __init__(self, setting: str = "auto", task_chunk: int | None = None, cache: Path | None = None,
                 clock: Callable[[], float] = time.perf_counter, paths: tuple[str, ...] = PATHS):
        self.setting, self.task_chunk, self.cache, self.clock, self.paths = setting, task_chunk, cache, clock, paths
        self.threads = task_threads.TaskThreads()
        self.graphed: dict[str, cuda_graphs.Graphed] = {}  # captured training shapes (the graphs path)
        self.capture = cuda_graphs.capture  # how a graph is captured (tests: cuda_graphs.eager_capture)
        self.warned: set[tuple[str, str]] = set()  # (path, phase) told that the path runs as the loop
        self.decisions: dict[str, dict] = {}
        self.chunks: dict[str, int | None] = {}  # auto chunk sizes on CUDA, per shape
        self.resumed_train_path: str | None = None  # a checkpoint's path for the first training shape
        self.current: str | None = None  # the path of the last training meta-gradient
        self.tuning_seconds = 0.0  # what tuning cost this process (decisions from a cache or checkpoint cost none)

    def state_dict(self) -> dict:
        return {"decisions": self.decisions}

    def load_state_dict(self, state: dict | None, train_path: str | None = None) -> None:
        """Restore a checkpoint's decisions (untrusted: only well-formed entries), and its training path."""
        for key, decision in ((state or {}).get("decisions") or {}).items():
            if isinstance(key, str) and isinstance(decision, dict) and decision.get("path") in PATHS:
                self.decisions[key] = {"path": decision["path"], "why": "from the checkpoint"}
        self.resumed_train_path = train_path if train_path in PATHS else None

    def path(self, algo, phase: str, episode, iteration: int = 0, steps: int | None = None) -> str:
        """The path of this batch: pinned, decided before (this run, its checkpoint, the disk cache) or tuned now."""
        if self.setting != "auto":
            return self.runnable(self.setting, algo, phase, episode)
        key = shape_key(algo, phase, episode, iteration, steps)
        if phase == "train" and self.resumed_train_path is not None:
            self.decisions[key] = {"path": self.resumed_train_path, "why": "from the checkpoint"}
            self.resumed_train_path = None
        if key not in self.decisions:
            device = episode.support_x.device
            cached = read_cache(self.cache).get(machine(device), {}).get(key) if self.cache else None
            if isinstance(cached, dict) and cached.get("path") in PATHS:
                self.decisions[key] = {**cached, "why": f"cached in {self.cache}"}
                log.info(f"execution ({phase}, {describe(key)}): {cached['path']} (cached in {self.cache})")
            else:
                self.decisions[key] = self.tune(algo, phase, episode, iteration, steps)
                if self.cache:
                    write_cache(self.cache, machine(device), {key: self.decisions[key]})
        return self.runnable(self.decisions[key]["path"], algo, phase, episode)

    def available(self, path: str, algo, phase: str, episode) -> bool:
        if path == "threads":
            return task_threads.available(algo, phase, episode)
        if path == "graphs":
            return phase == "train" and cuda_graphs.available(algo, episode, self.task_chunk)
        return True

    def candidates(self, algo, phase: str, episode) -> tuple[str, ...]:
        return tuple(p for p in self.paths if self.available(p, algo, phase, episode))

    def runnable(self, path: str, algo, phase: str, episode) -> str:
        """``path``, or the loop where it cannot run: ``threads`` on a GPU, with one CPU thread or one task, or for
        Reptile's training; ``graphs`` off CUDA, at evaluation, with task chunks or for MAML++ and Reptile."""
        if self.available(path, algo, phase, episode):
            return path
        if (path, phase) not in self.warned:
            self.warned.add((path, phase))
            needs = {"threads": "a CPU with 2 or more intra-op threads, 2 or more tasks and, in training, an algorithm "
                                "without random draws in its meta-loss",
                     "graphs": "CUDA, the training phase, no train.task_chunk and an algorithm whose meta-loss is the "
                               "same at every iteration"}[path]
            log.warning(f"execution ({phase}): the {path} path needs {needs}; the loop runs instead")
        return "loop"

    def tune(self, algo, phase: str, episode, iteration: int = 0, steps: int | None = None) -> dict:
        """Race the two paths on ``episode``. Parameters, their ``.grad`` and the random streams are
        left as they were, so tuning changes no number of the run."""
        device = episode.support_x.device
        params = [p for p in algo.parameters() if p.requires_grad]
        chunk = self.chunk(algo, episode, iteration) if phase == "train" else None
        started, saved = self.clock(), algo.tuned_batching

        def run(path: str) -> None:
            algo.tuned_batching = path
            if phase == "train" and path == "graphs":
                self.graphed_gradient(algo, episode, iteration, params)
            elif phase == "train":
                meta_gradient(algo, episode, iteration, chunk, params=params, threads=self.pool(path))
            else:
                with torch.no_grad():
                    self.run_evaluation(algo, episode, steps, path)

        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                path, seconds, why = race(run, device, self.candidates(algo, phase, episode), clock=self.clock)
        finally:
            algo.tuned_batching = saved
        cost = self.clock() - started
        self.tuning_seconds += cost
        timed = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in seconds.items())
        log.info(f"execution ({phase}, {describe(shape_key(algo, phase, episode, iteration, steps))}): {path} "
                 f"({why}; {timed}; tuning took {cost:.1f} s)")
        return {"path": path, "why": why, "seconds": {k: round(v, 6) for k, v in seconds.items()},
                "tuning_seconds": round(cost, 3)}

    def chunk(self, algo, episode, iteration: int) -> int | None:
        """``task_chunk`` when set; else on CUDA what fits in the free memory (measured once per shape)."""
        if self.task_chunk is not None or episode.support_x.device.type != "cuda":
            return self.task_chunk
        key = shape_key(algo, "train", episode, iteration)
        if key not in self.chunks:
            self.chunks[key] = measure_chunk(algo, episode, iteration)
            if self.chunks[key] is not None:
                log.info(f"execution: meta-batches of {episode.num_tasks} tasks run in chunks of {self.chunks[key]} "
                         f"(one task's meta-gradient would not fit {episode.num_tasks} times in the free GPU memory)")
        return self.chunks[key]

    # -- what the trainer and meta-test call ------------------------------------------------------
    def meta_gradient(self, algo, episode, iteration: int = 0):
        """Accumulate ``episode``'s meta-gradient into ``.grad`` on the decided path; (loss, metrics) detached."""
        self.current = algo.tuned_batching = self.path(algo, "train", episode, iteration)
        if self.current == "graphs":
            loss, metrics, _ = self.graphed_gradient(algo, episode, iteration)
            return loss, metrics
        loss, metrics, _ = meta_gradient(algo, episode, iteration, self.chunk(algo, episode, iteration),
                                         threads=self.pool(self.current))
        return loss, metrics

    def graphed_gradient(self, algo, episode, iteration: int, params: list | None = None):
        """``meta_gradient`` on the graphs path: this shape's CUDA graph (captured at its first call) replayed."""
        key = shape_key(algo, "train", episode, iteration)
        return cuda_graphs.meta_gradient(self.graphed, key, self.capture, algo, episode, iteration, params)

    def evaluate(self, algo, episode, steps: int) -> torch.Tensor:
        return self.run_evaluation(algo, episode, steps, self.path(algo, "eval", episode, steps=steps))

    def run_evaluation(self, algo, episode, steps: int, path: str) -> torch.Tensor:
        if path == "threads":
            return torch.cat(self.threads.map(algo, episode, lambda worker, block: worker.evaluate(block, steps)))
        with on_path(algo, path):
            return algo.evaluate(episode, steps)

    def pool(self, path: str) -> "task_threads.TaskThreads | None":
        return self.threads if path == "threads" else None


@contextlib.contextmanager
def on_path(algo, path: str):
    """Run ``algo`` on ``path`` inside the block (``algo.tuned_batching`` is the path ``auto`` runs on)."""
    saved, algo.tuned_batching = algo.tuned_batching, path
    try:
        yield
    finally:
        algo.tuned_batching = saved


def describe(key: str) -> str:
    """The shape part of a key, for the log: tasks=32 ways=5 shots=1 queries=15 steps=1 order=second."""
    return " ".join(part for part in key.split("|")[5:] if not part.endswith("=-"))
