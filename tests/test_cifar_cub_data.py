"""CIFAR-FS, FC100 and CUB: the papers' class lists, the official archives' formats, and every bad input."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_cub_fixtures import (cifar_pickles, cub_members, jpeg, py2_pickle, write_cifar100_archive,
                                write_cub_archive, write_metaoptnet_fc100, write_tar)
from metarun.data import cifar, cub, official_archive
from metarun.data.download import file_md5
from metarun.errors import DataError


def one_line(err) -> str:
    message = str(err.value if hasattr(err, "value") else err)
    assert "\n" not in message
    return message


def trusted(spec, path: Path):
    """The archive spec with the md5 of the test archive at ``path`` (the official md5 is of the real file)."""
    return dataclasses.replace(spec, md5=file_md5(path))


# ------------------------------------------------------------------------------------------ class lists


def test_cifar100_superclass_table_is_the_datasets():
    assert len(cifar.CIFAR100_SUPERCLASSES) == 20
    assert all(len(cs) == 5 for cs in cifar.CIFAR100_SUPERCLASSES.values())
    assert len(set(cifar.FINE_LABEL_NAMES)) == 100
    assert cifar.FINE_LABEL_NAMES[:3] == ("apple", "aquarium_fish", "baby")
    assert cifar.COARSE_LABEL_NAMES[0] == "aquatic_mammals" and cifar.COARSE_LABEL_NAMES[-1] == "vehicles_2"


@pytest.mark.parametrize("splits, sizes", [
    (cifar.CIFARFS_SPLITS, (64, 16, 20)),
    (cifar.FC100_SPLITS, (60, 20, 20)),
    (cub.CHEN_SPLITS, (100, 50, 50)),
    (cub.METADATASET_SPLITS, (140, 30, 30)),
], ids=["cifarfs", "fc100", "cub-chen", "cub-metadataset"])
def test_split_lists_are_disjoint_complete_and_of_the_papers_sizes(splits, sizes):
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == sizes
    everything = [c for s in ("train", "val", "test") for c in splits[s]]
    assert len(set(everything)) == len(everything)  # disjoint, no repeats
    universe = cifar.FINE_LABEL_NAMES if sum(sizes) == 100 else cub.CUB_CLASSES
    assert sorted(everything) == sorted(universe)  # complete


def test_fc100_splits_whole_superclasses_12_4_4():
    assert [len(cifar.FC100_SUPERCLASS_SPLITS[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(s for v in cifar.FC100_SUPERCLASS_SPLITS.values() for s in v) == list(cifar.COARSE_LABEL_NAMES)
    for split, supers in cifar.FC100_SUPERCLASS_SPLITS.items():
        for s in supers:
            assert set(cifar.CIFAR100_SUPERCLASSES[s]) <= set(cifar.FC100_SPLITS[split])


def test_known_members_of_the_published_lists():
    # Spot checks against the sources (Bertinetto's test.txt, TADAM's test superclasses, Chen's rule).
    assert "pickup_truck" in cifar.CIFARFS_SPLITS["test"] and "motorcycle" in cifar.CIFARFS_SPLITS["val"]
    assert {"aquatic_mammals", "insects", "medium_mammals", "people"} == set(cifar.FC100_SUPERCLASS_SPLITS["test"])
    assert cub.CUB_CLASSES[0] == "001.Black_footed_Albatross" and cub.CUB_CLASSES[-1] == "200.Common_Yellowthroat"
    assert cub.CHEN_SPLITS["train"][:2] == ("001.Black_footed_Albatross", "003.Sooty_Albatross")
    assert cub.CHEN_SPLITS["val"][0] == "002.Laysan_Albatross" and cub.CHEN_SPLITS["test"][0] == "004.Groove_billed_Ani"
    assert "200.Common_Yellowthroat" in cub.METADATASET_SPLITS["val"]


# ------------------------------------------------------------------------------------------ CIFAR-100


def test_read_cifar100_pools_train_and_test_per_class(tmp_path):
    path = write_cifar100_archive(tmp_path / "cifar100" / "cifar-100-python.tar.gz")
    classes = list(cifar.read_cifar100(path, trusted(cifar.CIFAR100_ARCHIVE, path)))
    assert [name for name, _ in classes] == list(cifar.FINE_LABEL_NAMES)
    for index, (name, images) in enumerate(classes):
        assert images.dtype == np.uint8 and images.shape == (3, 3, 32, 32)
        assert (images[:, 0] == index).all()  # the right class, channel-first
        assert images[:, 1, 0, 0].tolist() == [1, 2, 101]  # train images first, then test
        assert images[0, 2, 0].tolist() == [4 * x for x in range(32)]  # rows not scrambled


def test_py3_made_archive_reads_too(tmp_path):
    """A CIFAR-100 archive repacked under Python 3 (protocol 2 bytes via _codecs.encode) is read the same."""
    py2 = cifar_pickles()
    py3 = {}
    for name, data in py2.items():
        obj = pickle.loads(data, encoding="bytes")
        py3[name] = pickle.dumps(obj, protocol=2)
    path = write_cifar100_archive(tmp_path / "a.tar.gz", py3)
    first = dict(cifar.read_cifar100(path, trusted(cifar.CIFAR100_ARCHIVE, path)))
    path2 = write_cifar100_archive(tmp_path / "b.tar.gz", py2)
    second = dict(cifar.read_cifar100(path2, trusted(cifar.CIFAR100_ARCHIVE, path2)))
    assert all(np.array_equal(first[k], second[k]) for k in second)


class Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("which, make, expected", [
    ("train", lambda: pickle.dumps({"data": Boom()}, protocol=2), "posix.system"),
    ("train", lambda: py2_pickle({"data": np.zeros((2, 3072), np.uint8)})[:-40], "truncated"),
    ("test", lambda: py2_pickle({"data": np.zeros((2, 3072), np.float32), "fine_labels": [0, 1],
                                 "coarse_labels": [4, 1]}), "expected uint8 (N, 3072)"),
    ("test", lambda: py2_pickle({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1],
                                 "coarse_labels": [0, 0]}), "wrong superclasses"),
    ("test", lambda: py2_pickle({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100],
                                 "coarse_labels": [4, 1]}), "not 2 integers in 0..99"),
    ("test", lambda: py2_pickle({"pixels": np.zeros((2, 3072), np.uint8)}), "no 'data' entry"),
    ("meta", lambda: py2_pickle({"fine_label_names": ["a"] * 100, "coarse_label_names": ["b"] * 20}),
     "does not name CIFAR-100's"),
    ("meta", lambda: b"<!DOCTYPE html><html>quota exceeded</html>", "HTML page"),
], ids=["code-running", "truncated", "dtype", "superclass", "label-range", "wrong-key", "meta-names", "html"])
def test_bad_cifar_pickles_are_one_line_errors_and_never_run_code(tmp_path, monkeypatch, which, make, expected):
    monkeypatch.chdir(tmp_path)
    pickles = cifar_pickles()
    pickles[which] = make()
    path = write_cifar100_archive(tmp_path / "c.tar.gz", pickles)
    with pytest.raises(DataError) as err:
        list(cifar.read_cifar100(path, trusted(cifar.CIFAR100_ARCHIVE, path)))
    assert expected in one_line(err)
    assert not (tmp_path / "pwned").exists()


def test_archive_without_a_pickle_or_with_a_huge_member_is_refused(tmp_path, monkeypatch):
    pickles = cifar_pickles()
    del pickles["test"]
    path = write_cifar100_archive(tmp_path / "c.tar.gz", pickles)
    with pytest.raises(DataError, match="has no cifar-100-python/test"):
        list(cifar.read_cifar100(path, trusted(cifar.CIFAR100_ARCHIVE, path)))
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", 1000)
    path = write_cifar100_archive(tmp_path / "d.tar.gz")
    with pytest.raises(DataError, match="declares .* bytes, more than"):
        list(cifar.read_cifar100(path, trusted(cifar.CIFAR100_ARCHIVE, path)))


def test_metaoptnet_fc100_pickles_read_with_their_split(tmp_path):
    paths = write_metaoptnet_fc100(tmp_path / "fc100")
    got = list(cifar.read_metaoptnet_fc100(paths))
    assert len(got) == 100
    for name, images, split in got:
        assert name in cifar.FC100_SPLITS[split]
        assert images.shape == (3, 3, 32, 32) and (images[:, 0] == cifar.FINE_LABEL_NAMES.index(name)).all()
        assert images[:, 1, 0, 0].tolist() == [1, 2, 3]


def test_metaoptnet_pickle_of_the_wrong_split_or_hostile_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = write_metaoptnet_fc100(tmp_path / "fc100")
    paths["val"].write_bytes(paths["test"].read_bytes())
    with pytest.raises(DataError, match="classes of another FC100 split"):
        list(cifar.read_metaoptnet_fc100(paths))
    paths["val"].write_bytes(pickle.dumps(Boom()))
    with pytest.raises(DataError, match="not a plain data pickle"):
        list(cifar.read_metaoptnet_fc100(paths))
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------ archives


def test_local_archive_with_a_wrong_md5_or_html_is_refused_with_the_fix(tmp_path):
    spec = cifar.CIFAR100_ARCHIVE
    path = write_cifar100_archive(spec.path(tmp_path))
    with pytest.raises(DataError) as err:
        spec.locate(tmp_path, download=False)
    message = one_line(err)
    assert f"not the official {spec.md5}" in message and "delete it" in message and spec.url in message
    path.write_bytes(b"\n<!DOCTYPE html><html><body>Google Drive - quota exceeded</body></html>")
    with pytest.raises(DataError, match="HTML page"):
        spec.locate(tmp_path, download=False)


def test_missing_archive_without_download_names_the_file_and_place(tmp_path):
    for spec in (cifar.CIFAR100_ARCHIVE, cub.CUB_ARCHIVE):
        with pytest.raises(DataError) as err:
            spec.locate(tmp_path, download=False)
        message = one_line(err)
        assert str(tmp_path / spec.folder / spec.filename) in message and spec.url in message


def test_truncated_archive_is_caught(tmp_path):
    path = write_cifar100_archive(tmp_path / "c.tar.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        cifar.CIFAR100_ARCHIVE.verify(path)
    assert "md5" in one_line(err)
    spec = trusted(cifar.CIFAR100_ARCHIVE, path)  # even a file whose md5 we accept: the stream is checked
    with pytest.raises(DataError, match="not a readable tar archive|cut short|has no"):
        list(cifar.read_cifar100(path, spec))


def test_download_failure_is_one_line_naming_where_to_put_the_file(tmp_path, monkeypatch):
    spec = dataclasses.replace(cifar.CIFAR100_ARCHIVE, url="http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(DataError) as err:
        spec.locate(tmp_path, download=True)
    message = one_line(err)
    assert "download of" in message and str(spec.path(tmp_path)) in message
    assert not list((tmp_path / "cifar100").glob("*"))  # no partial file left


# ------------------------------------------------------------------------------------------ CUB


def test_read_cub_decodes_every_class_in_order(tmp_path):
    path = write_cub_archive(tmp_path / "CUB_200_2011.tgz", cub_members(modes={1: "L", 4: "CMYK"}))
    spec = trusted(cub.CUB_ARCHIVE, path)
    classes = list(cub.read_cub(path, crop=False, archive=spec))
    assert [name for name, _ in classes] == list(cub.CUB_CLASSES)
    for class_id, (name, images) in enumerate(classes, 1):
        assert images.shape == (2, 3, 84, 84) and images.dtype == np.uint8
        # Whole image: the left half is the class colour, the right half white.
        assert abs(int(images[1, 0, 42, 10]) - class_id) <= 6 and images[1, :, 42, 75].min() >= 245
    # Images 1 (grayscale) and 4 (CMYK) come out as RGB too: grey as three equal channels.
    grey = classes[0][1][0].astype(int)
    assert np.abs(grey[0] - grey[1]).max() <= 1 and np.abs(grey[1] - grey[2]).max() <= 1
    assert abs(int(classes[1][1][1, 0, 42, 10]) - 2) <= 8


def test_read_cub_crop_uses_the_bounding_box(tmp_path):
    path = write_cub_archive(tmp_path / "CUB_200_2011.tgz", cub_members(text_first=True))
    spec = trusted(cub.CUB_ARCHIVE, path)
    cropped = dict(cub.read_cub(path, crop=True, archive=spec))
    images = cropped["050.Eared_Grebe"]
    assert abs(int(images[0, 0, 42, 75]) - 50) <= 6  # the whole frame is now the bird's box


def test_decode_image_matches_the_documented_pipeline():
    data = jpeg((60, 45), 120)
    ours = cub.decode_image(data, (10.2, 5.0, 30.5, 20.0), "x.jpg", DataError)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop((10, 5, 41, 25))
                           .resize((84, 84), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("damage, expected", [
    (lambda m: m.pop(f"{cub.TOP}/bounding_boxes.txt"), "has no CUB_200_2011/bounding_boxes.txt"),
    (lambda m: m.__setitem__(f"{cub.TOP}/classes.txt", b"1 001.Black_footed_Albatross\n"), "200 classes"),
    (lambda m: m.pop(next(k for k in m if k.endswith(".jpg"))), "lacks 001.Black_footed_Albatross/"),
    (lambda m: m.__setitem__(next(k for k in m if k.endswith(".jpg")), b"not a jpeg"), "does not decode"),
    (lambda m: m.__setitem__(f"{cub.TOP}/images.txt",
                             m[f"{cub.TOP}/images.txt"].replace(b"001.Black_footed_Albatross/", b"../../", 1)),
     "expected CLASS_FOLDER/NAME.jpg"),
    (lambda m: m.__setitem__(f"{cub.TOP}/bounding_boxes.txt",
                             m[f"{cub.TOP}/bounding_boxes.txt"].replace(b"1 0.0 0.0", b"1 0.0 nan", 1)),
     "invalid box"),
], ids=["no-boxes", "classes", "missing-image", "corrupt-jpeg", "path-escape", "nan-box"])
def test_bad_cub_archives_are_one_line_errors(tmp_path, damage, expected):
    members = cub_members()
    damage(members)
    path = write_cub_archive(tmp_path / "CUB_200_2011.tgz", members)
    with pytest.raises(DataError) as err:
        list(cub.read_cub(path, crop=False, archive=trusted(cub.CUB_ARCHIVE, path)))
    assert expected in one_line(err)


def test_cub_links_and_oversized_members_are_never_read(tmp_path, monkeypatch):
    import tarfile
    members = cub_members()
    path = write_cub_archive(tmp_path / "CUB_200_2011.tgz", members)
    # A symlink member named like an image is skipped (so the image counts as missing), never followed.
    link_path = tmp_path / "link.tgz"
    with tarfile.open(path) as src, tarfile.open(link_path, "w:gz") as dst:
        for info in src:
            data = src.extractfile(info).read()
            if info.name.endswith("_0000_1.jpg"):
                info = tarfile.TarInfo(info.name)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                dst.addfile(info)
            else:
                dst.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="lacks"):
        list(cub.read_cub(link_path, crop=False, archive=trusted(cub.CUB_ARCHIVE, link_path)))
    monkeypatch.setattr(cub, "MAX_JPEG_BYTES", 100)
    with pytest.raises(DataError, match="more than the 100"):
        list(cub.read_cub(path, crop=False, archive=trusted(cub.CUB_ARCHIVE, path)))


def test_cub_stop_request_between_classes(tmp_path, monkeypatch):
    from metarun.utils import stop
    path = write_cub_archive(tmp_path / "CUB_200_2011.tgz")
    classes = cub.read_cub(path, crop=False, archive=trusted(cub.CUB_ARCHIVE, path))
    next(classes)
    monkeypatch.setattr(stop, "_requested", type("E", (), {"is_set": staticmethod(lambda: True)})())
    with pytest.raises(stop.StopRequested):
        next(classes)


def test_not_a_tar_at_all(tmp_path):
    path = tmp_path / "x.tgz"
    path.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(DataError, match="not a readable tar archive"):
        list(official_archive.stream_members(trusted(cub.CUB_ARCHIVE, path), path, lambda n: True, 10))
    write_tar(tmp_path / "plain.tar", {"a": b"1"}, mode="w")
    assert list(official_archive.stream_members(cub.CUB_ARCHIVE, tmp_path / "plain.tar", lambda n: True, 10)) == \
        [("a", b"1")]


# ------------------------------------------------------------------------------------------ tasks classes

import torch  # noqa: E402

from metarun.data.store import ImageStore  # noqa: E402


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    path = write_cifar100_archive(cifar.CIFAR100_ARCHIVE.path(tmp_path / "data"))
    monkeypatch.setattr(cifar, "CIFAR100_ARCHIVE", trusted(cifar.CIFAR100_ARCHIVE, path))
    return tmp_path / "data"


@pytest.fixture
def cub_root(tmp_path, monkeypatch):
    path = write_cub_archive(cub.CUB_ARCHIVE.path(tmp_path / "data"), cub_members(per_class=3))
    monkeypatch.setattr(cub, "CUB_ARCHIVE", trusted(cub.CUB_ARCHIVE, path))
    return tmp_path / "data"


def sample(tasks, split="test", n=2, seed=0):
    return tasks.sample(split, n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls, sizes", [(cifar.CIFARFSTasks, (64, 16, 20)), (cifar.FC100Tasks, (60, 20, 20))])
def test_cifar_tasks_split_sizes_and_pixels_of_the_right_class(cifar_root, cls, sizes):
    tasks = cls(ways=5, shots=1, queries=2, root=str(cifar_root), download=False, normalize=False)
    assert tuple(len(tasks.split_class_indices[s]) for s in ("train", "val", "test")) == sizes
    lists = cls.dataset.class_splits
    for split in ("train", "val", "test"):
        names = {tasks.store.class_names[i] for i in tasks.split_class_indices[split].tolist()}
        assert names == set(lists[split])
        episode = sample(tasks, split)
        assert episode.support_x.shape == (2, 5, 3, 32, 32) and episode.query_x.shape == (2, 10, 3, 32, 32)
        for t in range(2):
            for way, c in enumerate(episode.classes[t].tolist()):
                name = tasks.store.class_names[c]
                assert name in lists[split]
                # Channel 0 of every fixture image is its CIFAR-100 fine label: the image is of that class.
                pixels = episode.support_x[t, way, 0] * 255
                assert torch.allclose(pixels, torch.full_like(pixels, cifar.FINE_LABEL_NAMES.index(name)), atol=1e-3)
    # The store sits beside the archive, decoded once.
    assert list((cifar_root / "cifar100").glob(f"{cls.dataset.name}-*"))


def test_cifar_normalisation_uses_cifar100_statistics(cifar_root):
    tasks = cifar.CIFARFSTasks(ways=2, shots=1, queries=1, root=str(cifar_root), download=False)
    raw = cifar.CIFARFSTasks(ways=2, shots=1, queries=1, root=str(cifar_root), download=False, normalize=False)
    a, b = sample(tasks), sample(raw)
    mean = torch.tensor(cifar.MEAN).view(3, 1, 1)
    std = torch.tensor(cifar.STD).view(3, 1, 1)
    assert torch.allclose(a.support_x, (b.support_x - mean) / std, atol=1e-5)


def test_cifar_store_is_cached_not_decoded_again(cifar_root, monkeypatch):
    first = sample(cifar.CIFARFSTasks(ways=5, shots=1, queries=1, root=str(cifar_root), download=False))

    def fail(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cifar, "read_cifar100", fail)
    second = sample(cifar.CIFARFSTasks(ways=5, shots=1, queries=1, root=str(cifar_root), download=False))
    assert torch.equal(first.support_x, second.support_x) and torch.equal(first.classes, second.classes)


def test_fc100_from_metaoptnet_pickles_gives_the_same_split(tmp_path, monkeypatch):
    write_metaoptnet_fc100(tmp_path / "fc100")
    tasks = cifar.FC100Tasks(ways=5, shots=1, queries=2, root=str(tmp_path), download=False, normalize=False)
    assert [len(tasks.split_class_indices[s]) for s in ("train", "val", "test")] == [60, 20, 20]
    tags = dict(zip(tasks.store.class_names, tasks.store.splits_of_class))
    assert all(tags[name] == split for split, names in cifar.FC100_SPLITS.items() for name in names)
    episode = sample(tasks)
    name = tasks.store.class_names[int(episode.classes[0, 0])]
    assert name in cifar.FC100_SPLITS["test"]
    assert float(episode.support_x[0, 0, 0, 0, 0]) * 255 == pytest.approx(cifar.FINE_LABEL_NAMES.index(name), abs=1e-3)


def test_missing_files_name_what_to_put_where(tmp_path):
    for cls, expected in ((cifar.CIFARFSTasks, "cifar100/cifar-100-python.tar.gz"),
                          (cifar.FC100Tasks, "FC100_train.pickle"), (cub.CUBTasks, "cub/CUB_200_2011.tgz")):
        with pytest.raises(DataError) as err:
            cls(ways=5, shots=1, queries=1, root=str(tmp_path), download=False)
        message = one_line(err)
        assert expected in message and "data.download" in message


def test_wrong_md5_archive_is_refused_by_the_tasks(tmp_path):
    write_cifar100_archive(cifar.CIFAR100_ARCHIVE.path(tmp_path))
    with pytest.raises(DataError, match="not the official eb9058c3a382ffc7106e4002c42a8d85.*delete it"):
        cifar.CIFARFSTasks(ways=5, shots=1, queries=1, root=str(tmp_path), download=False)


@pytest.mark.parametrize("split, sizes", [("chen", (100, 50, 50)), ("metadataset", (140, 30, 30))])
def test_cub_tasks_splits(cub_root, split, sizes):
    tasks = cub.CUBTasks(ways=5, shots=1, queries=2, root=str(cub_root), split=split, download=False,
                         normalize=False)
    assert tuple(len(tasks.split_class_indices[s]) for s in ("train", "val", "test")) == sizes
    episode = sample(tasks, "val")
    assert episode.support_x.shape == (2, 5, 3, 84, 84)
    for way, c in enumerate(episode.classes[0].tolist()):
        name = tasks.store.class_names[c]
        assert name in cub.SPLITS[split]["val"]
        # The fixture paints each photograph's left half in its class id.
        assert abs(float(episode.support_x[0, way, 0, 42, 10]) * 255 - int(name[:3])) <= 6


def test_cub_crop_is_its_own_cache_and_changes_the_images(cub_root):
    whole = cub.CUBTasks(ways=5, shots=1, queries=1, root=str(cub_root), download=False, normalize=False)
    cropped = cub.CUBTasks(ways=5, shots=1, queries=1, root=str(cub_root), crop=True, download=False,
                           normalize=False)
    assert whole.store.path != cropped.store.path
    a, b = sample(whole), sample(cropped)
    assert torch.equal(a.classes, b.classes)
    assert float(a.support_x[0, 0, :, 42, 75].min()) > 0.95  # right half white in the whole photograph
    assert float(b.support_x[0, 0, :, 42, 75].min()) < 0.9  # the box is the coloured left half


def test_cub_too_many_shots_names_the_key(cub_root):
    with pytest.raises(DataError, match=r"data.shots \+ data.queries = 4 exceeds"):
        cub.CUBTasks(ways=5, shots=2, queries=2, root=str(cub_root), download=False)
    with pytest.raises(ValueError, match="split must be one of"):
        cub.CUBTasks(ways=5, shots=1, queries=1, root=str(cub_root), split="ravi", download=False)


# ------------------------------------------------------------------------------------------ downloads

import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402


@pytest.fixture
def server():
    """A local HTTP server answering each path with the (content type, body) in ``server.routes``."""
    routes: dict[str, tuple[str, bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            kind, body = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.routes = routes
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_refuses_html_and_wrong_checksums(tmp_path, server):
    good = write_cifar100_archive(tmp_path / "src.tar.gz").read_bytes()
    server.routes["/good"] = ("application/gzip", good)
    server.routes["/html"] = ("application/octet-stream", b"<!DOCTYPE html><html>Too many users</html>")
    server.routes["/short"] = ("application/gzip", good[:1000])
    import hashlib
    base = dataclasses.replace(cifar.CIFAR100_ARCHIVE, md5=hashlib.md5(good).hexdigest())
    root = tmp_path / "data"
    for route, expected in (("/html", "HTML page"), ("/short", "md5 mismatch")):
        with pytest.raises(DataError) as err:
            dataclasses.replace(base, url=server.base + route).locate(root, download=True)
        message = one_line(err)
        assert expected in message and str(base.path(root)) in message
        assert not base.path(root).exists() and not list(base.path(root).parent.glob(".*.part"))
    path = dataclasses.replace(base, url=server.base + "/good").locate(root, download=True)
    assert path == base.path(root) and path.read_bytes() == good


@pytest.mark.parametrize("cls, split, own", [(cifar.CIFARFSTasks, "bertinetto", {}), (cifar.FC100Tasks, "oreshkin", {}),
                                             (cub.CUBTasks, "chen", {"crop": False})])
def test_tasks_classes_spell_out_their_keys_for_the_config_schema(cls, split, own):
    import inspect

    from metarun.data.images import ImageTasks
    params = inspect.signature(cls).parameters
    common = set(inspect.signature(ImageTasks).parameters) - {"dataset_options"}
    assert common <= set(params) and not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert params["split"].default == split == cls.dataset.split_names[0]
    assert {k: params[k].default for k in own} == own
    assert (params["channels"].default, params["image_size"].default) == (3, cls.dataset.image_size)
