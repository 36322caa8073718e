"""``torchrun --nproc_per_node N -m metarun train ...``: one run over N processes (data-parallel over tasks).

Every process draws the whole meta-batch from the same seeded task stream (the draws are a few small
index tensors) and builds only its share of the tasks, so the union of the shares is the meta-batch
a single process would train on. Each process's meta-gradient is its share's mean; weighted by its
share of the tasks and summed over processes (``all_reduce``) it is the single-process mean over all
tasks, so every process takes the same optimiser step. Meta-validation and meta-test split the fixed
tasks the same way and gather the per-task results, so the mean and CI cover every task.

What one process decides, all take: the execution path of each phase (rank 0 tunes it, see
``AgreedExecution``) and a stop request (SIGINT/SIGTERM on any process stops all of them at the same
iteration boundary, ``World.check_stop``). Rank 0 alone owns and writes the run directory (logs,
TensorBoard, checkpoints, metrics.json); the others run Hydra in a scratch directory of their own
(``scratch_argv``) and read the run directory only (a resume: every process loads the same last.pt).

Outside torchrun (``WORLD_SIZE`` unset or 1) ``World()`` has size 1 and every method is the
single-process behaviour: no process group, nothing changes. The process group is gloo for a run on
the CPU and NCCL on CUDA, each process on ``cuda:LOCAL_RANK``.
"""

import logging
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from rich.progress import Progress

from metarun.data.tasks import TaskSource, task_generator
from metarun.errors import MetarunError
from metarun.execution import Execution, shape_key
from metarun.utils import stop

log = logging.getLogger("metarun")

REPEAT_S = 5.0  # signals this close to the first are one request (torchrun forwards a Ctrl-C as SIGTERM too)


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started several (``WORLD_SIZE`` > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    return int(os.environ.get("RANK", "0"))


def scratch_argv(argv: list[str]) -> tuple[list[str], str | None]:
    """Under torchrun, a rank other than 0 gets Hydra's run directory in a scratch folder of its own
    (Hydra creates its run directory before metarun runs; only rank 0 may create or claim the real
    one, whose path it sends to the others). Returns the command line and the scratch folder."""
    rank = torchrun_rank()
    if rank is None:
        return argv, None
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        raise MetarunError("torchrun runs one training job over several processes: leave out -m (sweep with "
                           "hydra/launcher=... instead, each job one process)")
    if rank == 0:
        return argv, None
    scratch = tempfile.mkdtemp(prefix=f"metarun-rank{rank}-")
    return [a for a in argv if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={scratch}"], scratch


@dataclass
class World:
    """The processes of one run: ``rank`` of ``size`` (size 1: a single process, no process group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live
    pending: float | None = None  # when this process got a stop signal (not yet agreed on)

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- shares of tasks --------------------------------------------------------------------------
    def share(self, count: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's contiguous share of ``count`` tasks; earlier ranks take the remainder."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def sample(self, data: TaskSource, split: str, count: int, generator: torch.Generator):
        """This rank's share of the next ``count`` tasks of the stream (every rank moves ``generator`` alike)."""
        if not self.active:
            return data.sample(split, count, generator)
        drawn = data.draw(split, count, generator)
        start, end = self.share(count)
        return data.materialize(split, tuple(t[start:end] for t in drawn))

    def fixed_episodes(self, data: TaskSource, split: str, count: int, batch_size: int, seed: int):
        """This rank's share of ``data.fixed_episodes(split, count, batch_size, seed)``'s tasks, in batches."""
        if not self.active:
            yield from data.fixed_episodes(split, count, batch_size, seed)
            return
        generator = task_generator("train-fixed" if split == "train" else split, seed)  # as TaskSource.fixed_episodes
        drawn = data.draw(split, count, generator)
        start, end = self.share(count)
        for first in range(start, end, batch_size):
            yield data.materialize(split, tuple(t[first : min(first + batch_size, end)] for t in drawn))

    # -- collectives ------------------------------------------------------------------------------
    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` (CPU), concatenated in rank order: the single-process order of the tasks."""
        if not self.active:
            return rows
        parts = [None] * self.size
        dist.all_gather_object(parts, rows.cpu())
        return torch.cat(parts)

    def reduce_meta_gradient(self, algo, loss: torch.Tensor, metrics: dict, tasks: int, total: int):
        """Sum ``tasks / total`` times each rank's ``.grad`` (its share's mean) over the ranks: the mean over
        all ``total`` tasks, on every rank. The loss and metrics likewise. A parameter without a gradient on
        every rank keeps none (as in one process)."""
        if not self.active:
            return loss, metrics
        params = [p for p in algo.parameters() if p.requires_grad]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        weight = tasks / total
        for p, any_grad in zip(params, has.tolist()):
            if any_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        names = sorted(metrics)
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0] if grads else loss)]
                         + [metrics[k].reshape(1).to(grads[0] if grads else loss) for k in names]) * weight
        dist.all_reduce(flat)  # on the device the process group reduces on (the run's)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        values = flat[offset:]
        return values[0].to(loss), {k: values[1 + i].to(metrics[k]) for i, k in enumerate(names)}

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Average floating-point buffers (MAML++'s per-step batch-norm statistics) so every rank's network stays equal."""
        if not self.active:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(self.size)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # -- stop requests ----------------------------------------------------------------------------
    def check_stop(self) -> None:
        """``stop.check()``, agreed: every rank raises ``StopRequested`` here when any rank got a signal."""
        if not self.active:
            stop.check()
            return
        flag = torch.tensor([self.pending is not None], dtype=torch.uint8, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise stop.StopRequested

    @contextmanager
    def signals(self):
        """Under torchrun: SIGINT/SIGTERM only mark a stop request, which ``check_stop`` agrees on (a rank
        must not stop on its own mid meta-batch: the others would wait for it in the all-reduce)."""
        if not self.active or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum, frame):
            now = time.monotonic()
            if self.pending is None:
                self.pending = now
                if self.leader:
                    log.warning(f"{signal.Signals(signum).name}: stopping every process at the next iteration "
                                f"and saving a checkpoint")
            elif now - self.pending > REPEAT_S:
                raise KeyboardInterrupt  # a second request, not torchrun's copy of the first: abort at once

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def start(device_name: str) -> World:
    """The run's world from torchrun's environment; joins the process group (gloo on the CPU, NCCL on CUDA)."""
    rank = torchrun_rank()
    if rank is None:
        return World()
    size, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if cuda:
        if ":" in device_name:
            raise MetarunError(f"device.name={device_name}: under torchrun each process takes cuda:LOCAL_RANK; "
                               f"use device=cuda or device=auto")
        if local >= torch.cuda.device_count():
            raise MetarunError(f"torchrun started {local + 1}+ processes on this node but it has "
                               f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node {torch.cuda.device_count()}")
        torch.cuda.set_device(local)  # device=cuda (and auto) is cuda:LOCAL_RANK from here on
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size, local, torch.device("cuda", local) if cuda else torch.device("cpu"))


def check(world: World, meta_batch_size: int) -> None:
    if world.active and meta_batch_size < world.size:
        raise MetarunError(f"train.meta_batch_size={meta_batch_size} gives some of torchrun's {world.size} processes "
                           f"no task: use train.meta_batch_size={world.size} or more, or fewer processes")


def quiet_progress() -> Progress:
    """The progress bar of a rank other than 0: counts, shows nothing."""
    return Progress(disable=True)


class AgreedExecution(Execution):
    """An ``Execution`` whose paths rank 0 decides: at ``agree`` (every rank calls it at the same point of
    the run) rank 0 decides the phase's path for its share's shape (tuned, cached or from the checkpoint)
    and every rank takes it for every shape of that phase it has not decided before."""

    def __init__(self, world: World, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.world, self.agreed = world, {}

    def agree(self, algo, phase: str, episode, iteration: int = 0, steps: int | None = None) -> str:
        if self.setting != "auto":
            return self.path(algo, phase, episode, iteration, steps) if episode is not None else self.setting
        chosen = super().path(algo, phase, episode, iteration, steps) if self.world.leader else None
        self.agreed[phase] = self.world.broadcast(chosen)
        return self.agreed[phase]

    def path(self, algo, phase: str, episode, iteration: int = 0, steps: int | None = None) -> str:
        if self.setting == "auto" and phase in self.agreed:
            key = shape_key(algo, phase, episode, iteration, steps)
            if key not in self.decisions:
                self.decisions[key] = {"path": self.agreed[phase], "why": "rank 0's decision"}
            return self.runnable(self.decisions[key]["path"], algo, phase, episode)
        return super().path(algo, phase, episode, iteration, steps)


def execution(world: World, *args, **kwargs) -> Execution:
    return AgreedExecution(world, *args, **kwargs) if world.active else Execution(*args, **kwargs)
