"""The wrapper around every task: record failures in the job's log, always release resources."""

import logging
import signal
import threading
import traceback
from pathlib import Path

from metarun.errors import MetarunError

log = logging.getLogger("metarun")


def hydra_record(run_dir: Path) -> dict[str, str]:
    """The ``.hydra/*.yaml`` files Hydra wrote for this attempt, to be stored in checkpoints."""
    return {f.name: f.read_text() for f in sorted((run_dir / ".hydra").glob("*.yaml"))}


def restore_hydra_record(run_dir: Path) -> None:
    """Hydra rewrites ``.hydra/`` before a task starts; after a failed attempt, put back the record
    that matches ``checkpoints/last.pt``, so bad input never changes what a run directory says."""
    from metarun.utils.checkpoint import load_checkpoint

    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return
    try:
        record = load_checkpoint(last).get("hydra", {})
    except MetarunError:
        return
    for name, text in record.items():
        (run_dir / ".hydra" / name).write_text(text)


def run_task(fn, cfg, run_dir: Path, log_name: str):
    """Run ``fn(cfg, run_dir)``; a failure is written to the job's log before it propagates.

    Under a multirun the launcher records the exception and goes on with the next job, so one
    failed job does not stop a sweep; the CLI prints the error as one line at the end.
    """
    try:
        return fn(cfg, run_dir)
    except BaseException as e:
        if isinstance(e, MetarunError):
            restore_hydra_record(run_dir)
        with open(run_dir / log_name, "a") as f:
            if isinstance(e, MetarunError):
                f.write(f"error: {e}\n")
            elif isinstance(e, KeyboardInterrupt):
                f.write("interrupted\n")
            else:
                f.write("".join(traceback.format_exception(e)))
        raise


class GracefulStop:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current iteration.

    The loop checks ``requested`` between iterations, saves a checkpoint, then stops; a second
    Ctrl-C aborts at once (the last checkpoint stays intact: saves are atomic).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this iteration and saving a checkpoint (Ctrl-C again to abort now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
