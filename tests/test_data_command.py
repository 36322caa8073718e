"""``metarun data list`` and ``metarun data prepare NAME``: what a user types and sees, on generated datasets.

Subprocess tests run the real command line on miniImageNet/tieredImageNet fixtures in their on-disk formats;
the CIFAR-FS/FC100 ones run in process, because the fixture archive is trusted only by a monkeypatched spec.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from cifar_cub_fixtures import write_cifar100_archive, write_metaoptnet_fc100
from image_fixtures import _images, _png, write_mini_pickles
from metarun import datasets
from metarun.data import cifar
from metarun.data.download import file_md5
from metarun.data.store import ImageStore
from metarun.errors import MetarunError


def metarun(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "metarun", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})


def assert_one_line_error(result, *words):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("metarun: error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def row(listing: str, name: str) -> list[str]:
    """The cells of dataset ``name``'s row in ``metarun data list``'s table."""
    for line in listing.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row for {name} in\n{listing}")


def stores(folder: Path, name: str) -> list[Path]:
    """Store folders a run could open (the temporary ones of a decode start with a dot)."""
    return sorted(p for p in folder.glob(f"{name}-*") if p.is_dir())


@pytest.fixture
def mini_root(tmp_path):
    write_mini_pickles(tmp_path / "data", per_class=6)
    return tmp_path / "data"


# ----------------------------------------------------------------------------------------- list, prepare


def test_list_then_prepare_then_list_through_the_cli(mini_root, tmp_path):
    before = metarun("data", "list", f"data.root={mini_root}", cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    assert row(before.stdout, "miniimagenet")[2:] == ["present", "1.4 MB", "no", "-"]
    assert row(before.stdout, "tieredimagenet")[2] == "missing"
    assert row(before.stdout, "sinusoid")[2] == "none (generated)"
    assert f"data.root: {mini_root}" in before.stdout
    # What to put where, for every missing dataset, in the dataset's own words
    assert f"- tieredimagenet: no tieredImageNet files in {mini_root / 'tieredimagenet'}" in before.stdout

    first = metarun("data", "prepare", "miniimagenet", f"data.root={mini_root}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    [folder] = stores(mini_root / "miniimagenet", "miniimagenet")
    store = ImageStore.open(folder)
    assert store.counts.tolist() == [6] * 11
    out = first.stdout.strip()
    assert out.startswith("miniImageNet ready in ") and " s: " in out and f" decoded in {folder} " in out, out
    assert "already" not in out and "split: ravi: 5/3/3 train/val/test classes" in out
    index_time = (folder / "index.json").stat().st_mtime_ns

    after = metarun("data", "list", f"data.root={mini_root}", cwd=tmp_path)
    assert row(after.stdout, "miniimagenet")[2:] == ["present", "1.4 MB", "yes", datasets.size_text(store.nbytes)]

    # Prepared once: a second prepare opens the same store and decodes nothing.
    again = metarun("data", "prepare", "miniimagenet", f"data.root={mini_root}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"already decoded in {folder} " in again.stdout and "ready in 0.0 s" in again.stdout
    assert stores(mini_root / "miniimagenet", "miniimagenet") == [folder]
    assert (folder / "index.json").stat().st_mtime_ns == index_time


def test_prepare_ignores_the_runs_task_sizes(mini_root):
    # miniImageNet's 5-way 1-shot 15-query protocol needs 16 images a class; preparing the store does not.
    message = datasets.prepare("miniimagenet", [f"data.root={mini_root}", "data.shots=20"])
    assert "decoded in" in message and stores(mini_root / "miniimagenet", "miniimagenet")


def test_bad_input_is_one_line_on_stderr(mini_root, tmp_path):
    usage = metarun("data", cwd=tmp_path)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: metarun data list") and not usage.stderr
    assert_one_line_error(metarun("data", "prepare", "minimagenet", cwd=tmp_path),
                          "unknown dataset 'minimagenet'", "miniimagenet")
    assert_one_line_error(metarun("data", "prepare", "miniimagenet", f"data.root={mini_root}", "data.shot=1",
                                  cwd=tmp_path), "data.shot")
    assert_one_line_error(metarun("data", "prepare", "cifarfs", f"data.root={tmp_path / 'empty'}",
                                  "data.download=false", cwd=tmp_path),
                          "cifar-100-python.tar.gz is missing", "data.download")
    (mini_root / "miniimagenet" / "mini-imagenet-cache-val.pkl").write_bytes(b"<!DOCTYPE html><html>quota</html>")
    assert_one_line_error(metarun("data", "prepare", "miniimagenet", f"data.root={mini_root}", cwd=tmp_path),
                          "mini-imagenet-cache-val.pkl")
    assert not stores(mini_root / "miniimagenet", "miniimagenet")  # nothing half-written left to be used


@pytest.mark.parametrize("argv, words", [
    (["prepare"], "needs a dataset name"),
    (["prepare", "data.root=/x"], "needs a dataset name"),
    (["prepare", "omniglot", "root=/x"], "'root=/x' is not a data key"),
    (["prepare", "omniglot", "data.root=/nonexistent", "data.download=false"],
     "/nonexistent/omniglot/images_background.zip is missing"),
    (["prepare", "miniimagenet", "data.root="], "data.root is empty"),
    (["list", "data.root="], "data.root is empty"),
    (["list", "data.cache_dir= "], "data.cache_dir is empty"),
    (["list", "data.ways=3"], "takes data.root=DIR and data.cache_dir=DIR"),
    (["list", "everything"], "takes data.root=DIR and data.cache_dir=DIR"),
    (["prepare", "miniimagenet", "data.residency=gpu"], "data.residency"),
    (["show"], "unknown data command 'show'"),
])
def test_odd_arguments_are_one_line_errors(argv, words):
    with pytest.raises(MetarunError) as err:
        datasets.main(argv)
    assert "\n" not in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["help"], ["prepare", "-h"], ["list", "--help"]])
def test_help_anywhere_prints_usage(argv, capsys):
    assert datasets.main(argv) == 0
    assert capsys.readouterr().out.startswith("usage: metarun data list")


def test_store_folder_that_cannot_be_made_is_one_line(mini_root):
    blocker = mini_root / "miniimagenet" / "mini-imagenet-cache-test.pkl"  # a file where the cache folder would go
    with pytest.raises(MetarunError) as err:
        datasets.prepare("miniimagenet", [f"data.root={mini_root}", f"data.cache_dir={blocker / 'cache'}"])
    assert "\n" not in str(err.value) and str(blocker) in str(err.value)


# ------------------------------------------------------------------------------------------- kill safety


def write_tiered(root: Path, per_class: int) -> None:
    """Ren et al.'s pickles with 9 classes of ``per_class`` PNGs: big enough that decoding takes a while."""
    folder = root / "tieredimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        pngs, specific = [], []
        for c in range(n):
            png = _png(_images(rng, 1)[0])
            pngs += [png.copy() for _ in range(per_class)]  # distinct objects, as in the release
            specific += [c] * per_class
        with open(folder / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump(pngs, f, protocol=4)
        with open(folder / f"{split}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": np.array(specific), "label_general": np.zeros(len(specific), np.int64)}, f)


def test_a_killed_prepare_leaves_no_store_and_the_next_one_finishes(tmp_path):
    root = tmp_path / "data"
    write_tiered(root, per_class=400)
    folder = root / "tieredimagenet"
    command = [sys.executable, "-m", "metarun", "data", "prepare", "tieredimagenet", f"data.root={root}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Kill it once the decode has written its first classes into its temporary folder.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            written = [p for p in folder.glob(".tieredimagenet-*.tmp/*") if p.stat().st_size > 0]
            if written:
                break
            time.sleep(0.005)
        assert process.poll() is None, "the decode finished before it could be killed: make the fixture larger"
        assert written, "the decode never started"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not stores(folder, "tieredimagenet")  # no store folder a run would open
    assert not list(folder.glob("*/index.json")) and not list(folder.glob(".*/index.json"))
    assert list(folder.glob(".tieredimagenet-*.tmp"))  # only the killed decode's temporary folder

    result = metarun("data", "prepare", "tieredimagenet", f"data.root={root}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [store_folder] = stores(folder, "tieredimagenet")
    store = ImageStore.open(store_folder)
    assert store.counts.tolist() == [400] * 9 and f"decoded in {store_folder}" in result.stdout
    # and it is the store a run uses
    listing = metarun("data", "list", f"data.root={root}", cwd=tmp_path)
    assert row(listing.stdout, "tieredimagenet")[4:] == ["yes", datasets.size_text(store.nbytes)]


# --------------------------------------------------------------------------------- CIFAR-FS and FC100


def render(table) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    return out.getvalue()


def test_cifar_archive_is_listed_verified_and_metaoptnet_fc100_present(tmp_path, monkeypatch):
    with_archive, with_pickles = tmp_path / "a", tmp_path / "b"
    path = write_cifar100_archive(cifar.CIFAR100_ARCHIVE.path(with_archive))
    monkeypatch.setattr(cifar, "CIFAR100_ARCHIVE", dataclasses.replace(cifar.CIFAR100_ARCHIVE, md5=file_md5(path)))
    write_metaoptnet_fc100(with_pickles / "fc100")

    table, missing = datasets.list_datasets([f"data.root={with_archive}"])
    listing = render(table)
    assert row(listing, "cifarfs")[2:4] == ["verified (md5)", datasets.size_text(path.stat().st_size)]
    assert row(listing, "cifarfs")[4] == "no" and row(listing, "fc100")[2] == "verified (md5)"
    assert not any(line.startswith(("cifarfs:", "fc100:")) for line in missing)

    message = datasets.prepare("cifarfs", [f"data.root={with_archive}"])
    assert "CIFAR-FS ready in" in message and "64/16/20 train/val/test classes" in message
    assert row(render(datasets.list_datasets([f"data.root={with_archive}"])[0]), "cifarfs")[4] == "yes"

    listing = render(datasets.list_datasets([f"data.root={with_pickles}"])[0])
    assert row(listing, "fc100")[2] == "present"  # MetaOptNet's pickles have no published checksum
    assert row(listing, "cifarfs")[2] == "missing"


def test_a_bad_archive_is_listed_unusable_and_a_missing_one_says_what_downloads_it(tmp_path, monkeypatch):
    bad = cifar.CIFAR100_ARCHIVE.path(tmp_path)
    bad.parent.mkdir(parents=True)
    bad.write_text("<!DOCTYPE html><html>quota exceeded</html>")  # what file-sharing hosts return
    table, notes = datasets.list_datasets([f"data.root={tmp_path}"])
    listing = render(table)
    assert row(listing, "cifarfs")[2] == "unusable" and row(listing, "cub")[2] == "missing"
    (cifar_note,) = [n for n in notes if n.startswith("cifarfs:")]
    assert "HTML" in cifar_note
    (cub_note,) = [n for n in notes if n.startswith("cub:")]
    # list never downloads: it names what does, not the data.download key it set itself
    assert "metarun data prepare cub downloads it" in cub_note and "data.download" not in cub_note
    (mini_note,) = [n for n in notes if n.startswith("miniimagenet:")]
    assert "no official download" in mini_note and "prepare" not in mini_note


def test_list_counts_the_image_folder_of_ravis_csv_layout(tmp_path):
    from image_fixtures import write_mini_csv

    write_mini_csv(tmp_path)
    images = sum(p.stat().st_size for p in (tmp_path / "miniimagenet" / "images").iterdir())
    csvs = sum((tmp_path / "miniimagenet" / f"{s}.csv").stat().st_size for s in ("train", "val", "test"))
    listing = render(datasets.list_datasets([f"data.root={tmp_path}"])[0])
    assert row(listing, "miniimagenet")[3] == datasets.size_text(images + csvs)
