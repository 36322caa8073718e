"""Tier 1 for utils/share.py: each job of a parallel sweep takes its share of the cores and GPUs."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from metarun import task_threads
from metarun.config import conf_dir
from metarun.utils import share
from metarun.utils.share import Share, decide

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


@pytest.mark.parametrize("n_jobs, cpus, threads", [(2, 2, 1), (2, 16, 8), (3, 16, 5), (4, 2, 1), (-1, 8, 1),
                                                   (-2, 8, 1), ("2", 6, 3)])
def test_parallel_jobs_divide_the_cores_between_them(n_jobs, cpus, threads):
    got = decide(JOBLIB, n_jobs, 0, cpus, 0)
    assert got.threads == threads and got.gpu is None  # never more busy threads than cores, never fewer than one


def test_one_job_at_a_time_keeps_torchs_defaults():
    assert decide(BASIC, None, 3, 16, 4) == Share(None, None, "BasicLauncher runs one job at a time here")
    assert decide(JOBLIB, 1, 3, 16, 4).threads is None and decide(JOBLIB, 1, 3, 16, 4).gpu is None
    assert decide(JOBLIB, -8, 0, 8, 0).threads is None  # joblib: -8 on 8 CPUs is one job at a time
    assert decide(None, 4, 0, 8, 2) == Share(None, None, "no launcher runs one job at a time here")


def test_each_job_takes_the_gpu_of_its_number_modulo_the_visible_gpus():
    assert [decide(JOBLIB, 4, num, 16, 4).gpu for num in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [decide(JOBLIB, 2, num, 16, 3).gpu for num in range(4)] == [0, 1, 2, 0]
    assert decide(JOBLIB, 4, 5, 16, 1).gpu is None  # one GPU: every job uses it, as device=auto would
    line = decide(JOBLIB, 4, 5, 16, 4).describe()
    assert line == "4 CPU thread(s), GPU cuda:1 (4 jobs at once on 16 cores, job 5 of the sweep on GPU 1 of 4)"


@pytest.fixture
def restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)
    HydraConfig.instance().cfg = None


def hydra_job(overrides: list[str], num: int):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name="train"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.job.num = RunMode.MULTIRUN, num
    HydraConfig.instance().set_config(cfg)


def test_a_joblib_job_sets_its_threads_from_the_launcher_config_hydra_gives_it(restore_threads, caplog):
    hydra_job(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], num=1)
    caplog.set_level("INFO", logger="metarun")
    got = share.apply_share()
    expected = max(1, share.usable_cpus() // 2)
    assert got.threads == expected and torch.get_num_threads() == expected
    assert f"this job's share of the machine: {expected} CPU thread(s)" in caplog.text


def test_a_basic_multirun_job_is_left_alone(restore_threads, caplog):
    torch.set_num_threads(2)
    hydra_job([], num=1)
    caplog.set_level("INFO", logger="metarun")
    assert share.apply_share().threads is None and torch.get_num_threads() == 2 and "share" not in caplog.text


def test_with_one_thread_per_job_the_threads_path_is_no_candidate(restore_threads):
    class Algo:
        parallel_tasks_in_training = True

    episode = type("Episode", (), {"support_x": torch.zeros(8, 1), "num_tasks": 8})()
    torch.set_num_threads(decide(JOBLIB, 2, 0, 2, 0).threads)
    assert not task_threads.available(Algo(), "train", episode)
    torch.set_num_threads(decide(BASIC, None, 0, 2, 0).threads or 2)
    assert task_threads.available(Algo(), "train", episode)
