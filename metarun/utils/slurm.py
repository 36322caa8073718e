"""What submitit raises when Slurm refuses or loses a sweep's jobs (hydra/launcher=slurm), as one line.

The launcher (hydra-submitit-launcher) runs in the command's own process: ``sbatch`` refusing the
jobs raises ``FailedJobError``, and a job that ended without writing its result (cancelled, killed,
out of memory, out of time with no requeue left) raises ``UncompletedJobError`` when the sweep
collects it. Both are what Slurm said, not bugs of metarun.
"""

import re
from pathlib import Path

from metarun.errors import MetarunError

KEYS = "hydra.launcher.partition, cpus_per_task, mem_gb, gpus_per_node or timeout_min (conf/hydra/launcher/slurm.yaml)"
_LOST = re.compile(r"Job (\S+) \(task: (\d+)\) with path (\S+)_result\.pkl\s+has not produced any output \(state: ([^)]*)\)")


def slurm_error(error: BaseException) -> MetarunError | None:
    """``error`` as one line if it is submitit's word on a refused or lost job, else None."""
    if not type(error).__module__.startswith("submitit"):
        return None
    text = " ".join(str(error).split())
    if type(error).__name__ == "FailedJobError":  # sbatch said no
        reason = text.replace("sbatch: error:", "").strip()[:200]
        return MetarunError(f"Slurm refused the sweep's jobs ({reason}): change {KEYS}")
    if type(error).__name__ == "UncompletedJobError" and (lost := _LOST.search(str(error))):
        job, task, prefix, state = lost.groups()
        return MetarunError(f"Slurm job {job} ended without a result (state: {state}): its log is "
                            f"{Path(prefix + '_log.err')}; a run directory with checkpoints/last.pt resumes with "
                            f"metarun train hydra.run.dir=THAT_DIR")
    return None
