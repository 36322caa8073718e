"""Each job's share of the machine when a launcher runs several jobs of a sweep at once.

``metarun train -m hydra/launcher=joblib hydra.launcher.n_jobs=N ...`` runs N jobs side by side in
separate processes. Left alone, each would start one intra-op thread per core (N jobs on C cores:
N*C busy threads fighting for C cores) and every job would pick the first GPU. So each job takes
``cores // N`` threads (at least one) and, where several GPUs are visible, the GPU of its job
number modulo their count. One job at a time (the basic launcher, a single run, a Slurm job with
its own allocation) keeps torch's defaults. The decision is a pure function (``decide``) of what
Hydra tells the job; ``apply_share`` reads Hydra's config, applies it and logs it in one line.

With one thread per job the ``threads`` execution path (``metarun.task_threads``) is no candidate:
it needs two intra-op threads, and the shape key of a tuned decision records the thread count.
"""

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("metarun")

# Launchers that run several jobs at once on this machine, in separate processes (by class name).
LOCAL_PARALLEL = ("JoblibLauncher",)


@dataclass(frozen=True)
class Share:
    threads: int | None  # intra-op threads for this job (None: torch's default)
    gpu: int | None  # the CUDA device index this job uses as "cuda" (None: the default)
    why: str

    def describe(self) -> str:
        threads = "torch's default threads" if self.threads is None else f"{self.threads} CPU thread(s)"
        gpu = "" if self.gpu is None else f", GPU cuda:{self.gpu}"
        return f"{threads}{gpu} ({self.why})"


def parallel_jobs(n_jobs, cpus: int) -> int:
    """How many jobs joblib runs at once for ``n_jobs``: -1 is one per CPU, -2 all but one, and so on."""
    try:
        n = int(n_jobs)
    except (TypeError, ValueError):
        return 1
    if n < 0:
        n = cpus + 1 + n
    return max(1, n)


def decide(launcher: str | None, n_jobs, job_num: int | None, cpus: int, gpus: int) -> Share:
    """This job's threads and GPU, from the launcher's class (or ``_target_``), its ``n_jobs``, the job's
    number in the sweep, the usable CPU cores and the visible GPUs."""
    name = (launcher or "").rsplit(".", 1)[-1]
    if name not in LOCAL_PARALLEL:
        return Share(None, None, f"{name or 'no launcher'} runs one job at a time here")
    parallel = parallel_jobs(n_jobs, cpus)
    if parallel <= 1:
        return Share(None, None, "hydra.launcher.n_jobs=1: one job at a time")
    threads = max(1, cpus // parallel)
    why = f"{parallel} jobs at once on {cpus} cores"
    gpu = None
    if gpus > 1 and job_num is not None:
        gpu = int(job_num) % gpus
        why += f", job {job_num} of the sweep on GPU {gpu} of {gpus}"
    return Share(threads, gpu, why)


def usable_cpus() -> int:
    """The cores this process may run on (taskset, cgroup cpusets), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def apply_share(cfg=None) -> Share | None:
    """Decide this job's share from Hydra's config and apply it (threads, current CUDA device); log it.
    Does nothing outside a Hydra multirun. A job whose ``device.name`` in ``cfg`` is not ``auto`` or
    ``cuda`` (cpu, or a GPU the user chose: cuda:N) keeps the device it asked for."""
    import torch
    from omegaconf import OmegaConf
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    launcher = hydra.launcher.get("_target_") if hydra.get("launcher") is not None else None
    n_jobs = hydra.launcher.get("n_jobs") if hydra.get("launcher") is not None else None
    device = str(OmegaConf.select(cfg, "device.name", default="auto")) if cfg is not None else "auto"
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") and torch.cuda.is_available() else 0
    share = decide(launcher, n_jobs, hydra.job.get("num"), usable_cpus(), gpus)
    if share.threads is None and share.gpu is None:
        return share
    if share.threads is not None:
        torch.set_num_threads(share.threads)
    if share.gpu is not None:
        torch.cuda.set_device(share.gpu)  # device=auto / device=cuda mean this GPU; cuda:N stays as asked
    log.info(f"this job's share of the machine: {share.describe()}")
    return share
