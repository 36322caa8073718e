"""The ``threads`` execution path (metarun.task_threads): tasks split over worker threads give the loop's
numbers (float64, every algorithm, both phases), the process keeps its thread count, and the race can choose it."""

import threading

import pytest
import torch

from metarun import execution as ex
from metarun import task_threads
from metarun.algos.reptile import Reptile
from metarun.execution import Execution, meta_gradient
from metarun.models import Conv4
from support import float64_algorithms, random_image_episode

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 5

pytestmark = pytest.mark.skipif(torch.get_num_threads() < 2, reason="the threads path needs 2 or more CPU threads")


def network(out_features=WAYS):
    torch.manual_seed(0)
    return Conv4(out_features=out_features, hidden=4).double()


ALGORITHMS = float64_algorithms(WAYS, SHOTS)


def grads_of(algo, episode, **kwargs):
    algo.zero_grad(set_to_none=True)
    loss, metrics, _ = meta_gradient(algo, episode, iteration=3, **kwargs)
    return [None if p.grad is None else p.grad.clone() for p in algo.parameters()], loss, metrics


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_the_threads_meta_gradient_is_the_loops(name, chunk):
    algo = ALGORITHMS[name]()
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES, seed=0)
    want, want_loss, want_metrics = grads_of(algo, episode)
    got, loss, metrics = grads_of(algo, episode, chunk=chunk, threads=task_threads.TaskThreads())
    assert [g is None for g in got] == [g is None for g in want]
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k], want_metrics[k], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(ALGORITHMS) + ["reptile"])
def test_threads_evaluation_is_the_loops(name):
    make = ALGORITHMS.get(name) or (lambda: Reptile(network(), "classification", inner_iterations=3, inner_batch_size=4,
                                                    eval_inner_steps=3, eval_inner_batch_size=2, batching="loop"))
    algo = make()
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES, seed=1)
    steps = 0 if name in ("protonet", "matchingnet", "snail") else 2
    pinned = Execution("threads", None, None)
    assert pinned.path(algo, "eval", episode, steps=steps) == "threads"
    with torch.no_grad():  # as meta-test calls it: the workers' grad mode is their own
        got = pinned.evaluate(algo, episode, steps)
    want = Execution("loop", None, None).evaluate(algo, episode, steps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_workers_run_one_intra_op_thread_each_and_the_process_keeps_its_count():
    algo = ALGORITHMS["maml"]()
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    pool, seen = task_threads.TaskThreads(), []
    before = torch.get_num_threads()
    blocks = pool.map(algo, episode, lambda worker, block: seen.append(
        (threading.current_thread().name, torch.get_num_threads(), worker is not algo)) or block.num_tasks)
    workers = min(before, TASKS)
    assert blocks == [b - a for a, b in task_threads.blocks(TASKS, workers)] and sum(blocks) == TASKS
    assert all(name.startswith("metarun-task") and n == 1 and copied for name, n, copied in seen)
    assert torch.get_num_threads() == before


def test_a_workers_error_is_raised_after_every_worker_finished():
    algo = ALGORITHMS["maml"]()
    episode = random_image_episode(4, WAYS, SHOTS, QUERIES)
    pool, finished = task_threads.TaskThreads(), []

    def work(worker, block):
        if block.support_x[0].equal(episode.support_x[0]):
            raise RuntimeError("the first block fails")
        threading.Event().wait(0.2)
        finished.append(block.num_tasks)

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="first block fails"):
        pool.map(algo, episode, work)
    assert len(finished) == min(before, 4) - 1 and torch.get_num_threads() == before


def test_worker_copies_share_the_parameters_and_follow_a_replaced_tensor():
    algo = ALGORITHMS["maml"]()
    pool = task_threads.TaskThreads()
    copies = pool.copies(algo, 2)
    assert all(c is not algo and c.model is not algo.model for c in copies)
    assert all(a is b for c in copies for a, b in zip(c.parameters(), algo.parameters()))
    with torch.no_grad():
        next(algo.parameters()).add_(1.0)  # an optimiser step is seen by every worker
    assert all(torch.equal(next(c.parameters()), next(algo.parameters())) for c in copies)
    algo.model.register_buffer("scale", torch.ones(1))
    again = pool.copies(algo, 2)  # a new tensor: new copies holding it
    assert again[0] is not copies[0] and again[0].model.scale is algo.model.scale


def test_reptile_training_never_takes_the_threads_path(caplog):
    algo = Reptile(network(), "classification", inner_iterations=2, inner_batch_size=4, batching="threads")
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    execution = Execution("threads", None, None)
    assert execution.path(algo, "train", episode) == "loop"  # its mini-batch orders come from the global RNG
    assert execution.path(algo, "eval", episode, steps=2) == "threads"  # evaluation draws per task: it may
    assert "threads" not in Execution("auto", None, None).candidates(algo, "train", episode)
    assert "the loop runs instead" in caplog.text


def test_on_a_gpu_or_with_one_thread_threads_is_not_a_candidate(monkeypatch):
    algo = ALGORITHMS["maml"]()
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    assert task_threads.workers_for(torch.device("cuda"), 32) == 0
    assert not task_threads.available(algo, "train", episode.tasks(0, 1))  # one task: nothing to split
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert Execution("auto", None, None).candidates(algo, "train", episode) == ("loop", "vmap")


@pytest.mark.parametrize("times, path, why", [
    ({"loop": 1.0, "vmap": 0.95, "threads": 0.6}, "threads", "threads faster by 37%"),
    ({"loop": 1.0, "vmap": 0.62, "threads": 0.6}, "threads", "within 10%: threads, preferred"),
    ({"loop": 0.62, "vmap": 3.0, "threads": 0.6}, "loop", "within 10%: the default"),
    ({"loop": 0.61, "vmap": 0.62, "threads": 0.6}, "loop", "no path faster by 10%: the default"),
])
def test_the_race_of_three_paths(times, path, why):
    clock = [0.0]
    runs = dict.fromkeys(times, 0)

    def run(p):
        runs[p] += 1
        clock[0] += times[p]

    got, best, reason = ex.race(run, torch.device("cpu"), tuple(times), clock=lambda: clock[0], budget_s=1e9)
    assert got == path and why in reason and best == pytest.approx(times)
    third = sorted(times, key=times.get)[2]
    # the two fastest race on; a third far behind them after the first timed round is timed no more
    assert runs[third] == (2 if times[third] > ex.DROP * min(times.values()) else runs[path])
