"""SNAIL on the shared runner, end to end with real composed configs: what a run writes (checkpoints,
TensorBoard, metrics.json with mean and 95% CI over the test tasks, the protocol's not_applicable keys),
exact resume after an interruption, ``metarun eval`` on its checkpoint, and the one-line errors for the
settings it cannot take. Image runs use generated miniImageNet files (no download) and the real Omniglot
archives where METARUN_DATA_DIR has them."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metarun.cli import describe
from metarun.errors import MetarunError
from metarun.evaluate import evaluate
from metarun.experiment import build_experiment, check_algorithm_fits
from metarun.train import train
from metarun.utils.checkpoint import load_checkpoint, load_state
from support import compose_config, hold_one_iteration, omniglot_location, read_metrics

INNER_LOOP_KEYS = ["algo.inner_lr", "algo.inner_steps", "algo.eval_inner_steps", "algo.first_order"]
TINY_SNAIL = ["algo=snail", "algo.attention_keys=[4,4]", "algo.attention_values=[4,4]", "algo.tc_filters=[4]",
              "train.meta_batch_size=2", "train.iterations=4", "train.val_every=2", "train.val_episodes=4",
              "test.episodes=6", "device=cpu"]
SINUSOID = TINY_SNAIL + ["data=sinusoid", "model=mlp_embedding", "model.hidden=[8,8]"]
IMAGES = TINY_SNAIL + ["model=conv4_embedding", "model.hidden=8", "data.ways=3", "data.shots=1", "data.queries=2"]
KINDS = ["sinusoid", "miniimagenet", "omniglot"]


def metarun(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "metarun", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("metarun: error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr and all(w in lines[0] for w in words), lines[0]


def kind_overrides(request, kind: str) -> list[str]:
    """The tiny SNAIL settings of ``kind``; Omniglot skips without the real archives (METARUN_DATA_DIR)."""
    if kind == "sinusoid":
        return SINUSOID
    if kind == "miniimagenet":  # written once per test session (conftest.generated_image_data)
        return IMAGES + ["data=miniimagenet", f"data.root={request.getfixturevalue('generated_image_data').root}"]
    root, cache = request.getfixturevalue("shared_data_root"), request.getfixturevalue("omniglot_cache_dir")
    return IMAGES + omniglot_location(root, cache)


def data_location(overrides: list[str]) -> list[str]:
    """The data keys ``metarun eval`` takes (where the files are), as the run had them."""
    return [o for o in overrides if o.startswith(("data.root=", "data.cache_dir=", "data.download="))]


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("training_seconds", "wall_clock_seconds")}


@pytest.fixture(scope="module", params=KINDS)
def snail_run(request, tmp_path_factory):
    """One tiny SNAIL run of each kind, in process, shared by the tests that read what it wrote."""
    overrides = kind_overrides(request, request.param)
    run_dir = tmp_path_factory.mktemp(f"snail_{request.param}")
    train(compose_config(overrides), run_dir)
    return request.param, overrides, run_dir


def test_run_writes_checkpoints_tensorboard_and_metrics_with_the_protocol(snail_run):
    kind, overrides, run_dir = snail_run
    metric = "mse" if kind == "sinusoid" else "accuracy"
    metrics = read_metrics(run_dir)
    test = metrics["test"]
    assert metrics["metric"] == metric and metrics["iterations"] == 4
    assert test["episodes"] == 6 and test["inner_steps"] == 0 and len(test["per_step"]) == 1
    assert [h["iteration"] for h in metrics["val"]["history"]] == [2, 4]
    # The protocol says SNAIL has no inner loop: none of the gradient engine's keys applies.
    protocol = metrics["protocol"]
    assert protocol["not_applicable"] == INNER_LOOP_KEYS and protocol["eval_inner_steps"] == 0
    assert protocol["test_episodes"] == 6
    if kind != "sinusoid":  # Conv4's batch norm: each query normalised with the support set alone
        assert "non-transductive" in protocol["batch_norm"]

    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run_dir / "checkpoints" / name)
        assert state["config"]["algo"]["_target_"] == "metarun.algos.snail.SNAIL"
        assert any(k.startswith("net.") for k in state["algo"]), "SNAIL's own layers are in the checkpoint"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == 4

    # Mean and 95% CI over the configured test tasks, recomputed here from the best checkpoint, task by task.
    cfg = compose_config(overrides)
    _, data, algo = build_experiment(cfg)
    load_state(algo, load_checkpoint(run_dir / "checkpoints" / "best.pt")["algo"], run_dir, "algorithm")
    with torch.no_grad():
        per_task = torch.cat([algo.evaluate(episode, 0)[:, 0]
                              for episode in data.fixed_episodes("test", 6, cfg.train.meta_batch_size, cfg.test.eval_seed)])
    assert per_task.shape == (6,)
    assert test[metric] == pytest.approx(per_task.double().mean().item(), rel=1e-4, abs=1e-6)
    assert test["ci95"] == pytest.approx(1.96 * per_task.double().std().item() / math.sqrt(6), rel=1e-3, abs=1e-6)

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    assert {"train/loss", f"train/{metric}", f"val/{metric}", f"test/{metric}", f"test/{metric}_ci95"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars(f"val/{metric}")] == [2, 4]
    assert events.Scalars(f"test/{metric}")[0].value == pytest.approx(test[metric], rel=1e-6, abs=1e-6)
    start = EventAccumulator(str(run_dir / "tb")).Reload().PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"protocol.not_applicable" in start and b"algo.inner_steps" in start and b"algo.attention_keys" in start


def test_eval_reproduces_the_runs_test_numbers(snail_run, tmp_path):
    kind, overrides, run_dir = snail_run
    metric = "mse" if kind == "sinusoid" else "accuracy"
    cfg = compose_config([f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", "batch_size=4", "device=cpu",
                          *data_location(overrides)], name="eval")
    evaluate(cfg, tmp_path)
    got, want = read_metrics(tmp_path), read_metrics(run_dir)
    assert got["test"][metric] == pytest.approx(want["test"][metric], abs=1e-6)
    assert got["test"]["ci95"] == pytest.approx(want["test"]["ci95"], abs=1e-6) and got["test"]["episodes"] == 6
    assert got["protocol"] == want["protocol"]


@pytest.mark.slow
@pytest.mark.parametrize("snail_run", ["sinusoid"], indirect=True)  # the refusal reads only the algorithm's config
def test_eval_refuses_inner_loop_settings_for_a_snail_checkpoint(snail_run, tmp_path):
    kind, overrides, run_dir = snail_run
    result = metarun("eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", "algo.eval_inner_steps=3",
                     f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert_one_line_error(result, "algo.eval_inner_steps does not apply", "no inner loop", "leave it out")


@pytest.mark.parametrize("kind", ["miniimagenet", "omniglot"])
def test_continued_image_run_ends_with_the_numbers_and_weights_of_an_uninterrupted_one(request, tmp_path, kind):
    base = kind_overrides(request, kind) + ["algo.batching=loop", "train.iterations=6", "train.val_every=2"]
    train(compose_config(base), tmp_path / "whole")
    train(compose_config(base[:-2] + ["train.iterations=2", "train.val_every=2"]), tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["iteration"] == 2
    train(compose_config(base), tmp_path / "resumed")
    assert without_timing(read_metrics(tmp_path / "resumed")) == without_timing(read_metrics(tmp_path / "whole"))
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["algo"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["algo"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# The real CLI, SNAIL's meta-loss held at one iteration until the test's SIGINT has arrived (as test_cli does
# for MAML): the stop lands between checkpoints, however fast or loaded the machine is.
HOLD_ONE_ITERATION = hold_one_iteration("metarun.algos.snail", "SNAIL")


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_numbers_and_weights_of_an_uninterrupted_one(tmp_path):
    # The step schedule decays the learning rate every iteration: the resumed run must restore it too.
    settings = SINUSOID + ["algo.batching=loop", "train.iterations=10", "train.val_every=4", "scheduler=step",
                           "scheduler.step_size=1"]
    whole = metarun("train", *settings, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir, cue = tmp_path / "stopped", tmp_path / "held"
    process = subprocess.Popen([sys.executable, "-c", HOLD_ONE_ITERATION, str(cue), "7", "train", *settings,
                                f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not cue.exists():  # iteration 7 is held, after the checkpoint of iteration 4
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 130 and "interrupted" in stderr, stderr
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == 6  # the last completed iteration
    resumed = metarun("train", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # the run directory alone resumes it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(tmp_path / "whole"))
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["algo"]
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")["algo"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- settings SNAIL cannot take: one line naming the key and the fix --------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["algo=snail", "algo.inner_steps=5"], ["algo.inner_steps does not apply to algo=snail", "no inner loop"]),
    (["algo=snail", "algo.inner_lr=0.1"], ["algo.inner_lr does not apply to algo=snail", "no inner loop"]),
    (["algo=snail", "algo.first_order=true"], ["algo.first_order does not apply to algo=snail"]),
    (["algo=snail", "algo.eval_inner_steps=3"], ["algo.eval_inner_steps does not apply to algo=snail"]),
    (["experiment=snail_omniglot_5w1s", "algo.inner_steps=2"], ["algo.inner_steps does not apply to algo=snail"]),
    (["algo=protonet", "algo.inner_steps=5"], ["algo.inner_steps does not apply to algo=protonet", "no inner loop"]),
    (["algo=matchingnet", "algo.eval_inner_steps=5"], ["does not apply to algo=matchingnet", "no inner loop"]),
    # An inner-loop algorithm that replaces an engine key with its own says so, not "no inner loop".
    (["algo=reptile", "algo.first_order=true"], ["algo.first_order does not apply to algo=reptile", "its own keys"]),
    (["algo=metasgd", "algo.inner_lr=0.1"], ["algo.inner_lr does not apply to algo=metasgd", "its own keys"]),
    (["algo=snail", "algo.inner_stepz=5"], ["unknown key 'algo.inner_stepz': check its spelling"]),
    (["algo=maml", "algo.inner_stepz=5"], ["unknown key 'algo.inner_stepz': check its spelling"]),
])
def test_keys_the_algorithm_lacks_are_named_in_one_line(overrides, words):
    with pytest.raises(Exception) as error:
        compose_config(overrides)
    line = describe(error.value, "train")
    assert "\n" not in line and all(w in line for w in words), line


@pytest.mark.parametrize("overrides, words", [
    # Appended keys reach the constructor otherwise (+algo.inner_lr=...): refused in the same words first.
    (["algo=snail", "model=conv4_embedding", "+algo.inner_lr=0.1"], ["algo.inner_lr does not apply to algo=snail"]),
    # The network is sized for the test tasks' sequences: training tasks of other ways or shots are refused.
    (["experiment=snail_omniglot_5w1s", "data.train_ways=20"], ["data.train_ways=20", "data.ways=5", "leave out"]),
    (["experiment=snail_omniglot_5w1s", "data.train_shots=5"], ["data.train_shots=5", "data.shots=1", "leave out"]),
    # The headless network that fits the data, whatever model was chosen.
    (["algo=snail", "data=sinusoid"], ["use model=mlp_embedding"]),
    (["algo=snail", "data=sinusoid", "model=mlp"], ["use model=mlp_embedding"]),
    (["algo=snail", "model=mlp"], ["use model=conv4_embedding"]),
    (["algo=snail", "model=resnet12"], ["use model=resnet12_embedding"]),
    (["algo=protonet", "data=miniimagenet", "model=conv4"], ["use model=conv4_embedding"]),
])
def test_settings_snail_cannot_take_are_refused_before_anything_is_built(overrides, words):
    with pytest.raises(MetarunError) as error:
        check_algorithm_fits(compose_config(overrides))
    assert "\n" not in str(error.value) and all(w in str(error.value) for w in words), str(error.value)


def test_training_tasks_of_the_test_shape_are_accepted():
    check_algorithm_fits(compose_config(["experiment=snail_omniglot_5w1s", "data.train_ways=5", "data.train_shots=1"]))
    check_algorithm_fits(compose_config(["algo=protonet", "model=conv4_embedding", "data.train_ways=20"]))


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["algo=snail", "algo.inner_steps=5"], ["algo.inner_steps does not apply to algo=snail", "no inner loop"]),
    (["algo=snail", "data=sinusoid"], ["use model=mlp_embedding"]),
    (["experiment=snail_omniglot_5w1s", "data.train_shots=5"], ["data.train_shots=5", "leave out"]),
])
def test_the_command_line_prints_them_as_one_line_with_exit_status_2(tmp_path, args, words):
    result = metarun("train", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(result, *words)


def test_a_network_too_large_for_memory_is_one_line_not_a_kill(tmp_path):
    # 2e10 parameters (attention keys of 1e9): building it used to end in the kernel's out-of-memory SIGKILL
    # with no message; the size is counted on the meta device first and refused before anything is allocated.
    result = metarun("train", *SINUSOID, "algo.attention_keys=[1000000000,4]", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path, timeout=120)
    assert_one_line_error(result, "parameters", "more than the", "make it smaller")


def test_the_memory_check_counts_the_network_against_the_devices_memory(monkeypatch):
    from metarun import experiment

    cfg = compose_config(SINUSOID)
    params = sum(p.numel() for p in build_experiment(cfg)[2].parameters())
    monkeypatch.setattr(experiment, "device_memory", lambda device: experiment.TRAINING_COPIES * 4 * params - 1)
    with pytest.raises(MetarunError, match=f"the network has {params:,} parameters"):
        build_experiment(cfg)
    monkeypatch.setattr(experiment, "device_memory", lambda device: experiment.TRAINING_COPIES * 4 * params)
    build_experiment(cfg)  # exactly what it needs (float32 weights, gradients, two moments) fits
