"""How a batch of tasks runs: one after another (``loop``) or vectorised (``vmap``), in chunks of tasks.

Both paths give the same numbers (the float64 meta-gradient tests of every algorithm), but which
is faster depends on the device and the shape of the work: vmap gains most where each task is
small (one query per class), the loop where each task is large (fifteen). So ``algo.batching=auto``
decides per *phase* (``train``: a meta-gradient; ``eval``: adaptation and query metrics) and per
*shape* (tasks, ways, shots, queries, inner steps, derivative order, network, dtype, device), the
first time that shape is met, as ``cudnn.benchmark`` caches a kernel per input shape:

- the two paths are timed with interleaved repeats (loop, vmap, vmap, loop, ...) after a warm-up,
  until the best time of one beats the other's by ``MARGIN``, for at most ``MAX_REPEATS`` rounds and
  ``BUDGET_S`` seconds; without such a win the deterministic default (``DEFAULT``, the loop) runs,
  so a loaded machine cannot make two runs of one command take different paths on a coin toss;
- every decision is logged in one line with what the tuning cost, saved in the checkpoint (a
  resumed run keeps its paths) and cached on disk per machine and torch version
  (``cache_path()``), so the jobs of a sweep tune once.

``algo.batching=loop|vmap`` pins the path; a pinned run equals an auto run that chose that path.

Memory: a meta-batch runs in chunks of at most ``task_chunk`` tasks (``train.task_chunk``), each
chunk's meta-loss scaled by its share of the tasks and backpropagated on its own, so the
accumulated gradient is the unchunked one (a float64 test proves it for every algorithm) while the
graph of only one chunk is alive. ``task_chunk=null`` runs whole meta-batches on the CPU and, on
CUDA, chooses the chunk from the free memory and the measured peak of one task's meta-gradient.
"""

import json
import logging
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import vmap

from metarun.utils import stop

log = logging.getLogger("metarun")

PATHS = ("loop", "vmap")
DEFAULT = "loop"  # the deterministic choice when neither path wins clearly
MARGIN = 0.10  # the winner's best time must be at least this much below the loser's
MAX_REPEATS = 5  # timed rounds at most (after one warm-up round)
MIN_REPEATS = 2  # timed rounds at least before a winner is declared
BUDGET_S = 5.0  # no new round starts once tuning one shape has taken this long
MEMORY_SHARE = 0.8  # auto chunks on CUDA fill at most this share of the free memory
CACHE_ENV = "METARUN_EXECUTION_CACHE"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings measure it."""
    if device.type == "cuda":
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


def meta_gradient(algo, episode, iteration: int, chunk: int | None = None, params: list | None = None):
    """The meta-gradient of ``episode``, in chunks of at most ``chunk`` tasks: each chunk's meta-loss
    times its share of the tasks is backpropagated into ``.grad`` (``params`` None) or returned as
    gradients of ``params`` (for timing, leaving ``.grad`` alone). The metrics are averaged with the
    same weights. Returns (loss, metrics, grads): the loss and metrics detached, grads None for ``.grad``."""
    bounds = chunk_bounds(episode.num_tasks, chunk)
    loss_sum, metrics_sum, grads = 0.0, {}, None
    for start, end in bounds:
        part = episode if len(bounds) == 1 else episode.tasks(start, end)
        loss, metrics = algo.meta_loss(part, iteration)
        weight = (end - start) / episode.num_tasks
        scaled = loss if len(bounds) == 1 else loss * weight
        if params is None:
            scaled.backward()
        else:
            part_grads = torch.autograd.grad(scaled, params, allow_unused=True)
            grads = part_grads if grads is None else tuple(
                g if a is None else a if g is None else a + g for a, g in zip(grads, part_grads))
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


# -- the disk cache -------------------------------------------------------------------------------
def cache_path() -> Path:
    """``$METARUN_EXECUTION_CACHE``, else ``$XDG_CACHE_HOME/metarun/execution.json`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metarun" / "execution.json"


def machine(device: torch.device) -> str:
    """What a timing holds for: the host, its CPU model or GPU name, and the torch version."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    chip = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"{socket.gethostname()}|{chip}|torch {torch.__version__}"


def read_cache(path: Path, warn: bool = True) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError("not a JSON object of machines")
        return data
    except (OSError, ValueError) as e:
        if warn:
            log.warning(f"ignoring the execution cache {path} ({' '.join(str(e).split())[:100]}); it will be rewritten")
        return {}


def write_cache(path: Path, machine_id: str, decisions: dict) -> None:
    """Merge ``decisions`` into the cache under ``machine_id``, atomically (a reader never sees half a file)."""
    try:
        data = read_cache(path, warn=False)  # a damaged file was reported when it was read for the decision
        data.setdefault(machine_id, {}).update(decisions)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home only costs the next run its tuning
        log.warning(f"could not write the execution cache {path}: {e}")


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
    return (f"{phase}|{type(algo).__name__}|{type(algo.model).__name__}:{size}|{str(reference.dtype)[6:]}|"
            f"{reference.device.type}|tasks={episode.num_tasks}|ways={episode.ways}|shots={episode.shots}|"
            f"queries={episode.queries}|steps={steps}|order={order}|transductive={algo.transductive}")


def race(run: Callable[[str], None], device: torch.device, margin: float = MARGIN, max_repeats: int = MAX_REPEATS,
         budget_s: float = BUDGET_S, clock: Callable[[], float] = time.perf_counter) -> tuple[str, dict, str]:
    """Time ``run(path)`` for both paths, interleaved, after a warm-up of each. Returns the path, the best
    seconds of each, and why: a path that wins by ``margin``, else ``DEFAULT``. A path out of GPU memory loses."""
    best = {path: float("inf") for path in PATHS}
    failed = set()
    started = clock()
    for round_ in range(max_repeats + 1):
        order = PATHS if round_ % 2 == 0 else PATHS[::-1]  # neither path always runs second (warmer caches)
        for path in order:
            if path in failed:
                continue
            try:
                synchronize(device)
                tic = clock()
                run(path)
                synchronize(device)
                if round_:
                    best[path] = min(best[path], clock() - tic)
            except torch.cuda.OutOfMemoryError:
                failed.add(path)
                torch.cuda.empty_cache()
        if failed:
            break
        fast, slow = sorted(PATHS, key=best.get)
        # A slow shape spends the budget in one timed round: a clear win then counts, as it would later.
        out_of_time = round_ >= 1 and clock() - started > budget_s
        if (round_ >= MIN_REPEATS or out_of_time) and best[fast] < (1 - margin) * best[slow]:
            return fast, best, f"{fast} faster by {100 * (1 - best[fast] / best[slow]):.0f}%"
        if out_of_time:
            break
    if failed and len(failed) < len(PATHS):
        winner = (set(PATHS) - failed).pop()
        return winner, best, f"{', '.join(sorted(failed))} out of memory"
    return DEFAULT, best, f"no path faster by {100 * margin:.0f}%: the default"


class Execution:
    """The decisions of one run (or of ``metarun eval``): ``decisions[shape_key] = {"path", "why", "seconds"}``.

    ``setting`` is ``algo.batching`` (``auto``, ``loop``, ``vmap``); ``task_chunk`` is
    ``train.task_chunk``; ``cache`` the JSON file shared by the runs of this machine (None: none)."""

    def __init__(self, setting: str = "auto", task_chunk: int | None = None, cache: Path | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.setting, self.task_chunk, self.cache, self.clock = setting, task_chunk, cache, clock
        self.decisions: dict[str, dict] = {}
        self.chunks: dict[str, int | None] = {}  # auto chunk sizes on CUDA, per shape
        self.resumed_train_path: str | None = None  # a checkpoint's path for the first training shape
        self.current: str | None = None  # the path of the last training meta-gradient

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
            return self.setting
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
        return self.decisions[key]["path"]

    def tune(self, algo, phase: str, episode, iteration: int = 0, steps: int | None = None) -> dict:
        """Race the two paths on ``episode``. Parameters, their ``.grad`` and the random streams are
        left as they were, so tuning changes no number of the run."""
        device = episode.support_x.device
        params = [p for p in algo.parameters() if p.requires_grad]
        chunk = self.chunk(algo, episode, iteration) if phase == "train" else None
        started, saved = self.clock(), algo.tuned_batching

        def run(path: str) -> None:
            algo.tuned_batching = path
            if phase == "train":
                meta_gradient(algo, episode, iteration, chunk, params=params)
            else:
                with torch.no_grad():
                    algo.evaluate(episode, steps)

        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                path, seconds, why = race(run, device, clock=self.clock)
        finally:
            algo.tuned_batching = saved
        cost = self.clock() - started
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
        loss, metrics, _ = meta_gradient(algo, episode, iteration, self.chunk(algo, episode, iteration))
        return loss, metrics

    def evaluate(self, algo, episode, steps: int) -> torch.Tensor:
        with on_path(algo, self.path(algo, "eval", episode, steps=steps)):
            return algo.evaluate(episode, steps)


class on_path:
    """Run ``algo`` on ``path`` inside the block (``algo.tuned_batching`` is the path ``auto`` runs on)."""

    def __init__(self, algo, path: str):
        self.algo, self.path = algo, path

    def __enter__(self):
        self.saved, self.algo.tuned_batching = self.algo.tuned_batching, self.path

    def __exit__(self, *exc):
        self.algo.tuned_batching = self.saved


def describe(key: str) -> str:
    """The shape part of a key, for the log: tasks=32 ways=5 shots=1 queries=15 steps=1 order=second."""
    return " ".join(part for part in key.split("|")[5:] if not part.endswith("=-"))
