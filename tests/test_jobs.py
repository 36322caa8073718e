"""Tier 1 for utils/jobs.py: failed jobs are learned from Hydra's job results, whatever runs them."""

import math
import os
import pickle

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from metarun.cli import COMMANDS, PLAIN_COMMANDS
from metarun.config import conf_dir
from metarun.errors import MetarunError
from metarun.utils import jobs


@pytest.fixture(autouse=True)
def fresh_record():
    jobs.record.reset()
    yield
    jobs.record.reset()


def job_return(overrides, error=None):
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED if error else JobStatus.COMPLETED)
    ret.return_value = error if error else 0.5
    return ret


def test_every_failed_job_is_recorded_and_hydra_prints_nothing_for_it(capsys):
    callback, config = jobs.JobResults(), OmegaConf.create({})
    callback.on_multirun_start(config=config)
    first, second = MetarunError("data.shots=0 is not allowed"), MetarunError("data.shots=-1 is not allowed")
    results = [job_return(["data.shots=0"], first), job_return(["data.shots=5"]), job_return(["data.shots=-1"], second)]
    for ret in results:
        callback.on_job_end(config=config, job_return=ret)
    assert jobs.record.multirun and jobs.record.jobs == 3
    assert [(f.name, f.error) for f in jobs.record.failures] == [("data.shots=0", first), ("data.shots=-1", second)]
    # What a sweeper does next: read each result; a failed one is NaN (a failed trial) and keeps its
    # status, so the sweep goes on; in a single run, reading it raises the job's own exception.
    assert results[1].return_value == 0.5
    assert math.isnan(results[0].return_value) and math.isnan(results[2].return_value)
    assert results[0].status == JobStatus.FAILED and isinstance(results[0], JobReturn)
    callback.on_run_start(config=config)
    with pytest.raises(MetarunError) as raised:
        _ = results[0].return_value
    assert raised.value is first
    assert capsys.readouterr().err == ""  # Hydra's "Error executing job with overrides" line is not printed
    assert len(jobs.record.failures) == 2  # read back, the same failure is not counted twice


def test_a_failure_from_another_process_is_recorded_when_read():
    # A launcher like joblib or submitit runs on_job_end in the worker and sends the result back pickled.
    ret = job_return(["algo=maml"], MetarunError("out of memory"))
    ret2 = job_return(["algo=fomaml"], MetarunError("disk full"))
    for r in (ret, ret2):
        jobs.JobResults().on_job_end(config=OmegaConf.create({}), job_return=r)
    jobs.record.reset()  # this process never saw the job end
    jobs.record.multirun = True  # the sweep runs in this process, the jobs in others
    back = [pickle.loads(pickle.dumps(ret)), pickle.loads(pickle.dumps(ret2))]
    assert all(math.isnan(r.return_value) for r in back)  # the sweeper reads both and goes on
    assert [f.name for f in jobs.record.failures] == ["algo=maml", "algo=fomaml"]


def test_hydra_raises_only_for_the_call_and_jobs_see_the_users_environment(monkeypatch):
    monkeypatch.delenv(jobs.FULL_ERROR, raising=False)
    callback, config = jobs.JobResults(), OmegaConf.create({})
    with jobs.hydra_raises():
        assert os.environ[jobs.FULL_ERROR] == "1"  # Hydra re-raises to the CLI instead of printing its report
        callback.on_job_start(config=config)
        assert jobs.FULL_ERROR not in os.environ  # the job, and what it starts, run as the user set them
        callback.on_job_end(config=config, job_return=job_return([]))
        assert os.environ[jobs.FULL_ERROR] == "1"
    assert jobs.FULL_ERROR not in os.environ
    monkeypatch.setenv(jobs.FULL_ERROR, "0")
    with jobs.hydra_raises():
        callback.on_job_start(config=config)
        assert os.environ[jobs.FULL_ERROR] == "0"
    assert os.environ[jobs.FULL_ERROR] == "0"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in PLAIN_COMMANDS])
def test_every_command_registers_the_job_results_beside_the_run_directory(command):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name=command):
        callbacks = compose(config_name=command, return_hydra_config=True).hydra.callbacks
    assert {c._target_ for c in callbacks.values()} == {"metarun.utils.jobs.JobResults",
                                                       "metarun.utils.rundir.RunDirCallback"}


def test_the_cli_names_each_failed_job_and_keeps_a_bugs_traceback(capsys):
    from metarun.cli import report

    callback, config = jobs.JobResults(), OmegaConf.create({})
    callback.on_multirun_start(config=config)
    user = MetarunError("data.shots=0 is not allowed")
    try:
        1 / 0
    except ZeroDivisionError as e:
        bug = e
    for ret in (job_return(["data.shots=0"], user), job_return(["data.shots=1"], bug)):
        callback.on_job_end(config=config, job_return=ret)
    assert report(user, "train", debug=False) == 1  # a bug among the failures: exit status 1, not 2
    err = capsys.readouterr().err
    assert err.startswith("metarun: error: job data.shots=0 failed (all 2 jobs failed): data.shots=0 is not allowed\n")
    assert "metarun: job data.shots=1 failed:\nTraceback" in err and "ZeroDivisionError: division by zero" in err
    jobs.record.reset()
    assert report(user, "train", debug=False) == 2  # not a sweep: the error alone, as one line
    assert capsys.readouterr().err == "metarun: error: data.shots=0 is not allowed\n"
