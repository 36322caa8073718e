"""Which jobs of a run or sweep failed, learned from Hydra's own job results, and Hydra's errors raised.

``JobResults`` is a Hydra callback (``hydra.callbacks``): ``on_job_end`` receives each job's
``JobReturn``, so the CLI knows every failed job of a sweep and why, whatever the sweeper or
launcher, and reports each in one line once Hydra returns. Hydra would also print its own
"Error executing job with overrides" line when it reads a failed job's result
(``JobReturn.return_value``); a job metarun reports itself reads back quietly instead.

``hydra_raises()`` makes Hydra raise its errors (bad overrides, unknown keys, a failed job) to the
CLI instead of printing its own multi-line report, for the length of the call only; the jobs
themselves, and any process they start, see the user's environment as it was.
"""

import contextlib
import os

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback


class Failure:
    """One failed job: the overrides that made it and the exception its task function raised."""

    def __init__(self, overrides: list[str], error: BaseException):
        self.overrides, self.error = list(overrides), error

    @property
    def name(self) -> str:
        """The job as a person types it: its overrides, or '(defaults)' for a job without any."""
        return " ".join(self.overrides) or "(defaults)"


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

    def add(self, overrides, error: BaseException) -> None:
        if not any(f.error is error for f in self.failures):
            self.failures.append(Failure(overrides or [], error))


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


class JobResults(Callback):
    """Hydra callback: record every job's end; a failed one is reported by metarun, not by Hydra."""

    def on_run_start(self, config, **kwargs) -> None:
        record.multirun = False

    def on_multirun_start(self, config, **kwargs) -> None:
        record.multirun = True  # in this process, even when a launcher runs the jobs in others

    def on_job_start(self, config, **kwargs) -> None:
        if _user_full_error:  # the job runs in the user's environment, not in hydra_raises()'s
            _set_env(FULL_ERROR, _user_full_error[-1])

    def on_job_end(self, config, job_return: JobReturn, **kwargs) -> None:
        if _user_full_error:
            os.environ[FULL_ERROR] = "1"
        record.jobs += 1
        if job_return.status == JobStatus.FAILED:
            record.add(job_return.overrides, job_return._return_value)
            job_return.__class__ = QuietJobReturn  # same fields and status; only the printed line goes
