"""``torchrun -m metarun train``: two CPU processes over the real gloo process group equal one process.

The runs go through the real launcher (``python -m torch.distributed.run``, what ``torchrun`` is) and
the real CLI; the single-process reference runs in this process on the same tasks.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metarun import distributed
from metarun.data.sinusoid import SinusoidTasks
from metarun.data.tasks import task_generator
from metarun.errors import MetarunError
from metarun.train import train
from metarun.utils.checkpoint import load_checkpoint
from support import TINY_OMNIGLOT, TINY_SINUSOID, compose_config, omniglot_location, read_metrics

SINUSOID = [*TINY_SINUSOID, "device=cpu"]


def torchrun(run_dir, overrides, nproc=2, wait=True, env=(), **kwargs):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", "-m", "metarun", "train", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **dict(env)}  # two processes on a small machine
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True, **kwargs)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=180, **kwargs)


def assert_same_parameters(a, b):
    state_a, state_b = load_checkpoint(a)["algo"], load_checkpoint(b)["algo"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-6, msg=key)


def assert_same_test_metrics(a, b, metric):
    ta, tb = read_metrics(a)["test"], read_metrics(b)["test"]
    assert ta[metric] == pytest.approx(tb[metric], rel=1e-5)
    assert ta["ci95"] == pytest.approx(tb["ci95"], rel=1e-5)
    assert ta["per_step"] == pytest.approx(tb["per_step"], rel=1e-5)
    assert ta["episodes"] == tb["episodes"]


@pytest.mark.slow
def test_two_processes_train_maml_on_omniglot_as_one_does(tmp_path, shared_data_root, omniglot_cache_dir):
    # 3 tasks a meta-batch over 2 ranks (2 + 1) and 5 test tasks (3 + 2): unequal shares weigh right.
    overrides = [*TINY_OMNIGLOT, *omniglot_location(shared_data_root, omniglot_cache_dir), "device=cpu",
                 "train.meta_batch_size=3", "train.iterations=2", "train.val_every=2", "test.episodes=5",
                 "optimizer=sgd"]
    # SGD: batch norm follows each conv, so the conv biases' gradient is zero but for rounding, which Adam
    # (dividing by its own size) would turn into whole steps of either sign.
    single = tmp_path / "single"
    train(compose_config(overrides), single)  # (also decodes Omniglot into the cache the ranks read)
    outputs, scratch = tmp_path / "outputs", tmp_path / "tmp"
    outputs.mkdir()
    scratch.mkdir()
    done = torchrun(tmp_path / "dist", overrides, cwd=outputs, env={"TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stdout + done.stderr

    assert_same_parameters(tmp_path / "dist/checkpoints/last.pt", single / "checkpoints/last.pt")
    assert_same_test_metrics(tmp_path / "dist", single, "accuracy")
    assert read_metrics(tmp_path / "dist")["world_size"] == 2
    assert read_metrics(single)["world_size"] == 1
    assert "world size: 2" in (tmp_path / "dist/train.log").read_text()
    assert not any(outputs.iterdir())  # no other rank made a run directory of its own
    assert not list(scratch.glob("metarun-*"))  # and rank 1's scratch folder for Hydra is gone
    assert done.stdout.count("meta-testing the best checkpoint") == 1  # rank 0 alone tells the story


@pytest.mark.slow
def test_a_run_resumed_under_torchrun_ends_as_one_uninterrupted_process(tmp_path):
    single = tmp_path / "single"
    train(compose_config(SINUSOID), single)
    first = torchrun(tmp_path / "dist", [*SINUSOID, "train.iterations=3"])
    assert first.returncode == 0, first.stdout + first.stderr
    assert load_checkpoint(tmp_path / "dist/checkpoints/last.pt")["iteration"] == 3
    resumed = torchrun(tmp_path / "dist", ["train.iterations=6"])  # a bare resume keeps the run's own overrides
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout

    assert_same_parameters(tmp_path / "dist/checkpoints/last.pt", single / "checkpoints/last.pt")
    assert_same_test_metrics(tmp_path / "dist", single, "mse")
    metrics = read_metrics(tmp_path / "dist")
    assert metrics["iterations"] == 6 and metrics["world_size"] == 2
    assert [h["mse"] for h in metrics["val"]["history"]] == pytest.approx(
        [h["mse"] for h in read_metrics(single)["val"]["history"]], rel=1e-5)


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_one_iteration_with_a_checkpoint(tmp_path):
    run_dir = tmp_path / "dist"
    overrides = [*SINUSOID, "train.iterations=100000", "train.val_every=100000"]
    proc = torchrun(run_dir, overrides, wait=False)
    log = run_dir / "train.log"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and "run directory:" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    time.sleep(1)  # training
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)  # as Slurm's scancel: torchrun passes it to both ranks
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - started < 20, out  # the ranks stopped together, nobody waited to be killed
    last = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert 0 < last["iteration"] < 100000, out
    assert out.count(f"stopped at iteration {last['iteration']}; resume with: metarun train hydra.run.dir=") == 1, out
    assert "exitcode  : -9" not in out  # no rank had to be killed


@pytest.mark.slow
def test_too_few_tasks_for_the_processes_is_one_line(tmp_path):
    done = torchrun(tmp_path / "dist", [*SINUSOID, "train.meta_batch_size=1"])
    assert done.returncode != 0
    assert "metarun: error: train.meta_batch_size=1 gives some of torchrun's 2 processes no task" in done.stderr
    assert "/metarun/" not in done.stderr  # no traceback through metarun (torchrun prints its own summary)
    assert not (tmp_path / "dist" / "checkpoints").exists()


# -- the pieces, in one process -------------------------------------------------------------------
@pytest.mark.parametrize("count,size", [(4, 2), (3, 2), (5, 3), (2, 4), (600, 7)])
def test_shares_are_contiguous_and_cover_every_task_once(count, size):
    shares = [distributed.World(rank, size).share(count) for rank in range(size)]
    assert shares[0][0] == 0 and shares[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(e - s for s, e in shares) - min(e - s for s, e in shares) <= 1
    assert shares[0][1] > shares[0][0] or count == 0  # rank 0 (which decides the paths) always has a task


def test_the_ranks_shares_of_a_meta_batch_make_the_single_process_one():
    data = SinusoidTasks(shots=5, queries=5)
    whole = data.sample("train", 5, task_generator("train", 3))
    parts = [distributed.World(rank, 2).sample(data, "train", 5, task_generator("train", 3)) for rank in range(2)]
    assert torch.equal(torch.cat([p.support_x for p in parts]), whole.support_x)
    assert torch.equal(torch.cat([p.query_y for p in parts]), whole.query_y)
    fixed = torch.cat([e.support_x for e in data.fixed_episodes("test", 7, 3, 0)])
    shared = [e.support_x for rank in range(2) for e in distributed.World(rank, 2).fixed_episodes(data, "test", 7, 3, 0)]
    assert torch.equal(torch.cat(shared), fixed)


def test_other_ranks_run_hydra_in_a_scratch_directory(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    argv, scratch = distributed.scratch_argv(["metarun", "seed=1", "hydra.run.dir=/runs/a"])
    try:
        assert argv == ["metarun", "seed=1", f"hydra.run.dir={scratch}"] and os.path.isdir(scratch)
    finally:
        os.rmdir(scratch)
    with pytest.raises(MetarunError, match="leave out -m"):
        distributed.scratch_argv(["metarun", "-m", "seed=1,2"])
    monkeypatch.setenv("RANK", "0")
    assert distributed.scratch_argv(["metarun", "hydra.run.dir=/runs/a"]) == (["metarun", "hydra.run.dir=/runs/a"], None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.start("auto") == distributed.World()  # outside torchrun: no process group
