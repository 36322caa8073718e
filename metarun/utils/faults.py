"""Faults of the machine, not of metarun: a full disk, a file-size limit, a read-only or missing
folder, running out of memory. Each becomes one line that names the cause and what to do."""

import errno

import torch

from metarun.errors import MetarunError
from metarun.utils.slurm import slurm_error

# The cause a person should read, by errno: a full disk says disk full, not "network" or "I/O".
_CAUSES = {
    errno.ENOSPC: ("disk full", "free space on that disk or choose another hydra.run.dir"),
    errno.EDQUOT: ("disk quota exceeded", "free space in your quota or choose another hydra.run.dir"),
    errno.EFBIG: ("file size limit reached (ulimit -f)", "raise the limit or choose another hydra.run.dir"),
    errno.EROFS: ("read-only file system", "choose a writable hydra.run.dir"),
    errno.EACCES: ("permission denied", "choose a folder you can write to as hydra.run.dir"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to as hydra.run.dir"),
    errno.ENOTDIR: ("part of the path is a file, not a folder", "choose another hydra.run.dir"),
    errno.EISDIR: ("it is a folder, not a file", "remove that folder or choose another hydra.run.dir"),
    errno.EEXIST: ("a file is in the way of a folder", "choose another hydra.run.dir"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENAMETOOLONG: ("the path is too long", "choose a shorter hydra.run.dir"),
    errno.EIO: ("input/output error (a failing disk or a lost network mount)", "check the disk"),
    errno.EMFILE: ("too many open files (ulimit -n)", "raise the limit"),
}

OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in OOM_MARKERS)


def user_error(error: BaseException, kept: str = "") -> MetarunError | None:
    """``error`` as a one-line MetarunError if it is a fault of the machine, else None (a bug).
    ``kept`` says what survives (``checkpoints/last.pt keeps the last good state``)."""
    tail = f"; {kept}" if kept else ""
    if isinstance(error, OSError) and error.errno is not None:
        cause, fix = _CAUSES.get(error.errno, (error.strerror or type(error).__name__, "check the path"))
        where = error.filename if error.filename is not None else "a file"
        return MetarunError(f"cannot write or read {where}: {cause} [{errno.errorcode.get(error.errno, error.errno)}]; "
                            f"{fix}{tail}")
    if _is_oom(error):
        device = "GPU memory" if isinstance(error, getattr(torch, "OutOfMemoryError", ())) else "memory"
        first = " ".join(str(error).split())[:160]
        return MetarunError(f"out of {device}{f' ({first})' if first else ''}: lower train.meta_batch_size (or data.ways, data.shots, "
                            f"data.queries, algo.inner_steps), or set algo.batching=loop{tail}")
    return slurm_error(error)  # sbatch refused the jobs, or Slurm lost one (hydra/launcher=slurm)
