"""Small miniImageNet and tieredImageNet fixtures in the real on-disk formats, for tests.

Same file names, keys, dtypes and layouts as the files researchers share (see the docstrings of
metarun/data/miniimagenet.py and tieredimagenet.py), with a few classes of a few 84x84 images each.
Every writer returns what a correct reader must decode: {split: {class name: uint8 (n, 84, 84, 3)}}.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
MINI_CLASSES = {"train": 5, "val": 3, "test": 3}  # wnid-like names, unique across splits
SIZE = 84


def _wnid(split: str, i: int) -> str:
    return f"n{SPLITS.index(split) + 1:02d}{i:06d}"


def _images(rng: np.random.Generator, n: int, size: int = SIZE) -> np.ndarray:
    # smooth-ish images (a gradient plus noise) so that JPEG/PNG round trips stay close
    base = rng.integers(0, 256, size=(n, 1, 1, 3))
    noise = rng.integers(0, 32, size=(n, size, size, 3))
    ramp = np.linspace(0, 64, size).astype(np.int64)[None, :, None, None]
    return np.clip(base + noise + ramp, 0, 255).astype(np.uint8)


def mini_classes(per_class: int = 6, seed: int = 0, classes: dict[str, int] = MINI_CLASSES):
    rng = np.random.default_rng(seed)
    return {s: {_wnid(s, i): _images(rng, per_class) for i in range(n)} for s, n in classes.items()}


def write_mini_pickles(root: Path, per_class: int = 6, seed: int = 0, classes: dict[str, int] = MINI_CLASSES,
                       protocol: int = 4):
    """``<root>/miniimagenet/mini-imagenet-cache-{split}.pkl``: {'image_data': (N, 84, 84, 3) uint8,
    'class_dict': {wnid: [indices]}}, classes interleaved in the file to check the indices are honoured."""
    expected = mini_classes(per_class, seed, classes)
    folder = Path(root) / "miniimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    for split, by_class in expected.items():
        names = list(by_class)[::-1]  # not sorted: the reader sorts
        stacked = np.stack([by_class[n] for n in names], axis=1)  # (per_class, classes, ...): interleaved
        image_data = stacked.reshape(-1, SIZE, SIZE, 3)
        class_dict = {n: list(range(j, len(image_data), len(names))) for j, n in enumerate(names)}
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, f, protocol=protocol)
    return expected


def write_mini_csv(root: Path, per_class: int = 3, seed: int = 0, classes: dict[str, int] = MINI_CLASSES,
                   source_size: int = SIZE):
    """Ravi's layout: ``train.csv``/``val.csv``/``test.csv`` (filename,label) and ``images/*.jpg``, JPEG as in
    the release; ``source_size`` other than 84 writes larger images that the reader must resize."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "miniimagenet"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    expected = {}
    for split, n in classes.items():
        expected[split] = {}
        rows = []
        for i in range(n):
            wnid = _wnid(split, i)
            decoded = []
            for k, image in enumerate(_images(rng, per_class, source_size)):
                name = f"{wnid}{k + 1:08d}.jpg"
                Image.fromarray(image).save(folder / "images" / name, format="JPEG", quality=95)
                with Image.open(folder / "images" / name) as im:
                    im = im.convert("RGB")
                    if im.size != (SIZE, SIZE):
                        im = im.resize((SIZE, SIZE), Image.LANCZOS)
                    decoded.append(np.asarray(im))
                rows.append((name, wnid))
            expected[split][wnid] = np.stack(decoded)
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            w.writerows(rows)
    return expected


def write_mini_hdf5(root: Path, per_class: int = 6, seed: int = 0, classes: dict[str, int] = MINI_CLASSES):
    """torchmeta's cache: ``{split}_data.hdf5`` (group 'datasets', one (n, 84, 84, 3) uint8 dataset per wnid)
    and ``{split}_labels.json`` (the sorted wnids), as torchmeta.datasets.MiniImagenet writes them."""
    import h5py

    expected = mini_classes(per_class, seed, classes)
    folder = Path(root) / "miniimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    for split, by_class in expected.items():
        with h5py.File(folder / f"{split}_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for name, images in by_class.items():
                group.create_dataset(name, data=images)
        (folder / f"{split}_labels.json").write_text(json.dumps(sorted(by_class)))
    return expected


# ------------------------------------------------------------------------------------------- tiered

# (classes per split, categories per split); classes of unequal size as in the real data
TIERED_CLASSES = {"train": (4, 2), "val": (2, 1), "test": (3, 2)}


def _png(image: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    # cv2.imencode's output, as Ren et al. stored it: a uint8 (k, 1) array of the PNG bytes
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).reshape(-1, 1).copy()


def tiered_classes(seed: int = 0, classes=TIERED_CLASSES, sizes=(3, 5, 4, 6)):
    """{split: [(class name, category name, images)]}; class i of a split has sizes[i % len(sizes)] images."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, (n, n_cat) in classes.items():
        out[split] = [(_wnid(split, i), f"{split}_cat{i % n_cat}", _images(rng, sizes[i % len(sizes)]))
                      for i in range(n)]
    return out


def write_tiered_pickles(root: Path, seed: int = 0, classes=TIERED_CLASSES, protocol: int | str = 2,
                         names: bool = True, subfolder: str = "", shuffle: bool = False):
    """Ren et al.'s release: ``{split}_images_png.pkl`` (a list of PNG byte arrays) and ``{split}_labels.pkl``
    ({'label_specific', 'label_general', 'label_specific_str', 'label_general_str'}); images sorted by class
    as in the release unless ``shuffle``. Returns {split: {class: images}} and {class: category}."""
    folder = Path(root) / "tieredimagenet" / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    data = tiered_classes(seed, classes)
    expected, categories = {}, {}
    for split, rows in data.items():
        cat_names = sorted({cat for _, cat, _ in rows})
        flat, specific, general = [], [], []
        for c, (name, cat, images) in enumerate(rows):
            for image in images:
                flat.append(image)
                specific.append(c)
                general.append(cat_names.index(cat))
        pngs = [_png(image) for image in flat]
        order = np.arange(len(pngs))
        if shuffle:
            order = np.random.default_rng(seed + 1).permutation(len(pngs))
        labels = {"label_specific": np.array(specific)[order], "label_general": np.array(general)[order]}
        if names:
            labels["label_specific_str"] = [name for name, _, _ in rows]
            labels["label_general_str"] = cat_names
        with open(folder / f"{split}_images_png.pkl", "wb") as f:
            if protocol == "python2":
                f.write(python2_pickle([pngs[i] for i in order]))
            else:
                pickle.dump([pngs[i] for i in order], f, protocol=protocol)
        with open(folder / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(labels, f, protocol=2 if protocol == "python2" else protocol)
        expected[split] = {}
        for c, (name, cat, images) in enumerate(rows):
            key = name if names else f"{split}-{c:03d}"
            expected[split][key] = np.stack([flat[i] for i in order if specific[i] == c])  # in file order
            categories[key] = cat if names else f"{split}-category-{cat_names.index(cat):02d}"
    return expected, categories


def write_tiered_hdf5(root: Path, seed: int = 0, classes=TIERED_CLASSES):
    """torchmeta's tieredImageNet cache: ``{split}_data.hdf5`` (group 'datasets', one vlen-uint8 dataset of
    PNG bytes per class with attrs 'label_general' and 'label_specific') and ``{split}_labels.json``."""
    import h5py

    folder = Path(root) / "tieredimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    expected, categories = {}, {}
    for split, rows in tiered_classes(seed, classes).items():
        expected[split] = {}
        with h5py.File(folder / f"{split}_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for name, cat, images in rows:
                ds = group.create_dataset(name, (len(images),), dtype=h5py.special_dtype(vlen=np.uint8))
                ds.attrs["label_general"] = cat
                ds.attrs["label_specific"] = name
                for j, image in enumerate(images):
                    ds[j] = _png(image).reshape(-1)
                expected[split][name] = images
                categories[name] = cat
        (folder / f"{split}_labels.json").write_text(json.dumps([name for name, _, _ in rows]))
    return expected, categories


class RecordingWriter:
    """Stands in for StoreWriter where a test checks only what a reader hands on."""

    def __init__(self):
        self.classes: dict[str, np.ndarray] = {}
        self.splits: dict[str, str | None] = {}
        self.meta: dict = {}

    def add_class(self, name, images, split=None):
        assert name not in self.classes, name
        self.classes[name] = np.asarray(images)
        self.splits[name] = split


def python2_pickle(arrays: list[np.ndarray]) -> bytes:
    """A list of uint8 arrays pickled as Python 2's cPickle (protocol 2) writes it, as in Ren et al.'s
    ``{split}_images_png.pkl``: numpy.core.multiarray globals, byte strings as BINSTRING, every object
    memoised with BINPUT/LONG_BINPUT. (Python 3 cannot write these itself.)"""
    import struct

    memo = [0]

    def put() -> bytes:
        memo[0] += 1
        i = memo[0]
        return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)

    def short(s: bytes) -> bytes:
        return b"U" + bytes([len(s)]) + s

    def integer(i: int) -> bytes:
        return b"K" + bytes([i]) if i < 256 else b"J" + struct.pack("<i", i)

    out = [b"\x80\x02]q\x00"]
    for start in range(0, len(arrays), 1000):
        out.append(b"(")
        for a in arrays[start:start + 1000]:
            assert a.dtype == np.uint8 and a.ndim == 2
            out += [b"cnumpy.core.multiarray\n_reconstruct\n", put(), b"cnumpy\nndarray\n", put(),
                    integer(0), b"\x85", put(), short(b"b"), put(), b"\x87", put(), b"R", put(),
                    b"(", integer(1), integer(a.shape[0]), integer(a.shape[1]), b"\x86", put(),
                    b"cnumpy\ndtype\n", put(), short(b"u1"), integer(0), integer(1), b"\x87", put(), b"R", put(),
                    b"(", integer(3), short(b"|"), b"NNN", b"J\xff\xff\xff\xff", b"J\xff\xff\xff\xff", integer(0),
                    b"t", put(), b"b", b"\x89", b"T" + struct.pack("<I", a.nbytes) + a.tobytes(), put(),
                    b"t", put(), b"b"]
        out.append(b"e")
    out.append(b".")
    return b"".join(out)
