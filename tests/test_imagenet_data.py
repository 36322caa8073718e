"""miniImageNet and tieredImageNet: every accepted on-disk format, the split, the cache, and every bad file."""

import io
import pickle
import weakref

import numpy as np
import pytest

from image_fixtures import (RecordingWriter, write_mini_csv, write_mini_hdf5, write_mini_pickles,
                            write_tiered_hdf5, write_tiered_pickles)
from metarun.data import miniimagenet as mini
from metarun.data import tieredimagenet as tiered
from metarun.errors import DataError

try:
    import h5py  # noqa: F401
    HAVE_H5PY = True
except ImportError:
    HAVE_H5PY = False
needs_h5py = pytest.mark.skipif(not HAVE_H5PY, reason="h5py is not installed (pip install 'metarun[hdf5]')")


def decode(module, root):
    fmt, files = module.find_files(root)
    writer = RecordingWriter()
    module.decode_into(fmt, files, writer)
    return fmt, writer


def assert_same(writer, expected):
    """Every class of ``expected`` ({split: {name: (n, H, W, 3)}}) was written once, channels first, tagged."""
    assert sorted(writer.classes) == sorted(n for d in expected.values() for n in d)
    for split, by_class in expected.items():
        for name, images in by_class.items():
            assert writer.splits[name] == split
            np.testing.assert_array_equal(writer.classes[name], images.transpose(0, 3, 1, 2))


def one_line_error(fn, *needles):
    with pytest.raises(DataError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# ------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("protocol", [2, 4])
def test_mini_pickles_decode_each_class_from_its_indices(tmp_path, protocol):
    expected = write_mini_pickles(tmp_path, protocol=protocol)
    fmt, writer = decode(mini, tmp_path)
    assert fmt == "pickle"
    assert_same(writer, expected)
    # within a split, sorted by wnid: the same store, whichever format it came from
    assert list(writer.classes) == [n for s in ("train", "val", "test") for n in sorted(expected[s])]


def test_mini_csv_folder_decodes_and_resizes_once(tmp_path):
    expected = write_mini_csv(tmp_path, source_size=100)
    fmt, writer = decode(mini, tmp_path)
    assert fmt == "csv"
    assert_same(writer, expected)
    assert next(iter(writer.classes.values())).shape[1:] == (3, 84, 84)


@needs_h5py
def test_mini_torchmeta_hdf5(tmp_path):
    expected = write_mini_hdf5(tmp_path)
    fmt, writer = decode(mini, tmp_path)
    assert fmt == "hdf5"
    assert_same(writer, expected)


@pytest.mark.parametrize("kw", [{}, {"protocol": "python2"}, {"protocol": 4}, {"protocol": 5}, {"subfolder": "tiered-imagenet"},
                                {"shuffle": True}, {"names": False}])
def test_tiered_png_pickles_with_categories(tmp_path, kw):
    expected, categories = write_tiered_pickles(tmp_path, **kw)
    fmt, writer = decode(tiered, tmp_path)
    assert fmt == "pickle"
    assert_same(writer, expected)
    assert writer.meta["categories"] == categories
    sizes = {len(v) for v in writer.classes.values()}
    assert len(sizes) > 1  # classes of unequal size survive


@needs_h5py
def test_tiered_torchmeta_hdf5(tmp_path):
    expected, categories = write_tiered_hdf5(tmp_path)
    fmt, writer = decode(tiered, tmp_path)
    assert fmt == "hdf5"
    assert_same(writer, expected)
    assert writer.meta["categories"] == categories


def test_tiered_stream_lets_each_image_go(tmp_path):
    """The 12 GB train pickle is never held whole: items already handed on are freed while reading."""
    items = [np.full((5000, 1), i % 251, dtype=np.uint8) for i in range(2600)]
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps(items, protocol=2))
    del items
    refs, alive_late = [], []

    def sink(item):
        refs.append(weakref.ref(item))
        if len(refs) == 2500:  # two pickle batches (of 1000) later, the first batch must be gone
            alive_late.append(sum(r() is not None for r in refs[:1000]))

    tiered.stream_pickled_list(path, sink)
    assert len(refs) == 2600 and alive_late == [0]


# ------------------------------------------------------------------------------------------- missing files

def test_missing_files_name_every_format(tmp_path):
    message = one_line_error(lambda: mini.find_files(tmp_path), "no miniImageNet files",
                             str(tmp_path / "miniimagenet"), "mini-imagenet-cache-train.pkl", "train.csv",
                             "images/", "train_data.hdf5", "train_labels.json", "metarun[hdf5]")
    assert message == "no miniImageNet files in " + str(tmp_path / "miniimagenet") + "; " + mini.layout(tmp_path)
    one_line_error(lambda: tiered.find_files(tmp_path), "no tieredImageNet files", "train_images_png.pkl",
                   "test_labels.pkl", "tiered-imagenet/", "val_data.hdf5")


def test_partial_files_name_the_missing_ones(tmp_path):
    write_mini_pickles(tmp_path)
    (tmp_path / "miniimagenet" / "mini-imagenet-cache-val.pkl").unlink()
    message = one_line_error(lambda: mini.find_files(tmp_path), "missing mini-imagenet-cache-val.pkl")
    assert "mini-imagenet-cache-train.pkl," not in message.split(";")[0]
    write_tiered_pickles(tmp_path)
    (tmp_path / "tieredimagenet" / "test_labels.pkl").unlink()
    one_line_error(lambda: tiered.find_files(tmp_path), "missing test_labels.pkl")


def test_csv_without_images_folder(tmp_path):
    write_mini_csv(tmp_path, per_class=1)
    (tmp_path / "miniimagenet" / "images").rename(tmp_path / "miniimagenet" / "imgs")
    one_line_error(lambda: mini.find_files(tmp_path), "images/")


def test_hdf5_files_without_h5py_say_how_to_install(tmp_path, monkeypatch):
    for name in mini.split_files("hdf5"):
        (tmp_path / "miniimagenet").mkdir(exist_ok=True)
        (tmp_path / "miniimagenet" / name).write_bytes(b"x")
    monkeypatch.setattr(mini, "have_h5py", lambda: False)
    one_line_error(lambda: mini.find_files(tmp_path), "h5py is not installed", "metarun[hdf5]")


# ------------------------------------------------------------------------------------------- bad files

HTML = b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>"


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def _mini_decode(root):
    return lambda: decode(mini, root)


def _tiered_decode(root):
    return lambda: decode(tiered, root)


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(HTML), "HTML page"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    (lambda p: p.write_bytes(pickle.dumps({"image_data": _Evil(), "class_dict": {}})), "posix.system"),
    (lambda p: p.write_bytes(pickle.dumps({"images": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {}})),
     "'image_data'"),
    (lambda p: p.write_bytes(pickle.dumps({"image_data": np.zeros((2, 32, 32, 3), np.uint8), "class_dict": {"a": [0]}})),
     "uint8 (N, 84, 84, 3)"),
    (lambda p: p.write_bytes(pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.float32), "class_dict": {"a": [0]}})),
     "float32"),
    (lambda p: p.write_bytes(pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 7]}})),
     "names image 7"),
])
def test_bad_mini_pickle_is_one_line_naming_the_file(tmp_path, damage, needle):
    write_mini_pickles(tmp_path, per_class=2)
    path = tmp_path / "miniimagenet" / "mini-imagenet-cache-val.pkl"
    damage(path)
    message = one_line_error(_mini_decode(tmp_path), str(path), needle)
    assert "again" in message or "download" in message


def test_bad_csv_folder(tmp_path):
    roots = [tmp_path / str(i) for i in range(3)]
    for root in roots:
        write_mini_csv(root, per_class=2)
    image = sorted((roots[0] / "miniimagenet" / "images").iterdir())[0]
    image.write_bytes(b"not a jpeg")
    one_line_error(_mini_decode(roots[0]), image.name, "does not decode")
    image = sorted((roots[1] / "miniimagenet" / "images").iterdir())[-1]
    image.unlink()
    one_line_error(_mini_decode(roots[1]), image.name, "missing", "test.csv", "put the whole image folder")
    (roots[2] / "miniimagenet" / "val.csv").write_bytes(HTML)
    one_line_error(_mini_decode(roots[2]), "val.csv", "filename,label")


@needs_h5py
def test_bad_mini_hdf5(tmp_path):
    import h5py

    write_mini_hdf5(tmp_path, per_class=2)
    folder = tmp_path / "miniimagenet"
    (folder / "test_labels.json").write_text('["n99"]')
    one_line_error(_mini_decode(tmp_path), "test_data.hdf5", "datasets/n99")
    (folder / "test_data.hdf5").write_bytes(HTML)
    one_line_error(_mini_decode(tmp_path), "test_data.hdf5", "not an HDF5 file")
    with h5py.File(folder / "test_data.hdf5", "w") as f:
        f.create_dataset("images", data=np.zeros((1, 84, 84, 3), np.uint8))
    one_line_error(_mini_decode(tmp_path), "test_data.hdf5", "no group 'datasets'")
    (folder / "test_labels.json").write_text("{nope")
    one_line_error(_mini_decode(tmp_path), "test_labels.json")


def _labels(path):
    return pickle.loads(path.read_bytes())


@pytest.mark.parametrize("target, damage, needle", [
    ("images", lambda p: p.write_bytes(HTML), "HTML page"),
    ("images", lambda p: p.write_bytes(p.read_bytes()[:-300]), "truncated"),
    ("images", lambda p: p.write_bytes(pickle.dumps([_Evil()])), "posix.system"),
    ("images", lambda p: p.write_bytes(pickle.dumps([np.frombuffer(b"\x89PNG garbage" * 50, np.uint8).copy()
                                                      for _ in range(21)])), "does not decode"),
    ("images", lambda p: p.write_bytes(pickle.dumps([np.frombuffer(b"\x89PNG garbage" * 50, np.uint8)] * 21)),
     "repeats an earlier image"),
    ("images", lambda p: p.write_bytes(pickle.dumps(pickle.loads(p.read_bytes())[:2])), "holds 2 images but"),
    ("images", lambda p: p.write_bytes(pickle.dumps(pickle.loads(p.read_bytes()) * 2)), "more images than"),
    ("images", lambda p: p.write_bytes(pickle.dumps({"a": 1})), "list of PNG"),
    ("labels", lambda p: p.write_bytes(pickle.dumps({"label_specific": np.zeros(3, np.int64)})), "'label_general'"),
    ("labels", lambda p: p.write_bytes(pickle.dumps({**_labels(p), "label_specific": np.zeros(3, np.float32)})),
     "'label_specific'"),
    ("labels", lambda p: p.write_bytes(HTML), "HTML page"),
])
def test_bad_tiered_files_are_one_line_naming_the_file(tmp_path, target, damage, needle):
    write_tiered_pickles(tmp_path)
    path = tmp_path / "tieredimagenet" / ("val_images_png.pkl" if target == "images" else "val_labels.pkl")
    damage(path)
    one_line_error(_tiered_decode(tmp_path), path.name, needle)


def test_tiered_class_in_two_categories(tmp_path):
    write_tiered_pickles(tmp_path)
    path = tmp_path / "tieredimagenet" / "train_labels.pkl"
    labels = _labels(path)
    labels["label_general"] = np.arange(len(labels["label_general"])) % 2
    path.write_bytes(pickle.dumps(labels))
    one_line_error(_tiered_decode(tmp_path), "train_labels.pkl", "categories")


@needs_h5py
def test_bad_tiered_hdf5(tmp_path):
    import h5py

    write_tiered_hdf5(tmp_path)
    folder = tmp_path / "tieredimagenet"
    with h5py.File(folder / "val_data.hdf5", "a") as f:
        name = list(f["datasets"])[0]
        f["datasets"][name][0] = np.frombuffer(b"broken png bytes", np.uint8)
    one_line_error(_tiered_decode(tmp_path), "val_data.hdf5", "does not decode")
    (folder / "val_data.hdf5").write_bytes(io.BytesIO(HTML).read())
    one_line_error(_tiered_decode(tmp_path), "val_data.hdf5", "not an HDF5 file")


# ------------------------------------------------------------------------------------------- tasks over the store

import torch  # noqa: E402

from metarun.data.miniimagenet import MiniImageNetTasks  # noqa: E402
from metarun.data.tieredimagenet import TieredImageNetTasks  # noqa: E402


def mini_tasks(root, **kw):
    return MiniImageNetTasks(**{"ways": 2, "shots": 1, "queries": 2, "root": str(root),
                                "cache_dir": str(root / "cache"), **kw})


def test_mini_tasks_split_by_the_files_with_disjoint_classes(tmp_path):
    expected = write_mini_pickles(tmp_path)
    tasks = mini_tasks(tmp_path)
    store = tasks.store
    names = {s: {store.class_names[i] for i in tasks.split_class_indices[s].tolist()} for s in ("train", "val", "test")}
    assert names == {s: set(expected[s]) for s in expected}
    assert {len(v) for v in names.values()} == {5, 3} and not (names["train"] & names["val"] | names["val"] & names["test"])
    assert store.counts.tolist() == [6] * 11 and tuple(store.shape) == (3, 84, 84)
    assert tasks.summary()["split"].startswith("ravi: 5/3/3")
    episode = tasks.to("cpu").sample("val", 3, torch.Generator().manual_seed(0))
    assert episode.support_x.shape == (3, 2, 3, 84, 84) and episode.query_x.shape == (3, 4, 3, 84, 84)
    # each support image is a normalised image of the class the episode names, with MetaOptNet's statistics
    c = int(episode.classes[0, 0])
    raw = torch.from_numpy(expected["val"][store.class_names[c]]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(mini.MEAN).view(3, 1, 1), torch.tensor(mini.STD).view(3, 1, 1)
    normalised = (raw - mean) / std
    assert any(torch.allclose(episode.support_x[0, 0], im, atol=1e-5) for im in normalised)


def test_mini_formats_give_the_same_store(tmp_path):
    write_mini_pickles(tmp_path / "a")
    pickled = mini_tasks(tmp_path / "a").store
    if HAVE_H5PY:
        write_mini_hdf5(tmp_path / "b")
        other = mini_tasks(tmp_path / "b").store
        assert other.class_names == pickled.class_names and other.splits_of_class == pickled.splits_of_class
        assert other.path.read_bytes() == pickled.path.read_bytes()


def test_mini_is_decoded_once_and_again_when_a_file_changes(tmp_path, monkeypatch):
    write_mini_pickles(tmp_path)
    first = mini_tasks(tmp_path).store

    def no_decode(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(mini, "decode_into", no_decode)
    again = mini_tasks(tmp_path).store
    assert again.path == first.path and again.class_names == first.class_names
    monkeypatch.undo()
    write_mini_pickles(tmp_path, seed=1)  # a re-download with other content
    changed = mini_tasks(tmp_path).store
    assert changed.path != first.path
    assert changed.path.read_bytes() != first.path.read_bytes()


def test_csv_cache_key_follows_the_image_folder(tmp_path):
    write_mini_csv(tmp_path, per_class=3)
    first = mini_tasks(tmp_path).store
    image = sorted((tmp_path / "miniimagenet" / "images").iterdir())[0]
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((84, 84, 3), np.uint8)).save(image, format="JPEG")
    assert mini_tasks(tmp_path).store.path != first.path


def test_mini_tasks_without_files_say_where_they_go(tmp_path):
    with pytest.raises(DataError, match="no miniImageNet files") as e:
        mini_tasks(tmp_path)
    assert "mini-imagenet-cache-train.pkl" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="image_size 84"):
        mini_tasks(tmp_path, image_size=32)


def test_tiered_tasks_unequal_classes_categories_and_residencies(tmp_path):
    expected, categories = write_tiered_pickles(tmp_path)
    kw = {"ways": 2, "shots": 1, "queries": 2, "root": str(tmp_path), "cache_dir": str(tmp_path / "cache")}
    tasks = TieredImageNetTasks(**kw, residency="memmap")
    store = tasks.store
    assert store.meta["categories"] == categories
    assert {store.class_names[i]: int(store.counts[i]) for i in range(len(store.counts))} == \
        {n: len(v) for d in expected.values() for n, v in d.items()}
    sizes = {s: len(tasks.split_class_indices[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 4, "val": 2, "test": 3}
    device = TieredImageNetTasks(**kw, residency="device").to("cpu")
    a = tasks.to("cpu").sample("train", 4, torch.Generator().manual_seed(3))
    b = device.sample("train", 4, torch.Generator().manual_seed(3))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    with pytest.raises(DataError, match="smallest tieredImageNet"):
        TieredImageNetTasks(**{**kw, "queries": 5})


def test_class_dict_indices_that_are_not_integers_are_refused(tmp_path):
    # 0.5 would silently become image 0 (and "3" image 3): a class_dict of anything but integers is broken.
    import pickle

    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    images = np.zeros((4, 84, 84, 3), np.uint8)
    path = folder / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": images, "class_dict": {"n01": [0.5, 1.7]}}))
    with pytest.raises(DataError, match="not a list of image indices"):
        list(mini.read_pickle(path))


def test_a_truncated_pickle_says_so():
    import pickle

    data = pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.uint8)})
    with pytest.raises(DataError, match="is truncated .*download it again"):
        from metarun.data import safe_pickle

        safe_pickle.loads(data[: len(data) // 2], "x.pkl")
