"""Which jobs of a run or sweep failed, learned from Hydra's own job results, and Hydra's errors raised.

``JobResults`` is a Hydra callback (``hydra.callbacks``): ``on_job_end`` receives each job's
``JobReturn``, so the CLI knows every failed job of a sweep and why, whatever the sweeper or
launcher, and reports each in one line once Hydra returns. Hydra would also print its own
"Error executing job with overrides" line when it reads a failed job's result
(``JobReturn.return_value``); a job metarun reports itself reads back quietly instead.

A launcher may run the jobs in other processes (joblib, submitit): there the callbacks run in the
job's process, and a job whose process dies (killed, ``os._exit``, out of memory) returns nothing
at all. So ``watch_launches()`` also wraps every launcher a sweeper makes: the jobs it was handed
are compared with the results it returned, whatever the sweeper; a failed result is recorded
there, and a job without a result is recorded as lost (``LostJob``). Jobs that did end in another
process note it in ``<sweep dir>/.metarun-jobs-<pid>.jsonl`` (removed when the sweep ends), so a
launcher that fails as a whole (loky's pool, when a worker dies) loses only the unfinished ones.

``hydra_raises()`` makes Hydra raise its errors (bad overrides, unknown keys, a failed job) to the
CLI instead of printing its own multi-line report, for the length of the call only; the jobs
themselves, and any process they start, see the user's environment as it was.
"""

import contextlib
import json
import os
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher


class Failure:
    """One failed job: the overrides that made it and the exception its task function raised."""

    def __init__(self, overrides: list[str], error: BaseException):
        self.overrides, self.error = list(overrides), error

    @property
    def name(self) -> str:
        """The job as a person types it: its overrides, or '(defaults)' for a job without any."""
        return " ".join(self.overrides) or "(defaults)"


class LostJob(Exception):
    """A job that the launcher was handed and that returned no result: its process died, or the launcher failed."""


FULL_ERROR = "HYDRA_FULL_ERROR"  # Hydra's switch: "1" re-raises from the @hydra.main call (hydra/_internal/utils.py)
_user_full_error: list[str | None] = []  # the user's own value while hydra_raises() holds it


@contextlib.contextmanager
def hydra_raises():
    """Hydra re-raises every error to the caller inside this block; the environment is restored after."""
    _user_full_error.append(os.environ.get(FULL_ERROR))
    os.environ[FULL_ERROR] = "1"
    try:
        yield
    finally:
        _set_env(FULL_ERROR, _user_full_error.pop())


def _set_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


class _Record:
    """This process's results since the last ``reset()``."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.jobs, self.failures, self.multirun = 0, [], False
        self.launched: dict[int, list[str]] = {}  # job number -> overrides, as the sweeper handed them out
        self.launch_error: BaseException | None = None  # a launcher that raised instead of returning results
        self.ends: Path | None = None  # where jobs in other processes note that they ended

    def add(self, overrides, error: BaseException) -> None:
        if not any(f.error is error for f in self.failures):
            self.failures.append(Failure(overrides or [], error))

    def ended(self) -> dict[int, dict]:
        """Job number -> {"status", "error"} of the jobs that noted their end in another process."""
        found = {}
        try:
            for line in self.ends.read_text().splitlines() if self.ends else []:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    entry = json.loads(line)
                    found[int(entry["num"])] = entry
        except OSError:
            pass
        return found


record = _Record()


class QuietJobReturn(JobReturn):
    """A failed job's result as Hydra keeps it (status FAILED), without Hydra's printed line: metarun
    reports the job. It travels with the result, so a launcher that ran the job in another process
    still hands the failure to this one. Read in a single run, it raises the job's exception; read by
    a sweeper, it is NaN (a failed trial, to Optuna), so the sweeper reads every result and goes on
    instead of stopping at the first failure, and the CLI reports each failed job when it ends."""

    @property
    def return_value(self):
        if self.status == JobStatus.FAILED:
            record.add(self.overrides, self._return_value)  # also where on_job_end ran in another process
            if record.multirun:
                return float("nan")
            raise self._return_value
        return JobReturn.return_value.fget(self)

    @return_value.setter
    def return_value(self, value) -> None:
        self._return_value = value


class WatchedLauncher(Launcher):
    """A sweeper's launcher, unchanged but for what it reports: each job handed to it, and its result or loss."""

    def __init__(self, launcher: Launcher):
        self.launcher = launcher

    def setup(self, **kwargs) -> None:
        self.launcher.setup(**kwargs)

    def __getattr__(self, name):  # the launcher's own settings, for a sweeper that reads them
        if name == "launcher":
            raise AttributeError(name)
        return getattr(self.launcher, name)

    def launch(self, job_overrides, initial_job_idx):
        batch = {initial_job_idx + i: list(overrides) for i, overrides in enumerate(job_overrides)}
        record.launched.update(batch)
        try:
            results = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        except BaseException as e:
            record.launch_error = e
            _lost(batch, ended=record.ended(), why=e)
            raise
        for num, result in zip(batch, results):
            if result.status == JobStatus.FAILED:
                record.add(result.overrides or batch[num], result._return_value)
        _lost(dict(list(batch.items())[len(results):]), ended={}, why=None)
        return results


def _lost(batch: dict[int, list[str]], ended: dict[int, dict], why: BaseException | None) -> None:
    """Record the jobs of ``batch`` that returned nothing; those that noted a failed end fail with its message."""
    for num, overrides in batch.items():
        end = ended.get(num)
        if end is None:
            record.add(overrides, LostJob("no result came back: its process died or the launcher stopped it"))
        elif end.get("status") == "FAILED":
            record.add(overrides, LostJob(f"{end.get('error')} (the launcher lost its result)"))


def _watched(instantiate):
    def instantiate_launcher(self, *args, **kwargs):
        return WatchedLauncher(instantiate(self, *args, **kwargs))
    instantiate_launcher.metarun_watched = True
    return instantiate_launcher


@contextlib.contextmanager
def watch_launches():
    """Every launcher a sweeper makes inside this block reports its jobs and results to ``record``."""
    from hydra.core.plugins import Plugins

    original = Plugins.instantiate_launcher
    if getattr(original, "metarun_watched", False):  # already inside the block
        yield
        return
    Plugins.instantiate_launcher = _watched(original)
    try:
        yield
    finally:
        Plugins.instantiate_launcher = original
        if record.ends is not None:
            with contextlib.suppress(OSError):
                record.ends.unlink()
            record.ends = None
        for key in (ENDS, ENDS + "_PID"):
            os.environ.pop(key, None)


def _watching() -> bool:
    from hydra.core.plugins import Plugins

    return getattr(Plugins.instantiate_launcher, "metarun_watched", False)


ENDS = "METARUN_JOB_ENDS"  # the file where jobs in other processes note their end (set by the sweep's process)


def _note_end(job_return: JobReturn) -> None:
    """In a job's own process (not the sweep's): append this job's end to the sweep's notes."""
    path, owner = os.environ.get(ENDS, ""), os.environ.get(ENDS + "_PID")
    if not path or owner == str(os.getpid()):
        return
    from hydra.core.hydra_config import HydraConfig

    error = job_return._return_value if job_return.status == JobStatus.FAILED else None
    entry = {"num": HydraConfig.get().job.num, "status": job_return.status.name,
             "error": None if error is None else " ".join(str(error).split())[:300] or type(error).__name__}
    with contextlib.suppress(OSError, ValueError):
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _in_another_process() -> bool:
    """Whether this job runs outside the sweep's process (its result travels back pickled)."""
    owner = os.environ.get(ENDS + "_PID")
    return owner is not None and owner != str(os.getpid())


def _portable(error: BaseException) -> BaseException:
    """A job's exception as it can travel to the sweep's process: with its traceback as a note (pickling
    drops the frames), and as a RuntimeError naming it where it would not unpickle (which would break the
    launcher's whole batch)."""
    import pickle
    import traceback

    text = "".join(traceback.format_exception(error)).rstrip()
    if error.__traceback__ is not None and not getattr(error, "__notes__", None):
        error.add_note(f"(in the job's process {os.getpid()})\n{text}")
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error} (in the job's process {os.getpid()})\n{text}")


class JobResults(Callback):
    """Hydra callback: record every job's end; a failed one is reported by metarun, not by Hydra."""

    def on_run_start(self, config, **kwargs) -> None:
        record.multirun = False

    def on_multirun_start(self, config, **kwargs) -> None:
        record.multirun = True  # in this process, even when a launcher runs the jobs in others
        if not _watching():  # the notes are read, and removed, by watch_launches() only
            return
        with contextlib.suppress(Exception):  # no sweep directory (a test's bare config): no notes
            record.ends = Path(str(config.hydra.sweep.dir)).absolute() / f".metarun-jobs-{os.getpid()}.jsonl"
            os.environ[ENDS], os.environ[ENDS + "_PID"] = str(record.ends), str(os.getpid())

    def on_job_start(self, config, **kwargs) -> None:
        if _user_full_error:  # the job runs in the user's environment, not in hydra_raises()'s
            _set_env(FULL_ERROR, _user_full_error[-1])

    def on_job_end(self, config, job_return: JobReturn, **kwargs) -> None:
        if _user_full_error:
            os.environ[FULL_ERROR] = "1"
        record.jobs += 1
        _note_end(job_return)
        if job_return.status == JobStatus.FAILED and _in_another_process():
            job_return._return_value = _portable(job_return._return_value)
        if job_return.status == JobStatus.FAILED:
            record.add(job_return.overrides, job_return._return_value)
            job_return.__class__ = QuietJobReturn  # same fields and status; only the printed line goes
