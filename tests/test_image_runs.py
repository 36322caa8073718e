"""Runs on the image benchmarks, end to end on generated data: train through the real CLI on miniImageNet from
its memory-mapped store, evaluate its checkpoint with the store on the device (same episodes, same accuracy),
and train on CIFAR-FS with the papers' training augmentation."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch

from cifar_cub_fixtures import write_cifar100_archive
from image_fixtures import write_mini_pickles
from metarun.data import cifar
from metarun.data.download import file_md5
from metarun.data.store import ImageStore, size_text
from metarun.data.transforms import Augment
from metarun.train import train
from support import compose_config, read_metrics

TINY_MINI = ["data=miniimagenet", "model.hidden=8", "train.iterations=4", "train.val_every=2", "train.val_episodes=2",
             "test.episodes=4", "train.meta_batch_size=2", "data.ways=3", "data.shots=1", "data.queries=2",
             "algo.batching=loop", "algo.inner_steps=1", "algo.eval_inner_steps=2", "device=cpu"]


def metarun(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "metarun", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """A tiny miniImageNet MAML run through the CLI, its store read from disk per batch (data.residency=memmap)."""
    tmp = tmp_path_factory.mktemp("mini")
    root, run_dir = tmp / "data", tmp / "run"
    write_mini_pickles(root, per_class=6)
    result = metarun("train", *TINY_MINI, f"data.root={root}", "data.residency=memmap", f"hydra.run.dir={run_dir}",
                     cwd=tmp)
    return root, run_dir, result


def test_train_on_miniimagenet_from_the_memmap_store(mini_run):
    root, run_dir, result = mini_run
    assert result.returncode == 0, result.stderr[-3000:]
    [folder] = [p for p in (root / "miniimagenet").glob("miniimagenet-*") if p.is_dir()]
    size = size_text(ImageStore.open(folder).nbytes)
    # The start of the run names where the store lives and how big it is, on screen and in train.log.
    line = f"store: memmap, {size} store read from disk per batch (data.residency=memmap)"
    assert line in (run_dir / "train.log").read_text()
    assert "data.residency=memmap" in result.stdout + result.stderr
    metrics = read_metrics(run_dir)
    assert metrics["test"]["episodes"] == 4 and 0 <= metrics["test"]["accuracy"] <= 1
    assert metrics["protocol"]["split"] == "ravi" and metrics["protocol"]["ways"] == 3
    assert (run_dir / "checkpoints" / "best.pt").is_file()


def test_eval_with_the_store_on_the_device_gives_the_runs_accuracy(mini_run, tmp_path):
    root, run_dir, result = mini_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "eval"
    evaluation = metarun("eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", f"data.root={root}",
                         "data.residency=device", "device=cpu", f"hydra.run.dir={out}", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "(data.residency=device)" in (out / "eval.log").read_text()
    ours, theirs = read_metrics(out), read_metrics(run_dir)
    assert ours["config"]["data"]["residency"] == "device"
    # Same checkpoint, same test protocol and seed: the device store gives the episodes the memmap one gave.
    assert ours["protocol"] == theirs["protocol"]
    assert ours["test"]["accuracy"] == theirs["test"]["accuracy"]
    assert ours["test"]["per_step"] == theirs["test"]["per_step"]


def test_eval_residency_is_checked_and_refused_where_there_is_no_store(mini_run, tmp_path):
    from metarun.errors import MetarunError
    from metarun.evaluate import run_config

    root, run_dir, _ = mini_run
    bad = metarun("eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", f"data.root={root}", "data.residency=gpu",
                  f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and "data.residency=gpu is not allowed" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    # sinusoid data has no image store: asking for a residency is a one-line error, not silently ignored
    cfg = compose_config(["ckpt=x", "data.residency=memmap"], name="eval")
    with pytest.raises(MetarunError, match="data.residency does not apply to SinusoidTasks"):
        run_config(cfg, compose_config(["data=sinusoid", "model=mlp"]))


def test_cifarfs_run_augments_its_training_tasks_only(tmp_path, monkeypatch, caplog):
    path = write_cifar100_archive(cifar.CIFAR100_ARCHIVE.path(tmp_path / "data"))
    monkeypatch.setattr(cifar, "CIFAR100_ARCHIVE", dataclasses.replace(cifar.CIFAR100_ARCHIVE, md5=file_md5(path)))
    calls = []
    apply = Augment.apply

    def recording(self, x, params):
        out = apply(self, x, params)
        calls.append((self.names, x.shape, bool((out != x).any())))
        return out

    monkeypatch.setattr(Augment, "apply", recording)
    cfg = compose_config(["data=cifarfs", f"data.root={tmp_path / 'data'}", "data.download=false",
                          "data.augment=[flip,pad_crop]", "data.ways=3", "data.shots=1", "data.queries=1",
                          "model.hidden=8", "train.iterations=3", "train.val_every=3", "train.val_episodes=2",
                          "test.episodes=2", "train.meta_batch_size=2", "algo.batching=loop", "algo.inner_steps=1",
                          "algo.eval_inner_steps=1", "device=cpu"])
    with caplog.at_level(logging.INFO, logger="metarun"):
        train(cfg, tmp_path / "run")
    assert "augment: pad_crop, flip" in caplog.text
    # One augmented meta-batch per training iteration (3 tasks x 2 images each), none for validation or test.
    assert len(calls) == 3
    assert all(names == ("pad_crop", "flip") and shape[:3] == (2, 3, 2) for names, shape, _ in calls)
    assert all(changed for _, _, changed in calls)  # the images really moved
    assert read_metrics(tmp_path / "run")["test"]["episodes"] == 2
