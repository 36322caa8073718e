"""The wrapper around every command (train, eval): own the run directory, honour signals, turn faults into one line.

Not Hydra's ``run_job``: that one calls the command's ``main``, which calls ``run_command``.
"""

import logging
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from metarun.errors import MetarunError
from metarun.utils import stop
from metarun.utils.faults import user_error
from metarun.utils.rundir import owned, remove_if_stray

log = logging.getLogger("metarun")


def _single_run() -> bool:
    return not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN


def run_command(fn, cfg, run_dir: Path, command: str):
    """Run ``fn(cfg, run_dir)`` holding ``run_dir`` for ``command``, with SIGINT/SIGTERM as stop requests.

    A machine fault (full disk, file-size limit, out of memory) becomes a one-line MetarunError; a
    failure is written to the job's log (not when the directory was refused: it is another run's).
    Under a multirun the launcher records the exception and goes on with the next job, so one failed
    job does not stop a sweep; the CLI prints the error as one line at the end. A single run that
    fails before writing a checkpoint removes the folders it created.
    """
    try:
        with stop.handle_signals(), owned(run_dir, command):
            open(Path(run_dir) / f"{command}.log", "a").close()  # an unwritable log is one line now, not a logging traceback
            try:
                return fn(cfg, run_dir)
            except BaseException as e:
                _log_failure(Path(run_dir) / f"{command}.log", _reported(e, run_dir))
                last = Path(run_dir) / "checkpoints" / "last.pt"
                if isinstance(e, stop.StopRequested) and command == "train" and last.is_file() and not e.args:
                    log.warning(f"stopped before training resumed; resume with: metarun train hydra.run.dir={run_dir}")
                raise
    except BaseException as e:
        if _single_run():
            remove_if_stray(run_dir)
        error = _reported(e, run_dir)
        if error is e:
            raise
        raise error from None


def _reported(error: BaseException, run_dir: Path) -> BaseException:
    """A machine fault as a one-line MetarunError that says what was kept; anything else as it is."""
    if isinstance(error, (MetarunError, KeyboardInterrupt)):
        return error
    last = Path(run_dir) / "checkpoints" / "last.pt"
    return user_error(error, "checkpoints/last.pt keeps the last good state" if last.is_file() else "") or error


def _log_failure(path: Path, error: BaseException) -> None:
    try:
        with open(path, "a") as f:
            if isinstance(error, MetarunError):
                f.write(f"error: {error}\n")
            elif isinstance(error, KeyboardInterrupt):
                f.write("interrupted\n")
            else:
                f.write("".join(traceback.format_exception(error)))
    except OSError:
        pass  # the log's folder is what failed: the console still gets the error
