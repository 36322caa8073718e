"""Tier 2: the image store, its cache folder, both residencies and the generic task source."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.data.cache import INDEX_FILE, IMAGES_FILE, StoreWriter, fingerprint, store_folder
from metarun.data.images import ImageDataset, ImageTasks
from metarun.data.sampler import ClassTaskSampler
from metarun.data.store import ImageStore
from metarun.errors import DataError

# A tiny colour dataset with classes of unequal size: class c holds images whose every pixel says
# (c, position, channel), so an episode image names its class and position.
COUNTS = [7, 9, 6, 12, 8, 10, 7, 11, 9, 6, 8, 13]
SPLITS = {"train": [0, 1, 2, 3, 4, 5], "val": [6, 7, 8], "test": [9, 10, 11]}


def class_images(c: int, count: int, size: int = 8) -> np.ndarray:
    x = np.zeros((count, 3, size, size), dtype=np.uint8)
    for p in range(count):
        x[p, 0], x[p, 1], x[p, 2] = c, p, 100 + (c * 7 + p) % 100
    return x


class Tiny(ImageDataset):
    name, title, channels, image_size = "tiny", "Tiny", 3, 8
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    split_names = ("default", "other")
    decodes = 0

    def locate(self, download):
        path = self.root / "tiny" / "tiny.txt"
        if not path.is_file():
            raise DataError(f"Tiny needs {path}: {self.layout()}")
        return [path]

    def layout(self):
        return "tiny/tiny.txt under data.root"

    def decode(self, files, writer):
        type(self).decodes += 1
        for c, count in enumerate(COUNTS):
            writer.add_class(f"class{c}", class_images(c, count))

    def split_classes(self, store):
        return SPLITS


class TinyTasks(ImageTasks):
    dataset = Tiny

    def __init__(self, ways: int, shots: int, queries: int, root: str, split: str = "default",
                 cache_dir: str | None = None, download: bool = True, residency: str = "auto",
                 memory_share: float = 0.5, normalize: bool = True, augment: tuple[str, ...] = (),
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None):
        super().__init__(ways, shots, queries, root, split, cache_dir, download, residency, memory_share, normalize,
                         augment, train_ways, train_shots, train_queries)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "tiny.txt").write_text("tiny")
    return tmp_path


def tasks(root, **kw):
    kw = {"ways": 3, "shots": 2, "queries": 3, **kw}
    return TinyTasks(root=str(root), cache_dir=str(root / "cache"), **kw)


def write_store(folder, counts=COUNTS):
    with StoreWriter(folder, 3, 8, 8, meta={"m": 1}) as w:
        for c, n in enumerate(counts):
            w.add_class(f"class{c}", class_images(c, n), "train" if c % 2 else None)
    return folder


# -- cache folder --------------------------------------------------------------------------------
def test_store_round_trips_with_offsets_counts_and_split_tags(tmp_path):
    store = ImageStore.open(write_store(tmp_path / "s"))
    assert store.counts.tolist() == COUNTS and store.offsets.tolist() == list(np.cumsum([0] + COUNTS[:-1]))
    assert store.class_names[3] == "class3" and store.splits_of_class[:2] == [None, "train"]
    assert store.nbytes == sum(COUNTS) * 3 * 64 and store.meta == {"m": 1}
    for c in (0, 3, 11):
        assert torch.equal(store.class_images(c), torch.from_numpy(class_images(c, COUNTS[c])))
    assert not list(tmp_path.glob(".s.*"))  # no temporary folder left


def test_a_failed_or_killed_write_leaves_no_store(tmp_path):
    folder = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with StoreWriter(folder, 3, 8, 8) as w:
            w.add_class("a", class_images(0, 3))
            raise RuntimeError("decode failed")
    assert not folder.exists() and not list(tmp_path.glob(".s.*"))
    # A writer killed mid-way leaves its temporary folder: never read, removed by the next writer once stale.
    stale = tmp_path / ".s.abc.tmp"
    stale.mkdir()
    (stale / IMAGES_FILE).write_bytes(b"\0" * 10)
    os.utime(stale / IMAGES_FILE, (0, 0))
    os.utime(stale, (0, 0))
    write_store(folder)
    assert not stale.exists() and ImageStore.open(folder).counts.tolist() == COUNTS


def test_a_killed_writers_folder_is_removed_at_once_and_a_live_ones_is_kept(tmp_path):
    # A killed decode of tieredImageNet leaves up to 16.5 GB: the next writer removes it at once, told by the
    # dead writer's free lock, not after the 15 minutes that guard folders without one.
    folder = tmp_path / "s"
    script = textwrap.dedent(f"""
        import os, numpy as np
        from metarun.data.cache import StoreWriter
        w = StoreWriter({str(folder)!r}, 3, 8, 8).__enter__()
        w.add_class("a", np.zeros((3, 3, 8, 8), np.uint8))
        os._exit(9)  # killed mid-decode: no __exit__
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    (killed,) = tmp_path.glob(".s.*.tmp")
    live = StoreWriter(tmp_path / "s", 3, 8, 8).__enter__()  # a concurrent writer still at work
    try:
        write_store(folder)
        assert not killed.exists() and ImageStore.open(folder).counts.tolist() == COUNTS
        assert live._tmp.exists()  # its lock is held: never removed under it
    finally:
        live.add_class("b", class_images(1, 2))
        live.__exit__(None, None, None)


def test_an_unfinished_or_inconsistent_store_is_refused_in_one_line(tmp_path):
    folder = write_store(tmp_path / "s")
    with open(folder / IMAGES_FILE, "ab") as f:
        f.write(b"x")
    with pytest.raises(DataError, match="holds .* bytes, its index says") as e:
        ImageStore.open(folder)
    assert "\n" not in str(e.value)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["counts"][0] += 1
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(DataError, match="invalid index.json"):
        ImageStore.open(folder)
    (folder / INDEX_FILE).unlink()
    with pytest.raises(DataError, match="unfinished or missing"):
        ImageStore.open(folder)


def test_store_folder_and_fingerprint_follow_content(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"1" * 3_000_000)
    b.write_bytes(b"1" * 3_000_000)
    assert fingerprint([a]) != fingerprint([b])  # the name counts
    before = fingerprint([a])
    a.write_bytes(b"1" * 2_999_999 + b"2")
    assert fingerprint([a]) != before  # so does the tail
    assert store_folder(tmp_path, "x", {"k": 1}) == store_folder(tmp_path, "x", {"k": 1})
    assert store_folder(tmp_path, "x", {"k": 1}) != store_folder(tmp_path, "x", {"k": 2})
    assert store_folder(tmp_path, "x", {"k": 1}).name.startswith("x-")


# -- residencies ---------------------------------------------------------------------------------
def test_residency_choice_is_automatic_forced_and_explained(tmp_path):
    store = ImageStore.open(write_store(tmp_path / "s"))
    assert store.place("cpu", "auto", 0.5) and store.residency == "device" and store.images is not None
    assert "fits in data.memory_share=0.5" in store.describe() and "kB" in store.describe()
    reason = store.place("cpu", "memmap")
    assert store.residency == "memmap" and store.images is None and "data.residency=memmap" in reason
    store.place("cpu", "auto", memory_share=1e-12)
    assert store.residency == "memmap" and "more than data.memory_share" in store.describe()
    store.place("cpu", "device")
    assert store.residency == "device"
    in_memory = ImageStore.from_tensor(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), [2, 2], ["a", "b"])
    with pytest.raises(ValueError, match="no file"):
        in_memory.place("cpu", "memmap")


def test_both_residencies_give_identical_episodes(root):
    device, memmap = tasks(root, residency="device"), tasks(root, residency="memmap")
    assert Tiny.decodes >= 1
    assert device.summary()["store"].startswith("device") and memmap.summary()["store"].startswith("memmap")
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for _ in range(4):  # several training batches: the prefetched ones must be the same
        a, b = device.sample("train", 3, g1), memmap.sample("train", 3, g2)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
        assert torch.equal(a.classes, b.classes)
    assert torch.equal(g1.get_state(), g2.get_state())  # prefetching never moves the run's generator
    for split in ("val", "test"):
        a = torch.cat([e.query_x for e in device.fixed_episodes(split, 5, 2, 0)])
        b = torch.cat([e.query_x for e in memmap.fixed_episodes(split, 5, 2, 0)])
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_both_residencies_on_cuda_match_the_cpu_and_read_through_pinned_memory(root):
    cpu = tasks(root, residency="device")
    on_gpu = tasks(root, residency="device").to("cuda")
    from_file = tasks(root, residency="memmap").to("cuda")
    assert on_gpu.store.images.is_cuda and from_file.store.images is None
    assert "of cuda memory" in tasks(root).to("cuda").summary()["store"]  # auto sizes it against the GPU
    assert from_file.store.read(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 1, dtype=torch.long)).is_pinned()
    gens = [torch.Generator().manual_seed(0) for _ in range(3)]
    for _ in range(4):  # prefetched batches included
        a, b, c = (t.sample("train", 3, g) for t, g in zip((cpu, on_gpu, from_file), gens))
        assert b.support_x.is_cuda and c.support_x.is_cuda
        assert torch.equal(a.support_x, b.support_x.cpu()) and torch.equal(a.query_x, c.query_x.cpu())


def test_prefetch_survives_a_changed_stream(root):
    memmap, device = tasks(root, residency="memmap"), tasks(root, residency="device")
    g = torch.Generator().manual_seed(1)
    memmap.sample("train", 2, g)
    g.manual_seed(7)  # as a resume does: the prefetched batch no longer matches and is not used
    a = memmap.sample("train", 2, g)
    b = device.sample("train", 2, torch.Generator().manual_seed(7))
    assert torch.equal(a.support_x, b.support_x)


def test_the_store_is_decoded_once_and_a_broken_one_is_rebuilt(root):
    before = Tiny.decodes
    tasks(root)
    tasks(root)
    assert Tiny.decodes == before + 1
    folder = next((root / "cache").glob("tiny-*"))
    (folder / IMAGES_FILE).write_bytes(b"short")
    count = Tiny.decodes
    source = tasks(root)
    assert Tiny.decodes == count + 1 and source.store.num_images == sum(COUNTS)


# -- sampling ------------------------------------------------------------------------------------
def test_images_come_from_their_labelled_class_and_are_distinct(root):
    source = tasks(root, normalize=False)
    ep = source.sample("train", 20, torch.Generator().manual_seed(2))
    assert ep.support_x.shape == (20, 6, 3, 8, 8) and ep.query_x.shape == (20, 9, 3, 8, 8)
    for t in range(20):
        for label in range(3):
            c = ep.classes[t, label].item()
            assert c in SPLITS["train"]
            imgs = torch.cat([ep.support_x[t, label * 2 : label * 2 + 2], ep.query_x[t, label * 3 : label * 3 + 3]])
            assert (imgs[:, 0] * 255).round().eq(c).all()
            positions = (imgs[:, 1, 0, 0] * 255).round().long().tolist()
            assert len(set(positions)) == 5 and max(positions) < COUNTS[c]


def test_unequal_classes_reach_every_image(root):
    source = tasks(root, normalize=False, ways=3, shots=1, queries=5)
    seen = {c: set() for c in SPLITS["train"]}
    ep = source.sample("train", 400, torch.Generator().manual_seed(3))
    x = torch.cat([ep.support_x, ep.query_x], 1)
    for c, p in zip((x[:, :, 0, 0, 0] * 255).round().long().flatten().tolist(),
                    (x[:, :, 1, 0, 0] * 255).round().long().flatten().tolist()):
        seen[c].add(p)
    assert all(seen[c] == set(range(COUNTS[c])) for c in seen)


def test_equal_classes_draw_exactly_as_before():
    # The sampler metarun always had: classes by rand(T, C).argsort, images by rand(T, n, per_class).argsort.
    g = torch.Generator().manual_seed(4)
    classes = torch.tensor([5, 2, 9, 7, 3, 0])
    slots, positions = ClassTaskSampler(classes, torch.full((10,), 20), 4, 2, 3).draw(6, g)
    ref = torch.Generator().manual_seed(4)
    expected_slots = torch.rand(6, 6, generator=ref).argsort(dim=1)[:, :4]
    expected_positions = torch.rand(6, 4, 20, generator=ref).argsort(dim=2)[..., :5]
    assert torch.equal(slots, expected_slots) and torch.equal(positions, expected_positions)
    assert torch.equal(g.get_state(), ref.get_state())


def test_normalisation_uses_the_dataset_mean_and_std(root):
    raw = tasks(root, normalize=False).sample("val", 2, torch.Generator().manual_seed(5))
    norm = tasks(root).sample("val", 2, torch.Generator().manual_seed(5))
    mean, std = torch.tensor(Tiny.mean).view(3, 1, 1), torch.tensor(Tiny.std).view(3, 1, 1)
    torch.testing.assert_close(norm.support_x, (raw.support_x - mean) / std)


def test_too_few_images_names_the_key_and_the_smallest_class(root):
    with pytest.raises(DataError, match=r"data.shots \+ data.queries = 7 exceeds the 6 images of the smallest Tiny "
                                        r"train class \(class2\): lower data.shots or data.queries"):
        tasks(root, shots=2, queries=5)
    with pytest.raises(DataError, match=r"data.ways=4 exceeds the 3 classes of the 'default' val split"):
        tasks(root, ways=4)
    with pytest.raises(ValueError, match="residency must be one of"):
        tasks(root, residency="gpu")
    with pytest.raises(ValueError, match="augment takes"):
        tasks(root, augment=("mixup",))


# -- memory --------------------------------------------------------------------------------------
def test_reading_a_large_store_keeps_host_memory_bounded(tmp_path):
    # A store larger than what a run may hold: reading many batches from it must not pile its pages up in
    # the process's resident memory (as a memory map would). Measured in a child process by its VmHWM
    # (ru_maxrss would start at this pytest process's size: Linux carries it over the fork and exec).
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        def peak():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        from metarun.data.cache import StoreWriter
        from metarun.data.store import ImageStore
        folder = sys.argv[1]
        chunk = np.zeros((500, 3, 84, 84), dtype=np.uint8)
        with StoreWriter(folder, 3, 84, 84) as w:
            for c in range(40):  # 40 classes x 500 images x 21 KB = 423 MB
                w.add_class(str(c), chunk)
        store = ImageStore.open(folder)
        store.place("cpu", "memmap")
        before = peak()
        g = torch.Generator().manual_seed(0)
        for _ in range(60):  # 60 batches x 2000 images: every image read several times over
            classes = torch.randint(0, 40, (4, 25), generator=g)
            positions = torch.randint(0, 500, (4, 25, 20), generator=g)
            store.gather(classes, positions)
        grown = peak() - before
        print(grown)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    grown_mb = int(out.stdout.split()[-1]) / 1024  # VmHWM is in kB
    assert grown_mb < 150, f"resident memory grew {grown_mb:.0f} MB while reading a 423 MB store"


# -- Omniglot on the store -------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["maml", "snell"])
def test_omniglot_episodes_are_the_same_from_a_file_backed_store(shared_data_root, omniglot_cache_dir, split):
    from metarun.data.omniglot import OmniglotTasks

    kw = dict(root=str(shared_data_root), cache_dir=str(omniglot_cache_dir), download=False)
    device = OmniglotTasks(5, 1, 2, split, residency="device", **kw)
    memmap = OmniglotTasks(5, 1, 2, split, residency="memmap", **kw).to("cpu")
    assert memmap.store.path is not None and omniglot_cache_dir in memmap.store.path.parents  # written once, in the cache
    assert memmap.summary()["store"].startswith("memmap, 25.4 MB store read from disk")
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for _ in range(3):
        a, b = device.sample("train", 4, g1), memmap.sample("train", 4, g2)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.classes, b.classes)
    a = next(device.fixed_episodes("test", 20, 20, 0))
    b = next(memmap.fixed_episodes("test", 20, 20, 0))
    assert torch.equal(a.query_x, b.query_x)


# -- the new keys' rules -----------------------------------------------------------------------------
@pytest.mark.parametrize("override,allowed", [
    ("data.residency=gpu", "auto, device, memmap"),
    ("data.memory_share=0", "(0, 1]"),
    ("data.memory_share=1.5", "(0, 1]"),
    ("data.augment=[flip,mixup]", "resized_crop, pad_crop, flip, jitter"),
    ("data.augment=[resized_crop,pad_crop]", "not both"),
])
def test_new_data_keys_are_checked_in_one_line(override, allowed):
    from support import compose_config

    from metarun.errors import MetarunError
    from metarun.validation import validate_train

    cfg = compose_config([override])
    with pytest.raises(MetarunError) as e:
        validate_train(cfg)
    key = override.split("=")[0]
    assert str(e.value).startswith(f"{key}=") and allowed in str(e.value) and "\n" not in str(e.value)
    validate_train(compose_config(["data.residency=memmap", "data.memory_share=1", "data.augment=[flip,jitter]"]))
