"""Tier 3: parallel local sweeps through the real hydra-joblib-launcher, and sweeps that lose jobs.

The joblib launcher runs each job in a worker process of its own: Hydra's callbacks run there too,
and a worker that dies returns nothing. The sweep must still name every failed or lost job, exit
non-zero, and let the other jobs finish.
"""

import os
import pickle
import re
import subprocess
import sys
from datetime import datetime

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher

from metarun.errors import MetarunError
from metarun.utils import jobs
from metarun.utils.share import usable_cpus
from support import TINY_SINUSOID, read_metrics

pytestmark = pytest.mark.slow
JOBLIB = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def metarun(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "metarun", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def log_span(run_dir) -> tuple[datetime, datetime]:
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", (run_dir / "train.log").read_text(), re.M)
    times = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in stamps]
    return min(times), max(times)


def test_joblib_runs_jobs_at_once_each_with_its_share_and_names_the_failed_one(tmp_path):
    sweep = tmp_path / "sweep"
    result = metarun("train", *JOBLIB, "data.shots=5,0,10", *TINY_SINUSOID, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "Error executing job" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("metarun: error: job data.shots=0 "), lines
    assert " failed (the other jobs ran): " in lines[0] and "data.shots=0 is not allowed" in lines[0]
    ok, failed, ok2 = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert read_metrics(ok)["iterations"] == read_metrics(ok2)["iterations"] == 6
    assert not (failed / "metrics.json").exists() and "data.shots=0 is not allowed" in (failed / "train.log").read_text()
    threads = max(1, usable_cpus() // 2)  # 2 jobs at once: half the cores each, never more threads than cores
    for job in (ok, ok2):
        assert f"this job's share of the machine: {threads} CPU thread(s) (2 jobs at once on" in (job / "train.log").read_text()
    spans = [log_span(job) for job in (ok, failed, ok2)]  # at least two of the jobs ran at the same time
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), spans
    assert not list(sweep.glob(".metarun-jobs-*"))  # the jobs' notes go with the sweep


KILLER = '''
import os, signal
from hydra.experimental.callback import Callback

class Killer(Callback):
    """The job with seed 13 dies at its start as a process killed by the kernel would: no result, no exception."""
    def on_job_start(self, config, **kwargs):
        if config.seed == 13:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_job_whose_process_is_killed_is_named_as_lost_and_finished_jobs_are_not(tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "killer_hook.py").write_text(KILLER)
    sweep = tmp_path / "sweep"
    result = metarun("train", *JOBLIB, "+hydra.callbacks.killer._target_=killer_hook.Killer", "seed=1,2,13",
                     *TINY_SINUSOID, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "hook")})
    assert result.returncode == 1, result.stderr  # non-zero: something was lost, not bad input
    assert "Traceback" not in result.stdout + result.stderr
    lines = error_lines(result)
    assert all(line.startswith("metarun: error: ") for line in lines), lines
    lost = [line for line in lines if " was lost" in line]
    assert any(line.startswith("metarun: error: job seed=13 ") for line in lost), lines
    assert "no result came back: its process died" in lost[0]
    assert lines[-1].startswith("metarun: error: the launcher failed: TerminatedWorkerError")
    for num, seed in enumerate((1, 2, 13)):  # a job that finished is never reported lost; a lost one left no metrics
        job = next(sweep.glob(f"{num}_*"), None)
        named = any(line.startswith(f"metarun: error: job seed={seed} ") for line in lost)
        finished = job is not None and (job / "metrics.json").exists()
        assert named != finished, (seed, lines)
    assert not list(sweep.glob(".metarun-jobs-*"))


class ShortLauncher(Launcher):
    """A launcher that returns fewer results than jobs it was handed, as a broken plugin could."""

    def setup(self, **kwargs):
        pass

    def launch(self, job_overrides, initial_job_idx):
        first = JobReturn(overrides=list(job_overrides[0]), status=JobStatus.FAILED)
        first.return_value = MetarunError("data.shots=0 is not allowed")
        return [first]


@pytest.fixture
def fresh_record():
    jobs.record.reset()
    yield jobs.record
    jobs.record.reset()


def test_jobs_are_compared_with_the_results_that_came_back_whatever_the_sweeper_reads(fresh_record):
    launcher = jobs.WatchedLauncher(ShortLauncher())
    results = launcher.launch([["data.shots=0"], ["data.shots=5"], ["data.shots=10"]], initial_job_idx=3)
    assert len(results) == 1  # what the sweeper sees is unchanged
    assert fresh_record.launched == {3: ["data.shots=0"], 4: ["data.shots=5"], 5: ["data.shots=10"]}
    assert [(f.name, type(f.error).__name__) for f in fresh_record.failures] == [
        ("data.shots=0", "MetarunError"), ("data.shots=5", "LostJob"), ("data.shots=10", "LostJob")]


def test_the_cli_names_lost_jobs_in_one_line_each(fresh_record, capsys):
    from metarun.cli import report

    fresh_record.multirun = True
    launcher = jobs.WatchedLauncher(ShortLauncher())
    launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    assert report(fresh_record.failures[0].error, "train", debug=False) == 1
    assert capsys.readouterr().err.splitlines() == [
        "metarun: error: job seed=1 failed (all 2 jobs failed): data.shots=0 is not allowed",
        "metarun: error: job seed=2 was lost: no result came back: its process died or the launcher stopped it"]


def test_a_job_error_that_would_not_unpickle_still_travels_back_with_its_traceback():
    class Picky(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    try:
        raise Picky(1, 2)
    except Picky as e:
        portable = jobs._portable(e)
    back = pickle.loads(pickle.dumps(portable))  # a broken unpickle would fail the launcher's whole batch
    assert isinstance(back, RuntimeError) and "Picky: 1 and 2" in str(back) and "Traceback" in str(back)
    try:
        1 / 0
    except ZeroDivisionError as e:
        kept = jobs._portable(e)
    back = pickle.loads(pickle.dumps(kept))
    assert isinstance(back, ZeroDivisionError) and "in test_a_job_error" in back.__notes__[0]
