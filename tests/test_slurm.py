"""Sweeps on Slurm (hydra/launcher=slurm: hydra-submitit-launcher) against a real cluster, and requeued jobs.

The cluster tests need a Slurm that answers (``scripts/slurm-local`` starts one on this machine; CI
starts it before the tests) and skip, saying why, without one. Their jobs run this interpreter
(submitit submits ``sys.executable``), so they see this checkout.
"""

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metarun.train import train
from metarun.utils import stop
from metarun.utils.checkpoint import load_checkpoint
from support import TINY_SINUSOID, compose_config, read_metrics, slurm_problem

TIMING = ("training_seconds", "wall_clock_seconds")
# Small jobs, so both of a sweep fit on a 2-core CI machine at once.
SMALL_JOBS = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
              "hydra.launcher.timeout_min=10"]
SWEEP_TIMEOUT = 300  # seconds; a job that never ends fails the test instead of hanging CI


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


@pytest.fixture(scope="module")
def slurm():
    problem = slurm_problem()
    if problem:
        pytest.skip(problem)


def sweep_dir_jobs(sweep: Path) -> list[str]:
    """The Slurm job ids of a sweep, from submitit's folder (``.submitit/<job id>``)."""
    return sorted({p.name.split("_")[0] for p in (sweep / ".submitit").glob("*") if p.name[:1].isdigit()})


def cancel(sweep: Path) -> None:
    for job in sweep_dir_jobs(sweep):
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def start_sweep(tmp_path: Path, sweep: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metarun", "train", "-m", *SMALL_JOBS, *overrides,
                             f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, sweep: Path) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=SWEEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        cancel(sweep)
        out, err = process.communicate()
        pytest.fail(f"the sweep did not end within {SWEEP_TIMEOUT} s; squeue:\n"
                    f"{subprocess.run(['squeue'], capture_output=True, text=True).stdout}\n{err[-3000:]}")
    assert process.returncode == 0, err[-3000:]
    return out, err


def run_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name[:1].isdigit()), key=lambda p: int(p.name.split("_")[0]))


@pytest.mark.slow
def test_a_sweep_on_slurm_runs_each_job_as_a_slurm_job_and_writes_its_metrics(tmp_path, slurm):
    sweep = tmp_path / "sweep"
    finish(start_sweep(tmp_path, sweep, TINY_SINUSOID + ["seed=0,1"]), sweep)
    runs = run_dirs(sweep)
    assert [r.name.split("_")[0] for r in runs] == ["0", "1"]
    metrics = [read_metrics(r) for r in runs]
    for run, m in zip(runs, metrics):
        assert m["iterations"] == 6 and m["test"]["episodes"] == 10 and m["metric"] == "mse", run
        assert (run / "checkpoints" / "best.pt").is_file()
    assert metrics[0]["test"]["mse"] != metrics[1]["test"]["mse"]  # seeds 0 and 1: two different runs
    # Each ran as a task of one Slurm array job, which Hydra recorded as the job's id; Slurm's logs sit beside.
    (array,) = sweep_dir_jobs(sweep)
    ids = [re.search(r"^    id: '?(\S+?)'?$", (r / ".hydra" / "hydra.yaml").read_text(), re.M).group(1) for r in runs]
    assert sorted(ids) == [f"{array}_0", f"{array}_1"]
    assert all((sweep / ".submitit" / i / f"{i}_0_log.out").is_file() for i in ids)


@pytest.mark.slow
def test_jobs_slurm_refuses_are_one_line_naming_the_launcher_keys(tmp_path, slurm):
    sweep = tmp_path / "sweep"
    process = start_sweep(tmp_path, sweep, TINY_SINUSOID + ["hydra.launcher.cpus_per_task=100000"])
    out, err = process.communicate(timeout=SWEEP_TIMEOUT)
    assert process.returncode == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("metarun: error:")]
    assert "Slurm refused the sweep's jobs" in line and "cpus_per_task" in line
    assert not list(sweep.glob("0_*"))  # no job ran


def wait_until(condition, what: str, process: subprocess.Popen, sweep: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            cancel(sweep)
            out, err = process.communicate()
            pytest.fail(f"{what} did not happen (sweep exit status {process.returncode}):\n{err[-3000:]}")
        time.sleep(0.05)


def job_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def uninterrupted(settings: list[str], run_dir: Path) -> None:
    """The run in this process on one thread, as the Slurm job ran it (OMP_NUM_THREADS=cpus_per_task=1):
    float32 sums over a different number of threads differ in the last bits."""
    with one_thread():
        train(compose_config(settings), run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["scontrol requeue", "SIGUSR2"])
def test_a_job_slurm_requeues_resumes_its_run_directory_and_ends_as_an_uninterrupted_run(tmp_path, slurm, interruption):
    """``scontrol requeue`` (what preemption does): Slurm sends SIGTERM, metarun saves last.pt at once.
    SIGUSR2 (what submitit gets before the time limit): submitit requeues the job itself and exits;
    the run resumes from the last.pt of its last validation. Either way: the same run directory, the same numbers."""
    settings = TINY_SINUSOID + ["algo.batching=loop", "train.iterations=300", "train.val_every=25"]
    sweep = tmp_path / "sweep"
    process = start_sweep(tmp_path, sweep, settings)
    last = lambda: next(iter(sweep.glob("0_*/checkpoints/last.pt")), None)  # noqa: E731
    wait_until(lambda: last() is not None and len(sweep_dir_jobs(sweep)) == 1, "a first checkpoint", process, sweep)
    (job,) = sweep_dir_jobs(sweep)
    command = ["scontrol", "requeue", job] if interruption == "scontrol requeue" else ["scancel", "--signal=USR2", job]
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    # A requeued job waits (BeginTime) before it starts again; the test lets it start now.
    wait_until(lambda: job_state(job) == "PENDING", "the requeue", process, sweep)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, capture_output=True, timeout=30)
    finish(process, sweep)

    (run,) = run_dirs(sweep)
    log = (run / "train.log").read_text()
    resumed = re.search(r"resuming from (\S+) at iteration (\d+)", log)
    assert resumed and Path(resumed.group(1)) == run / "checkpoints" / "last.pt", log[-2000:]
    assert 25 <= int(resumed.group(2)) < 300
    if interruption == "scontrol requeue":
        assert "SIGTERM: stopping at the next safe point" in log
    uninterrupted(settings, tmp_path / "whole")
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(tmp_path / "whole"))


@pytest.mark.slow
def test_a_job_cancelled_on_slurm_ends_the_sweep_with_one_line_naming_it(tmp_path, slurm):
    sweep = tmp_path / "sweep"
    process = start_sweep(tmp_path, sweep, TINY_SINUSOID + ["algo.batching=loop", "train.iterations=300", "train.val_every=25"])
    wait_until(lambda: next(iter(sweep.glob("0_*/checkpoints/last.pt")), None) is not None, "a first checkpoint", process, sweep)
    (job,) = sweep_dir_jobs(sweep)
    subprocess.run(["scancel", job], check=True, capture_output=True, timeout=30)
    out, err = process.communicate(timeout=SWEEP_TIMEOUT)
    assert process.returncode == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("metarun: error:")]
    assert f"Slurm job {job}" in line and "ended without a result (state: CANCELLED)" in line and "_log.err" in line


def test_a_job_requeued_during_its_first_validation_resumes_with_the_log_it_would_have_written(tmp_path, monkeypatch):
    """A requeue can land while the job validates; on resume that validation runs first, before the
    training bar exists: the per-iteration log line (written where there is no live bar) must not fail."""
    import metarun.train as train_module

    real, calls = train_module.meta_test, []

    def interrupted(algo, data, split, *args, **kwargs):
        calls.append(split)
        if calls.count("val") == 1:  # the validation at iteration 3 of 12
            stop._requested.set()
        return real(algo, data, split, *args, **kwargs)

    settings = TINY_SINUSOID + ["algo.batching=loop", "train.iterations=12"]
    with one_thread():  # small kernels: one thread is the fastest on a shared CI machine
        train(compose_config(settings), tmp_path / "whole")
        monkeypatch.setattr(train_module, "meta_test", interrupted)
        try:
            with pytest.raises(stop.StopRequested):
                train(compose_config(settings), tmp_path / "requeued")
        finally:
            stop._requested.clear()
        assert load_checkpoint(tmp_path / "requeued" / "checkpoints" / "last.pt")["iteration"] == 3
        monkeypatch.undo()
        train(compose_config(settings), tmp_path / "requeued")
    assert without_timing(read_metrics(tmp_path / "requeued")) == without_timing(read_metrics(tmp_path / "whole"))
