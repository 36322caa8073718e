"""The execution module (metarun.execution): chunked meta-gradients, per-shape decisions, their caches."""

import json
import logging

import pytest
import torch

from metarun import execution as ex
from metarun.algos.anil import ANIL
from metarun.algos.maml import MAML
from metarun.algos.mamlpp import MAMLpp
from metarun.algos.metasgd import MetaSGD
from metarun.algos.protonet import ProtoNet
from metarun.algos.reptile import Reptile
from metarun.errors import MetarunError
from metarun.execution import Execution, chunk_bounds, chunk_for_memory, meta_gradient
from metarun.models import Conv4
from metarun.train import train
from metarun.utils.checkpoint import load_checkpoint, save_checkpoint
from support import TINY_SINUSOID, compose_config, random_image_episode, read_metrics

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 5
THREADED = torch.get_num_threads() >= 2  # the threads path is a candidate (on this CPU, with TASKS tasks)


def network(out_features=WAYS):
    torch.manual_seed(0)
    return Conv4(out_features=out_features, hidden=4).double()


ALGORITHMS = {
    "maml": lambda b: MAML(network(), "classification", inner_lr=0.4, inner_steps=2, batching=b),
    "fomaml": lambda b: MAML(network(), "classification", inner_lr=0.4, inner_steps=2, first_order=True, batching=b),
    "mamlpp": lambda b: MAMLpp(network(), "classification", inner_steps=2, msl_iterations=10, batching=b),
    "anil": lambda b: ANIL(network(), "classification", inner_steps=2, batching=b),
    "metasgd": lambda b: MetaSGD(network(), "classification", batching=b),
    "reptile": lambda b: Reptile(network(), "classification", inner_iterations=3, inner_batch_size=4, batching=b),
    "protonet": lambda b: ProtoNet(network(None), "classification", batching=b),
}


def accumulated(algo, episode, chunk):
    torch.manual_seed(1)  # Reptile draws its inner mini-batches from the global RNG
    algo.zero_grad(set_to_none=True)
    loss, metrics, _ = meta_gradient(algo, episode, iteration=3, chunk=chunk)
    return [p.grad.clone() for p in algo.parameters()], metrics


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_chunked_meta_gradient_equals_the_unchunked_one(name, batching):
    algo = ALGORITHMS[name](batching)
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES, seed=0)
    whole, whole_metrics = accumulated(algo, episode, None)
    for chunk in (2, 1):  # uneven chunks (2, 2, 1) and one task at a time
        grads, metrics = accumulated(algo, episode, chunk)
        for got, want in zip(grads, whole):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert metrics.keys() == whole_metrics.keys()
        for k in metrics:
            torch.testing.assert_close(metrics[k], whole_metrics[k], rtol=1e-10, atol=1e-12)
    # and the unchunked gradient is the plain meta_loss's
    torch.manual_seed(1)
    loss, _ = algo.meta_loss(episode, 3)
    plain = torch.autograd.grad(loss, list(algo.parameters()), allow_unused=True)
    for got, want in zip(whole, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_chunk_bounds_and_memory_rule():
    assert chunk_bounds(5, None) == [(0, 5)] and chunk_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_bounds(3, 8) == [(0, 3)]
    assert chunk_for_memory(per_task_bytes=10, free_bytes=1000, tasks=32) is None  # 320 B fit
    assert chunk_for_memory(per_task_bytes=100, free_bytes=1000, tasks=32) == 8  # 80% of 1000 B: 8 tasks
    assert chunk_for_memory(per_task_bytes=5000, free_bytes=1000, tasks=32) == 1  # never less than one task


def test_task_chunk_is_validated():
    with pytest.raises(MetarunError, match=r"train\.task_chunk"):
        train(compose_config(TINY_SINUSOID + ["train.task_chunk=0"]), None)


# -- decisions ------------------------------------------------------------------------------------
REAL_RACE = ex.race


class FakeClock:
    """Time that only the paths' stated costs advance, per run of a path in the race (a path without a
    stated cost takes 1 s): real timings on a loaded machine decide nothing in a test. The paths run for real."""

    def __init__(self, costs):
        self.now, self.costs = 0.0, costs
        self.runs = dict.fromkeys(ex.PATHS, 0)

    def __call__(self):
        return self.now

    def race(self, run, device, paths=("loop", "vmap"), **kwargs):
        def timed(path):
            self.runs[path] += 1
            run(path)
            self.now += self.costs.get(path, 1.0)

        return REAL_RACE(timed, device, paths, **kwargs)


def no_runs(**runs):
    return {**dict.fromkeys(ex.PATHS, 0), **runs}


@pytest.fixture
def tuned(monkeypatch):
    """``tuned(costs, cache=None, batching="auto")``: MAML, a FakeClock racing with ``costs``, and an Execution."""
    def make(costs, cache=None, batching="auto"):
        algo = ALGORITHMS["maml"](batching)
        clock = FakeClock(costs)
        monkeypatch.setattr(ex, "race", clock.race)
        return algo, clock, Execution(batching, None, cache, clock=clock)

    return make


def test_a_clear_winner_is_kept_per_shape_and_each_shape_is_timed_once(tuned, caplog):
    algo, clock, execution = tuned({"loop": 0.0, "vmap": 0.05})
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    with caplog.at_level(logging.INFO, logger="metarun"):
        assert execution.path(algo, "train", episode) == "loop"
    runs = dict(clock.runs)
    # a warm-up and two interleaved timed rounds each; threads (1 s) was dropped after its first timed round
    assert runs == no_runs(loop=3, vmap=3, threads=2 * THREADED)
    assert execution.path(algo, "train", episode) == "loop" and clock.runs == runs  # the same shape: cached
    clock.costs = {"loop": 0.05, "vmap": 0.0}
    assert execution.path(algo, "train", episode.tasks(0, 2)) == "vmap"  # a new shape (2 tasks) is timed
    assert execution.path(algo, "train", episode, iteration=0) == "loop"
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("execution (train")][0]
    assert "loop (loop faster by 100%" in line and "tasks=5" in line and "tuning took" in line


def test_a_clear_winner_found_when_the_budget_runs_out_is_kept(tuned):
    # A meta-gradient slow enough that the warm-up and one timed round spend the budget: the loop's 3 s
    # against vmap's 0.1 s is still a clear win (it once fell back to the default, the 18x slower loop).
    algo, clock, execution = tuned({"loop": 3.0, "vmap": 0.1})
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    assert execution.path(algo, "train", episode) == "vmap"
    assert clock.runs == no_runs(loop=2, vmap=2, threads=2 * THREADED)  # a warm-up and one timed round each


def test_a_shape_whose_warm_up_spends_the_budget_is_decided_on_its_warm_up():
    # ProtoNets 20-way 5-shot once took 78 s to tune: a path call slower than the budget is made once, not again.
    clock, runs = [0.0], {}
    costs = {"loop": 4.0, "vmap": 1.0, "threads": 3.0}

    def run(path):
        runs[path] = runs.get(path, 0) + 1
        clock[0] += costs[path]

    path, best, why = ex.race(run, torch.device("cpu"), tuple(costs), clock=lambda: clock[0], budget_s=5.0)
    assert path == "vmap" and runs == dict.fromkeys(costs, 1) and best == costs and "faster by 67%" in why


def test_a_run_logs_and_records_what_tuning_cost(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ex.CACHE_ENV, str(tmp_path / "fresh.json"))  # nothing decided before: this run tunes
    with caplog.at_level(logging.INFO, logger="metarun"):
        train(compose_config(TINY_SINUSOID + ["train.iterations=2", "train.val_every=2"]), tmp_path / "run")
    recorded = read_metrics(tmp_path / "run")["batching"]["tuning_seconds"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("execution: tuning took"))
    assert recorded > 0 and f"{recorded:.1f} s in this run" in line and "% of its" in line


def test_without_a_clear_margin_the_default_runs(tuned):
    # 5% apart: under the 10% margin, so all rounds are timed and the loop (the default) runs.
    algo, clock, execution = tuned({"loop": 0.105, "vmap": 0.100})
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    assert execution.path(algo, "train", episode) == ex.DEFAULT == "loop"
    assert clock.runs == no_runs(loop=ex.MAX_REPEATS + 1, vmap=ex.MAX_REPEATS + 1, threads=2 * THREADED)
    assert "default" in next(iter(execution.decisions.values()))["why"]


def test_tuning_changes_no_number(tuned):
    algo, clock, execution = tuned({"loop": 0.0, "vmap": 0.05})
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    state = {k: v.clone() for k, v in algo.state_dict().items()}
    rng = torch.get_rng_state()
    execution.path(algo, "train", episode)
    execution.path(algo, "eval", episode, steps=2)
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in algo.parameters())
    assert all(torch.equal(v, state[k]) for k, v in algo.state_dict().items()) and algo.tuned_batching is None


def test_evaluation_is_decided_on_its_own_shape(tuned):
    algo, clock, execution = tuned({"loop": 0.05, "vmap": 0.0})
    train_episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    assert execution.path(algo, "train", train_episode) == "vmap"
    clock.costs = {"loop": 0.0, "vmap": 0.05}
    test_episode = random_image_episode(2, WAYS, SHOTS, 4)
    result = execution.evaluate(algo, test_episode, steps=2)
    assert result.shape == (2, 3)
    assert sorted(k.split("|")[0] for k in execution.decisions) == ["eval", "train"]
    assert [d["path"] for k, d in sorted(execution.decisions.items())] == ["loop", "vmap"]


def test_the_disk_cache_spares_a_second_run_its_tuning(tuned, tmp_path):
    cache = tmp_path / "execution.json"
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    algo, clock, first = tuned({"loop": 0.05, "vmap": 0.0}, cache)
    assert first.path(algo, "train", episode) == "vmap"
    assert json.loads(cache.read_text())  # written, and no temporary file left behind
    assert [p.name for p in tmp_path.iterdir()] == ["execution.json"]
    algo, clock, second = tuned({"loop": 0.0, "vmap": 0.05}, cache)  # timings that would now choose the loop
    assert second.path(algo, "train", episode) == "vmap" and clock.runs == no_runs()
    assert "cached" in next(iter(second.decisions.values()))["why"]


def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(tuned, tmp_path, caplog):
    cache = tmp_path / "execution.json"
    cache.write_text("{not json")
    algo, clock, execution = tuned({"loop": 0.05, "vmap": 0.0}, cache)
    with caplog.at_level(logging.WARNING, logger="metarun"):
        assert execution.path(algo, "train", random_image_episode(TASKS, WAYS, SHOTS, QUERIES)) == "vmap"
    assert any("ignoring the execution cache" in r.getMessage() for r in caplog.records)
    assert clock.runs["vmap"] > 0 and len(json.loads(cache.read_text())) == 1


def test_a_pinned_path_is_never_timed(tuned, tmp_path):
    algo, clock, execution = tuned({"loop": 0.0, "vmap": 0.05}, tmp_path / "execution.json", batching="vmap")
    assert execution.path(algo, "train", random_image_episode(TASKS, WAYS, SHOTS, QUERIES)) == "vmap"
    assert clock.runs == no_runs() and not (tmp_path / "execution.json").exists()


def test_decisions_round_trip_through_a_checkpoint_state(tuned):
    algo, clock, execution = tuned({"loop": 0.05, "vmap": 0.0})
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    execution.path(algo, "train", episode)
    execution.path(algo, "eval", episode, steps=1)
    restored = Execution("auto", None, None)
    restored.load_state_dict(execution.state_dict())
    assert {k: v["path"] for k, v in restored.decisions.items()} == {k: v["path"] for k, v in execution.decisions.items()}
    clock.runs = no_runs()
    assert restored.path(algo, "train", episode) == "vmap" and clock.runs == no_runs()
    junk = Execution("auto", None, None)
    junk.load_state_dict({"decisions": {"k": {"path": "fast"}, 3: "x"}})  # untrusted: malformed entries dropped
    assert junk.decisions == {}


def test_a_run_resumes_with_the_decisions_of_its_checkpoint(tmp_path, monkeypatch):
    base = TINY_SINUSOID + ["train.iterations=3", "train.val_every=3"]
    train(compose_config(base), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    decisions = state["execution"]["decisions"]
    assert {k.split("|")[0] for k in decisions} == {"train", "eval"}  # validation's shape decided on its own
    assert read_metrics(tmp_path)["batching"]["decisions"].items() >= {k: v["path"] for k, v in decisions.items()}.items()
    ex_cache = tmp_path / "no-cache.json"
    monkeypatch.setenv(ex.CACHE_ENV, str(ex_cache))  # a fresh cache: only the checkpoint can spare the tuning
    train(compose_config(TINY_SINUSOID), tmp_path)  # resumed: no shape it met is timed again
    resumed = read_metrics(tmp_path)["batching"]["decisions"]
    assert all(resumed[k] == v["path"] for k, v in decisions.items())
    assert not ex_cache.exists() or not any(
        k in decisions for m in json.loads(ex_cache.read_text()).values() for k in m)


@pytest.mark.parametrize("path", ["loop", "vmap", "threads"])
def test_a_pinned_run_equals_an_auto_run_that_chose_its_path(tmp_path, monkeypatch, path):
    base = TINY_SINUSOID + ["train.task_chunk=3"]  # chunks of 3 and 1 tasks: the same numbers as whole batches
    with monkeypatch.context() as m:  # the race's outcome, fixed: real timings decide nothing in a test
        m.setattr(ex, "race", lambda run, device, paths, **kw: (path, dict.fromkeys(paths, 1.0), "fixed by the test"))
        train(compose_config(base), tmp_path / "auto")
    train(compose_config(base + [f"algo.batching={path}"]), tmp_path / "pinned")
    auto, pinned = read_metrics(tmp_path / "auto"), read_metrics(tmp_path / "pinned")
    assert set(auto["batching"]["decisions"].values()) == {path} and len(auto["batching"]["decisions"]) == 3
    for m in (auto, pinned):
        for k in ("batching", "training_seconds", "wall_clock_seconds"):
            m.pop(k)
    assert auto == pinned


def test_metarun_eval_takes_the_paths_the_run_decided(tmp_path, monkeypatch):
    from metarun.evaluate import evaluate
    train(compose_config(TINY_SINUSOID + ["test.episodes=8"]), tmp_path / "run")  # val and test: batches of 4
    monkeypatch.setenv(ex.CACHE_ENV, str(tmp_path / "fresh.json"))  # only the checkpoint knows the decisions
    monkeypatch.setattr(ex, "race", lambda *a, **k: pytest.fail("eval timed a shape its checkpoint decided"))
    (tmp_path / "eval").mkdir()
    evaluate(compose_config([f"ckpt={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "batch_size=4"], name="eval"),
             tmp_path / "eval")
    assert read_metrics(tmp_path / "eval")["test"] == {**read_metrics(tmp_path / "run")["test"],
                                                        "checkpoint": read_metrics(tmp_path / "eval")["test"]["checkpoint"]}


@pytest.mark.parametrize("peak, chunk", [(100, None), (300, 2)])
def test_the_cuda_chunk_comes_from_one_tasks_peak_and_the_free_memory(peak, chunk):
    # torch.cuda's allocator statistics, stood in for on the CPU: 1000 bytes free, 80% usable.
    class Memory:
        synchronize = reset_peak_memory_stats = staticmethod(lambda device: None)
        memory_allocated = staticmethod(lambda device: 50)
        max_memory_allocated = staticmethod(lambda device: 50 + peak)
        mem_get_info = staticmethod(lambda device: (1000, 4000))

    algo = ALGORITHMS["maml"]("loop")
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    rng = torch.get_rng_state()
    assert ex.measure_chunk(algo, episode, 0, memory=Memory) == chunk  # 5 tasks x peak against 800 bytes
    assert all(p.grad is None for p in algo.parameters()) and torch.equal(torch.get_rng_state(), rng)
    assert Execution("auto", None, None).chunk(algo, episode, 0) is None  # on the CPU: whole meta-batches
    assert Execution("auto", 2, None).chunk(algo, episode, 0) == 2
