"""Issue 12's classes of fault, in process: a checkpoint is data, a run directory is owned, resume
does what it says, machine faults are one line that keeps the last good state, signals stop
every phase consistently."""

import errno
import sys

import pytest
import torch
from omegaconf import OmegaConf

from metarun.errors import MetarunError
from metarun.evaluate import evaluate, trusted_config
from metarun.experiment import upgraded_override
from metarun.resume import check_resumable, saved_overrides, with_run_overrides
from metarun.train import train
from metarun.utils import checkpoint as checkpoint_module
from metarun.utils import stop
from metarun.utils.checkpoint import load_checkpoint, save_checkpoint
from metarun.utils.command import run_command
from metarun.utils.runtime import build
from metarun.utils.rundir import owned
from support import TINY_SINUSOID, compose_config, read_metrics

TIMING = ("training_seconds", "wall_clock_seconds")


def without_timing(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny sinusoid run (its checkpoints are the raw material of the crafted ones)."""
    run_dir = tmp_path_factory.mktemp("finished")
    run_command(train, compose_config(TINY_SINUSOID + ["algo.batching=loop"]), run_dir, "train")
    return run_dir


def crafted(tmp_path, source, change) -> str:
    """A copy of the checkpoint ``source`` with ``change(state)`` applied, saved as a metarun checkpoint."""
    state = load_checkpoint(source)
    state = {k: v for k, v in state.items() if k not in ("format", "version")}
    change(state)
    path = tmp_path / "crafted.pt"
    save_checkpoint(path, state)
    return str(path)


def evaluate_checkpoint(tmp_path, ckpt):
    out = tmp_path / "eval"
    out.mkdir(exist_ok=True)
    return evaluate(compose_config([f"ckpt={ckpt}", "batch_size=4"], name="eval"), out)


# -- 1. a checkpoint is data, never code ------------------------------------------------------------
@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that leaves a file behind if it is ever imported."""
    witness = tmp_path / "imported"
    (tmp_path / "evilpkg.py").write_text(f"open({str(witness)!r}, 'w').write('pwned')\ndef run(*a, **k): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield witness
    sys.modules.pop("evilpkg", None)


@pytest.mark.parametrize("group", ["data", "model", "algo", "optimizer", "scheduler"])
@pytest.mark.parametrize("target", ["builtins.open", "pathlib.Path.write_text", "shutil.copyfile", "torch.save",
                                    "evilpkg.run", ["evilpkg.run"], {"evil": 1}, None])
def test_eval_never_builds_a_class_a_checkpoint_names(tmp_path, finished_run, evil_module, group, target):
    written = tmp_path / "written-by-the-checkpoint"

    def attack(state):
        state["config"][group] = {"_target_": target, "_args_": [str(written), "w"], "file": str(written),
                                  "src": str(finished_run / "metrics.json"), "dst": str(written),
                                  "obj": "pwned", "f": str(written), "data": "pwned", "self": str(written)}

    with pytest.raises(MetarunError, match="not one of metarun's") as error:
        evaluate_checkpoint(tmp_path, crafted(tmp_path, finished_run / "checkpoints" / "best.pt", attack))
    assert "\n" not in str(error.value)
    assert not written.exists() and not evil_module.exists() and "evilpkg" not in sys.modules


@pytest.mark.parametrize("where", [("data", "amplitude"), ("model", "hidden"), ("algo", "inner_lr")])
def test_a_target_nested_in_an_allowed_group_is_refused(tmp_path, finished_run, evil_module, where):
    group, key = where

    def attack(state):
        state["config"][group][key] = {"_target_": "evilpkg.run"}

    with pytest.raises(MetarunError, match="cannot rebuild"):
        evaluate_checkpoint(tmp_path, crafted(tmp_path, finished_run / "checkpoints" / "best.pt", attack))
    assert not evil_module.exists() and "evilpkg" not in sys.modules


def test_unknown_keys_in_a_checkpoint_config_are_refused(tmp_path, finished_run):
    def attack(state):
        state["config"]["algo"]["_recursive_"] = True
        state["config"]["algo"]["extra"] = 1

    with pytest.raises(MetarunError, match="cannot rebuild"):
        evaluate_checkpoint(tmp_path, crafted(tmp_path, finished_run / "checkpoints" / "best.pt", attack))


def test_build_refuses_any_target_outside_the_config_groups(tmp_path, evil_module):
    from omegaconf import OmegaConf

    for cfg in ({"_target_": "evilpkg.run"}, {"_target_": "metarun.models.MLP", "hidden": {"_target_": "evilpkg.run"}}):
        with pytest.raises(MetarunError, match="not one of metarun's"):
            build(OmegaConf.create(cfg))
    assert not evil_module.exists()


@pytest.mark.parametrize("override", ["hydra.callbacks.x._target_=evilpkg.run", "hydra/launcher=basic",
                                      "+data._target_=evilpkg.run", "data._target_=evilpkg.run", "~seed",
                                      "algo._partial_=true", "data._args_=[1]", "hydra.run.dir=/tmp/elsewhere"])
def test_a_resume_never_applies_a_crafted_override(tmp_path, finished_run, override):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    source = finished_run / "checkpoints" / "last.pt"
    (run_dir / "checkpoints" / "last.pt").write_bytes(
        open(crafted(tmp_path, source, lambda s: s.update(overrides=["data=sinusoid", override])), "rb").read())
    with pytest.raises(MetarunError, match="never applies"):
        saved_overrides(run_dir)
    with pytest.raises(MetarunError, match="never applies"):
        with_run_overrides([f"hydra.run.dir={run_dir}"])


def test_the_hydra_record_of_a_checkpoint_is_never_written_back(tmp_path, finished_run, monkeypatch):
    # Hydra's record is written by the accepted attempt itself; a stored one (here with a key that
    # climbs out of the run directory) is never written anywhere, whether the attempt fails or not.
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "a" / "b" / "run"
    escape = tmp_path / "a" / "x.yaml"

    def attack(state):
        state["hydra"] = {"../../x.yaml": "pwned", "config.yaml": "pwned"}

    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / ".metarun").write_text('{"command": "train"}')
    path = crafted(tmp_path, finished_run / "checkpoints" / "last.pt", attack)
    (run_dir / "checkpoints" / "last.pt").write_bytes(open(path, "rb").read())
    (run_dir / "checkpoints" / "best.pt").write_bytes((finished_run / "checkpoints" / "best.pt").read_bytes())
    with pytest.raises(MetarunError):  # a failed attempt: the settings differ
        run_command(train, compose_config(TINY_SINUSOID + ["algo.inner_lr=0.5"]), run_dir, "train")
    run_command(train, compose_config(TINY_SINUSOID + ["algo.batching=loop"]), run_dir, "train")
    assert not escape.exists() and not (run_dir / ".hydra" / "config.yaml").exists()


@pytest.mark.parametrize("damage, words", [
    (lambda s: s.update(version=99), "format version 99"),
    (lambda s: s.update(version="1"), "format version '1'"),
    (lambda s: s.pop("algo"), "its 'algo' is missing"),
    (lambda s: s.update(config=[1, 2]), "its 'config' is a list"),
    (lambda s: s.update(iteration=True), "its 'iteration' is a bool"),
    (lambda s: s["algo"].update({k: torch.zeros(3, 3) for k in list(s["algo"])[:1]}), "does not fit"),
    (lambda s: s["algo"].pop(next(iter(s["algo"]))), "does not fit"),
    (lambda s: s["algo"].update({"extra.weight": torch.zeros(1)}), "does not fit"),
])
def test_a_damaged_checkpoint_is_one_line(tmp_path, finished_run, damage, words):
    path = crafted(tmp_path, finished_run / "checkpoints" / "best.pt", damage)
    with pytest.raises(MetarunError, match=words) as error:
        evaluate_checkpoint(tmp_path, path)
    assert "\n" not in str(error.value)


def test_a_damaged_checkpoint_is_refused_on_resume_too(tmp_path, finished_run):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    path = crafted(tmp_path, finished_run / "checkpoints" / "last.pt", lambda s: s["rng"].update(tasks=torch.zeros(3)))
    (run_dir / "checkpoints" / "last.pt").write_bytes(open(path, "rb").read())
    with pytest.raises(MetarunError, match="random-number states"):
        train(compose_config(TINY_SINUSOID + ["algo.batching=loop"]), run_dir)
    path = crafted(tmp_path, finished_run / "checkpoints" / "last.pt", lambda s: s.pop("optimizer"))
    (run_dir / "checkpoints" / "last.pt").write_bytes(open(path, "rb").read())
    with pytest.raises(MetarunError, match="'optimizer' is missing"):
        train(compose_config(TINY_SINUSOID + ["algo.batching=loop"]), run_dir)


# -- 2. a run directory is owned -------------------------------------------------------------------
@pytest.mark.parametrize("flatten, final_map", [(True, "flatten"), (False, None)])
def test_a_checkpoint_written_with_model_flatten_still_evaluates_and_resumes(tmp_path, flatten, final_map):
    # model.flatten (bool) became model.final_map: a checkpoint's config and its saved overrides are
    # read in today's names, so older runs evaluate and resume as they did.
    cfg = compose_config(["experiment=reptile_omniglot_5w1s", f"model.final_map={final_map or 'null'}",
                          f"data.root={tmp_path}"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["model"]["final_map"]
    saved["model"]["flatten"] = flatten
    assert trusted_config(saved, tmp_path / "old.pt").model.final_map == final_map
    check_resumable(saved, cfg, tmp_path / "old.pt")  # the same run: no refusal
    with pytest.raises(MetarunError, match="model.final_map"):
        check_resumable(saved, compose_config(["experiment=reptile_omniglot_5w1s", f"data.root={tmp_path}",
                                               f"model.final_map={'mean' if flatten else 'flatten'}"]), tmp_path / "old.pt")
    assert upgraded_override(f"model.flatten={str(flatten).lower()}") == f"model.final_map={final_map or 'null'}"


def test_a_held_run_directory_is_refused_naming_the_holder(tmp_path):
    with owned(tmp_path / "run", "train"):
        with pytest.raises(MetarunError, match=r"is in use by pid \d+ on .* since .*: wait for that run"):
            with owned(tmp_path / "run", "train"):
                pass
    with owned(tmp_path / "run", "train"):  # released at the end of the block
        pass


def test_eval_never_claims_a_training_run_and_nobody_claims_a_foreign_folder(tmp_path, finished_run):
    with pytest.raises(MetarunError, match="metarun train run directory, which metarun eval never writes into"):
        with owned(finished_run, "eval"):
            pass
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    for task in ("train", "eval"):
        with pytest.raises(MetarunError, match="is not empty and is not a metarun run directory"):
            with owned(foreign, task):
                pass
    assert sorted(p.name for p in foreign.iterdir()) == ["chapter1.tex"]


# -- 3. resume does what it says ---------------------------------------------------------------------
def test_a_bare_run_directory_resumes_with_the_runs_own_overrides(tmp_path, finished_run):
    argv = with_run_overrides(["train.iterations=8", f"hydra.run.dir={finished_run}"])
    stored = load_checkpoint(finished_run / "checkpoints" / "last.pt")["overrides"]
    assert stored == []  # in process, without Hydra, there are none; the CLI test resumes a real one
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    path = crafted(tmp_path, finished_run / "checkpoints" / "last.pt",
                   lambda s: s.update(overrides=["data=sinusoid", "model=mlp", "train.iterations=6", "seed=3"]))
    (run_dir / "checkpoints" / "last.pt").write_bytes(open(path, "rb").read())
    assert with_run_overrides(["--cfg", "job", f"hydra.run.dir={run_dir}"]) == [
        "--cfg", "job", "data=sinusoid", "model=mlp", "train.iterations=6", "seed=3", f"hydra.run.dir={run_dir}"]
    # The command line wins for its own keys; a sweep is left alone.
    assert with_run_overrides(["train.iterations=9", f"hydra.run.dir={run_dir}"]) == [
        "train.iterations=9", "data=sinusoid", "model=mlp", "seed=3", f"hydra.run.dir={run_dir}"]
    assert with_run_overrides(["-m", f"hydra.run.dir={run_dir}"]) == ["-m", f"hydra.run.dir={run_dir}"]
    assert argv == ["train.iterations=8", f"hydra.run.dir={finished_run}"]


def test_fewer_iterations_than_a_run_has_are_refused(tmp_path, finished_run):
    metrics = (finished_run / "metrics.json").read_bytes()
    with pytest.raises(MetarunError, match="has already trained 6 iterations, more than train.iterations=2"):
        train(compose_config(TINY_SINUSOID + ["algo.batching=loop", "train.iterations=2"]), finished_run)
    assert (finished_run / "metrics.json").read_bytes() == metrics


def test_a_run_whose_validations_all_diverged_has_no_best_to_test(tmp_path, monkeypatch):
    import metarun.train as train_module

    real = train_module.meta_test

    def diverged(algo, data, split, *args, **kwargs):
        result = real(algo, data, split, *args, **kwargs)
        if split == "val":
            result["mse"] = float("nan")
        return result

    monkeypatch.setattr(train_module, "meta_test", diverged)
    with pytest.raises(MetarunError, match="no validation of this run was finite"):
        train(compose_config(TINY_SINUSOID), tmp_path)
    assert not (tmp_path / "checkpoints" / "best.pt").exists()


# -- 4. machine faults are one line and keep the last good checkpoint ------------------------------------
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full"), (errno.EFBIG, "file size limit"),
                                         (errno.EDQUOT, "quota"), (errno.EROFS, "read-only file system")])
def test_a_save_that_fails_half_way_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, code, words):
    saves, real_save = [], torch.save

    def failing_save(obj, f):
        saves.append(obj["iteration"])
        if saves.count(6) == 1:  # the first save at iteration 6 (after best and last at 3) fails half-way
            f.write(b"half a checkpoint")
            raise OSError(code, "simulated", getattr(f, "name", None))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    run_dir = tmp_path / "run"
    with pytest.raises(MetarunError) as error:
        run_command(train, compose_config(TINY_SINUSOID), run_dir, "train")
    message = str(error.value)
    assert words in message and "checkpoints/last.pt keeps the last good state" in message and "\n" not in message
    monkeypatch.undo()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no torn temp file
    assert f"error: {message}" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 80000000000 bytes."),
                                   MemoryError()])
def test_running_out_of_memory_is_one_line_naming_the_meta_batch(tmp_path, monkeypatch, error):
    from metarun.algos.gradient import GradientBased

    real, calls = GradientBased.meta_loss, []

    def oom(self, episode, iteration=0):
        calls.append(iteration)
        if iteration == 4:
            raise error
        return real(self, episode, iteration)

    monkeypatch.setattr(GradientBased, "meta_loss", oom)
    with pytest.raises(MetarunError, match="out of .*memory.*lower train.meta_batch_size.*last.pt keeps") as caught:
        run_command(train, compose_config(TINY_SINUSOID + ["algo.batching=loop"]), tmp_path / "run", "train")
    assert "\n" not in str(caught.value)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 3


def test_a_bug_is_not_disguised_as_a_user_error(tmp_path, monkeypatch):
    from metarun.algos.gradient import GradientBased

    monkeypatch.setattr(GradientBased, "meta_loss", lambda self, episode, iteration=0: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_command(train, compose_config(TINY_SINUSOID + ["algo.batching=loop"]), tmp_path / "run", "train")


# -- 6. a stop request keeps the state of the last completed iteration ------------------------------------
def stop_then_resume(tmp_path, monkeypatch, settings, owner, name, interrupting, stopped_at, validated):
    """Run ``settings`` whole; run them again with ``owner.name`` replaced by ``interrupting`` (which
    sets the stop flag at some point); check the checkpoint the stop left, then resume it to the end
    and compare with the whole run."""
    train(compose_config(settings), tmp_path / "whole")
    monkeypatch.setattr(owner, name, interrupting)
    try:
        with pytest.raises(stop.StopRequested):
            train(compose_config(settings), tmp_path / "stopped")
    finally:
        stop._requested.clear()
    state = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert state["iteration"] == stopped_at and [h["iteration"] for h in state["history"]] == validated
    monkeypatch.undo()
    train(compose_config(settings), tmp_path / "stopped")
    assert without_timing(read_metrics(tmp_path / "stopped")) == without_timing(read_metrics(tmp_path / "whole"))


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_a_stop_inside_a_meta_batch_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch, batching):
    from metarun.algos.gradient import GradientBased

    real = GradientBased.meta_loss

    def interrupted(self, episode, iteration=0):
        if iteration == 4:  # a signal arrives while iteration 5's tasks run
            stop._requested.set()
            if batching == "vmap":
                stop.check()  # vmap runs the tasks as one unit: the check comes right after it
        return real(self, episode, iteration)

    settings = TINY_SINUSOID + [f"algo.batching={batching}", "scheduler=step", "scheduler.step_size=1"]
    stop_then_resume(tmp_path, monkeypatch, settings, GradientBased, "meta_loss", interrupted, 4, [3])


def test_a_stop_during_validation_validates_on_resume(tmp_path, monkeypatch):
    import metarun.train as train_module

    real, calls = train_module.meta_test, []

    def interrupted(algo, data, split, *args, **kwargs):
        calls.append(split)
        if calls.count("val") == 2:  # the validation at iteration 6
            stop._requested.set()
        return real(algo, data, split, *args, **kwargs)

    settings = TINY_SINUSOID + ["algo.batching=loop"]
    stop_then_resume(tmp_path, monkeypatch, settings, train_module, "meta_test", interrupted, 6, [3])


@pytest.mark.parametrize("blocker", ["log_is_a_folder", "run_dir_is_a_file"])
def test_an_unwritable_run_location_is_one_line(tmp_path, blocker):
    run_dir = tmp_path / "run"
    if blocker == "log_is_a_folder":
        (run_dir / "train.log").mkdir(parents=True)
        (run_dir / ".metarun").write_text('{"command": "train"}')
        words = "it is a folder, not a file"
    else:
        run_dir.write_text("a file where the run directory should be")
        run_dir = run_dir / "sub"
        words = "not a folder"
    with pytest.raises(MetarunError, match=words) as error:
        run_command(train, compose_config(TINY_SINUSOID), run_dir, "train")
    assert "\n" not in str(error.value)


def test_a_run_refused_on_a_directory_both_created_never_removes_the_holders_files(tmp_path):
    # Two runs started at once on a new directory both find it missing (RunDirCallback records it
    # for each); the one refused by the lock must leave the holder's directory alone.
    from metarun.utils import rundir

    run_dir = (tmp_path / "new" / "run").absolute()
    with owned(run_dir, "train"):
        (run_dir / "train.log").write_text("the holder's log")
        rundir._new_folders[run_dir] = tmp_path / "new"
        with pytest.raises(MetarunError, match="is in use by"):
            run_command(train, compose_config(TINY_SINUSOID), run_dir, "train")
        assert (run_dir / "train.log").read_text() == "the holder's log"


@pytest.mark.parametrize("damage", ["garbage", "empty", "folder"])
def test_a_bare_resume_of_a_damaged_checkpoint_says_so_first(tmp_path, damage):
    # Not a default config's unrelated error (a download, say): the damaged checkpoint, in one line.
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    if damage == "folder":
        last.mkdir()
    else:
        last.write_bytes(b"garbage" if damage == "garbage" else b"")
    with pytest.raises(MetarunError, match="unreadable|is a folder, not a file"):
        with_run_overrides([f"hydra.run.dir={tmp_path / 'run'}"])


def test_a_checkpoint_with_non_finite_weights_is_damaged(tmp_path, finished_run):
    def poison(state):
        name = next(k for k, v in state["algo"].items() if v.is_floating_point())
        state["algo"][name] = torch.full_like(state["algo"][name], float("nan"))

    with pytest.raises(MetarunError, match="non-finite"):
        evaluate_checkpoint(tmp_path, crafted(tmp_path, finished_run / "checkpoints" / "best.pt", poison))
    assert not (tmp_path / "eval" / "metrics.json").exists()
