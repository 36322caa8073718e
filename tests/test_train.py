"""Tier 3, in process: what a run writes, exact resume, failures that keep the last good state."""

import json
import math
import subprocess
import sys
import types

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metarun import execution, task_threads
from metarun.algos import base
from metarun.algos.base import MetaAlgorithm
from metarun.data.sinusoid import SinusoidTasks
from metarun.errors import MetarunError
from metarun.evaluate import evaluate
from metarun.experiment import build_experiment
from metarun.train import train
from metarun.utils import checkpoint as checkpoint_module
from metarun.utils.checkpoint import load_checkpoint, save_checkpoint
from support import TINY_OMNIGLOT, TINY_SINUSOID, compose_config, omniglot_location, read_metrics


@pytest.fixture
def omniglot_overrides(shared_data_root, omniglot_cache_dir):
    return TINY_OMNIGLOT + omniglot_location(shared_data_root, omniglot_cache_dir)


def run(run_dir, overrides):
    return train(compose_config(overrides), run_dir)


def without_timing(metrics):
    return {k: v for k, v in metrics.items() if k not in ("training_seconds", "wall_clock_seconds")}


def test_run_writes_metrics_checkpoints_and_tensorboard(tmp_path, omniglot_overrides):
    best_val = run(tmp_path, omniglot_overrides)
    metrics = read_metrics(tmp_path)
    test = metrics["test"]
    assert set(test) >= {"accuracy", "ci95", "episodes", "per_step"} and test["episodes"] == 6
    assert len(test["per_step"]) == 3 and 0 <= test["accuracy"] <= 1 and test["ci95"] >= 0
    assert metrics["iterations"] == 4 and 0 < metrics["training_seconds"] < metrics["wall_clock_seconds"]
    assert metrics["task"] == "classification" and metrics["metric"] == "accuracy"
    assert metrics["val"]["accuracy"] == best_val and [h["iteration"] for h in metrics["val"]["history"]] == [2, 4]
    assert metrics["protocol"]["split"] == "maml" and "transductive" in metrics["protocol"]["batch_norm"]
    assert metrics["protocol"]["test_episodes"] == 6 and metrics["protocol"]["eval_inner_steps"] == 2

    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / "checkpoints" / name)
        assert {"algo", "optimizer", "iteration", "best", "config", "rng", "history"} <= set(state)
        assert state["config"]["data"]["ways"] == 3 and state["metric"] == "accuracy"
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 4

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "val/accuracy", "test/accuracy", "test/accuracy_by_inner_step"} <= tags
    assert [e.step for e in events.Scalars("val/accuracy")] == [2, 4]
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(test["accuracy"], abs=1e-6)
    hparams = EventAccumulator(str(tmp_path / "tb")).Reload().PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams and b"algo.inner_lr" in hparams["_hparams_/session_start_info"]


@pytest.mark.parametrize("kind", ["omniglot", "sinusoid"])
def test_continued_run_ends_with_the_numbers_of_an_uninterrupted_one(tmp_path, omniglot_overrides, kind):
    # Runs killed mid-interval (SIGINT, SIGKILL) are resumed in test_cli; this one continues from a checkpoint.
    # The sinusoid run decays its learning rate every iteration: resuming must restore the schedule too.
    base = omniglot_overrides if kind == "omniglot" else TINY_SINUSOID + ["scheduler=step", "scheduler.step_size=1"]
    # batching=vmap fixed: two runs tuned apart (auto) could take different paths (see the test below).
    base = base + ["algo.batching=vmap", "train.iterations=6", "train.val_every=2"]
    run(tmp_path / "whole", base)
    # The first attempt stops at iteration 2 (its last.pt), the second continues in the same directory.
    run(tmp_path / "resumed", base[:-2] + ["train.iterations=2", "train.val_every=2"])
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["iteration"] == 2
    run(tmp_path / "resumed", base)
    assert without_timing(read_metrics(tmp_path / "resumed")) == without_timing(read_metrics(tmp_path / "whole"))
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["algo"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["algo"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = EventAccumulator(str(tmp_path / "resumed" / "tb")).Reload()
    assert [e.step for e in events.Scalars("val/" + ("accuracy" if kind == "omniglot" else "mse"))] == [2, 4, 6]


def test_resume_refuses_a_changed_experiment(tmp_path):
    run(tmp_path, TINY_SINUSOID)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(MetarunError, match=r"algo.inner_lr=0.01, this run has algo.inner_lr=0.5"):
        run(tmp_path, TINY_SINUSOID + ["algo.inner_lr=0.5"])
    with pytest.raises(MetarunError, match=r"test.eval_seed=0, this run has test.eval_seed=1"):
        run(tmp_path, TINY_SINUSOID + ["test.eval_seed=1"])
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_eval_shares_the_experiment_assembly_without_importing_the_trainer():
    # metarun.train is the loop a reader opens first, not a library: eval builds its experiment from
    # metarun.experiment, and the resume policy lives in metarun.resume.
    probe = "import sys, metarun.evaluate, metarun.resume; print('metarun.train' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "False"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"train": 0}
    original = SinusoidTasks.materialize

    def poisoned(self, split, drawn):
        episode = original(self, split, drawn)
        if split == "train":
            calls["train"] += 1
            if calls["train"] == 6:  # iteration 5, after the checkpoint at 3 (draw 1 is batching=auto's probe)
                episode.query_y[:] = math.nan
        return episode

    monkeypatch.setattr(SinusoidTasks, "materialize", poisoned)
    with pytest.raises(MetarunError, match=r"meta-loss became nan .* at iteration 5: training stopped, .*last.pt keeps"):
        run(tmp_path, TINY_SINUSOID)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 3 and all(torch.isfinite(v).all() for v in state["algo"].values())
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("kind", ["omniglot", "sinusoid"])
def test_eval_reproduces_the_test_numbers_of_the_run(tmp_path, omniglot_overrides, shared_data_root, omniglot_cache_dir, kind):
    run(tmp_path / "run", omniglot_overrides if kind == "omniglot" else TINY_SINUSOID + ["test.episodes=6"])
    # No test settings on the command line: the run's own (6 episodes, its evaluation seed) apply.
    cfg = compose_config([f"ckpt={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "batch_size=4",
                          f"data.root={shared_data_root}", f"data.cache_dir={omniglot_cache_dir}", "data.download=false"],
                         name="eval")
    (tmp_path / "eval").mkdir()
    evaluate(cfg, tmp_path / "eval")
    got, want = read_metrics(tmp_path / "eval")["test"], read_metrics(tmp_path / "run")["test"]
    metric = "accuracy" if kind == "omniglot" else "mse"
    assert got[metric] == pytest.approx(want[metric], abs=1e-6)
    assert got["per_step"] == pytest.approx(want["per_step"], abs=1e-6) and got["episodes"] == 6
    assert read_metrics(tmp_path / "eval")["protocol"] == read_metrics(tmp_path / "run")["protocol"]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    cfg = compose_config([f"ckpt={path}"], name="eval")
    with pytest.raises(MetarunError) as error:
        evaluate(cfg, tmp_path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_corrupt_last_checkpoint_is_reported_not_overwritten(tmp_path):
    run(tmp_path, TINY_SINUSOID)
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(MetarunError, match="is unreadable"):
        run(tmp_path, TINY_SINUSOID)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == b"garbage"


def test_a_save_that_dies_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iteration": 1})

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # killed during the write

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert load_checkpoint(path, needs={})["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_loop_and_vmap_paths_agree_on_real_episodes(omniglot_overrides):
    # Exact equality is proven in float64 (test_maml_gradients); this checks the real config in float32.
    _, data, algo = build_experiment(compose_config(omniglot_overrides + ["model.hidden=16"]))
    episode = data.sample("train", 4, torch.Generator().manual_seed(0))
    grads = {}
    for batching in ("loop", "vmap"):
        algo.batching = batching
        loss, _ = algo.meta_loss(episode)
        grads[batching] = torch.autograd.grad(loss, list(algo.parameters()))
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}
    assert (flat["loop"] - flat["vmap"]).norm() / flat["loop"].norm() < 1e-5
    evaluation = {}
    for batching in ("loop", "vmap"):
        algo.batching = batching
        evaluation[batching] = algo.evaluate(episode, steps=3)
    torch.testing.assert_close(evaluation["loop"], evaluation["vmap"])


def test_untuned_auto_is_vmap_on_cuda_and_the_loop_on_cpu(omniglot_overrides):
    device, _, algo = build_experiment(compose_config(omniglot_overrides))
    assert algo.path(device) == ("vmap" if device.type == "cuda" else "loop")


@pytest.mark.parametrize("slow", ["loop", "vmap"])
def test_tuning_keeps_the_faster_path_and_changes_nothing(omniglot_overrides, monkeypatch, slow):
    _, data, algo = build_experiment(compose_config(omniglot_overrides))
    episode = data.sample("train", 2, torch.Generator().manual_seed(0))
    real = type(algo).meta_loss
    # A clock that only the slow path advances: real timings of two paths differ by more than any margin
    # on a loaded machine, so the test decides which path is slow instead of measuring it.
    clock = [0.0]
    monkeypatch.setattr(base, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def meta_loss(self, *args):  # the slow path takes an extra 50 ms
        if self.path(episode.support_x.device) == slow:
            clock[0] += 0.05
        return real(self, *args)

    monkeypatch.setattr(type(algo), "meta_loss", meta_loss)
    params = {k: v.clone() for k, v in algo.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = algo.tune_batching(episode)  # (and threads on a CPU with 2+ threads: it runs loops, as slow as the loop)
    assert {"loop", "vmap"} <= set(seconds) and seconds[slow] == pytest.approx(0.05)
    assert algo.tuned_batching == ({"loop", "vmap"} - {slow}).pop()
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in algo.parameters())
    assert all(torch.equal(v, params[k]) for k, v in algo.state_dict().items())
    algo.batching = "loop"
    assert algo.tune_batching(episode) == {} and algo.path(torch.device("cpu")) == "loop"


def test_auto_run_equals_a_run_fixed_to_the_path_it_chose_and_resumes_on_it(tmp_path, monkeypatch):
    # Reptile draws its inner mini-batches from the global RNG: tuning must not consume it. Its training
    # cannot take the threads path, and its evaluation could (a third path, with float32 rounding of its
    # own): offered only loop and vmap, every shape's decision is the path one pinned run can take.
    # (tests/test_execution.py pins each path, threads included, against auto runs that chose it.)
    monkeypatch.setattr(task_threads, "available", lambda *a: False)
    # The race runs (and must leave the random streams alone), but its winner is fixed: under load the
    # train and eval shapes could each win on another path, and a pinned run takes one path for both.
    real_race = execution.race
    monkeypatch.setattr(execution, "race",
                        lambda run, device, paths, **kw: ("loop", *real_race(run, device, paths, **kw)[1:]))
    base = TINY_SINUSOID + ["algo=reptile", "algo.inner_iterations=2", "optimizer=sgd", "train.meta_lr=0.5"]
    run(tmp_path / "auto", base)
    chosen = read_metrics(tmp_path / "auto")["batching"]
    assert chosen["setting"] == "auto" and chosen["path"] in ("loop", "vmap")
    assert load_checkpoint(tmp_path / "auto" / "checkpoints" / "last.pt")["batching"] == chosen["path"]
    run(tmp_path / "fixed", base + [f"algo.batching={chosen['path']}"])
    auto, fixed = without_timing(read_metrics(tmp_path / "auto")), without_timing(read_metrics(tmp_path / "fixed"))
    assert auto.pop("batching")["path"] == fixed.pop("batching")["path"] and auto == fixed

    # A resumed auto run takes the path its checkpoint records, without tuning again.
    run(tmp_path / "resumed", base + ["train.iterations=3", "train.val_every=3"])
    state = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    state["batching"] = other = {"loop": "vmap", "vmap": "loop"}[state["batching"]]
    save_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt", state)
    monkeypatch.setattr(MetaAlgorithm, "tune_batching", lambda *a: pytest.fail("a resumed run tuned again"))
    run(tmp_path / "resumed", base)
    assert read_metrics(tmp_path / "resumed")["batching"]["path"] == other


def test_a_diverged_validation_never_becomes_the_best_checkpoint(tmp_path, monkeypatch):
    # Adaptation with more test steps than trained for can diverge (NaN MSE): the best checkpoint
    # must be chosen among the finite validations, whichever came first.
    import metarun.train as train_module

    real, scripted = train_module.meta_test, iter([float("nan"), 0.5, float("nan"), 0.7])

    def fake(algo, data, split, *args, **kwargs):
        result = real(algo, data, split, *args, **kwargs)
        if split == "val":
            result["mse"] = next(scripted)
        return result

    monkeypatch.setattr(train_module, "meta_test", fake)
    best = run(tmp_path, TINY_SINUSOID + ["train.iterations=8", "train.val_every=2"])
    metrics = read_metrics(tmp_path)
    assert best == 0.5 and metrics["val"]["iteration"] == 4
    # The diverged validations are null in metrics.json, which stays standard JSON.
    assert [h["mse"] for h in metrics["val"]["history"]] == [None, 0.5, None, 0.7]
    json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["iteration"] == 4
