"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of CIFAR-100.

Both are built from the official CIFAR-100 python archive (Krizhevsky 2009), downloaded and verified by
md5 into ``<data.root>/cifar100/cifar-100-python.tar.gz``. Its ``train`` and ``test`` pickles are pooled:
600 images of 32x32x3 per class, 100 classes; the class split is what differs.

- ``cifarfs``: 64 / 16 / 20 classes, chosen at random across superclasses. The lists are Bertinetto's
  split files (``data/cifar-fs/splits/bertinetto/{train,val,test}.txt`` of bertinetto/r2d2), as shipped
  by torchmeta (tristandeleu/pytorch-meta, ``torchmeta/datasets/assets/cifar100/cifar-fs/*.json``).
- ``fc100``: 60 / 20 / 20 classes split by the 20 CIFAR-100 superclasses, 12 / 4 / 4, so that test
  classes are semantically far from training ones. Superclass lists from Oreshkin et al. (TADAM) as
  shipped by torchmeta (``torchmeta/datasets/assets/cifar100/fc100/*.json``), the same split as
  MetaOptNet's ``FC100_{train,val,test}.pickle``. Those pickles (Python 2, latin-1 dicts with ``data``
  (N, 32, 32, 3) uint8 and ``labels``: CIFAR-100 fine-label ints) are read too, from
  ``<data.root>/fc100/``, when they are there and the official archive is not.

Every pickle is read with ``metarun.data.safe_pickle`` (numpy arrays only: a file cannot run code).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
from rich.progress import MofNCompleteColumn

from metarun.data import safe_pickle
from metarun.data.cache import StoreWriter
from metarun.data.images import ImageDataset, ImageTasks, default_store_dir
from metarun.data.official_archive import OfficialArchive, member_name_ok, stream_members
from metarun.data.store import ImageStore
from metarun.errors import DataError
from metarun.utils import stop
from metarun.utils.display import transient_progress

# ----------------------------------------------------------------------------------------- the class lists

# CIFAR-100's 20 superclasses ("coarse labels") and their 5 classes ("fine labels"), as named in the
# archive's ``meta`` pickle. Both label orders in the archive are alphabetical.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
COARSE_LABEL_NAMES: tuple[str, ...] = tuple(sorted(CIFAR100_SUPERCLASSES))
FINE_LABEL_NAMES: tuple[str, ...] = tuple(sorted(c for cs in CIFAR100_SUPERCLASSES.values() for c in cs))

# CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 classes.
CIFARFS_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge",
        "bus", "can", "castle", "caterpillar", "chair", "clock", "cloud", "cockroach",
        "couch", "cup", "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster",
        "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain",
        "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree",
        "plate", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal",
        "shrew", "skunk", "skyscraper", "snake", "spider", "squirrel", "streetcar", "sunflower",
        "tank", "tiger", "train", "trout", "tulip", "turtle", "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck",
        "plain", "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone",
        "wardrobe", "whale", "woman", "worm",
    ),
}

# FC100 (Oreshkin et al. 2018): 12 / 4 / 4 superclasses, hence 60 / 20 / 20 classes.
FC100_SUPERCLASS_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
FC100_SPLITS: dict[str, tuple[str, ...]] = {
    split: tuple(sorted(c for s in supers for c in CIFAR100_SUPERCLASSES[s]))
    for split, supers in FC100_SUPERCLASS_SPLITS.items()
}

# ----------------------------------------------------------------------------------------- the files

CIFAR100_ARCHIVE = OfficialArchive(
    title="CIFAR-100",
    folder="cifar100",
    filename="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    max_bytes=200_000_000,  # the archive is 169,001,437 bytes
)
_MEMBERS = ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")
# The train pickle is about 155 MB; a member above this is not CIFAR-100's.
MAX_MEMBER_BYTES = 400_000_000

METAOPTNET_FOLDER = "fc100"
METAOPTNET_FILES = {split: f"FC100_{split}.pickle" for split in ("train", "val", "test")}
MAX_METAOPTNET_BYTES = 500_000_000  # 36,000 images of 3 KB in the train file: about 111 MB

IMAGE_SIZE = 32
# CIFAR-100 training-set channel statistics, in [0, 1] units.
MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def _text(value) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _field(d: dict, key: str, source: str):
    """``d[key]`` whether the pickle's keys came out as bytes (Python 2 str under encoding="bytes") or str."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise DataError(f"{source} has no '{key}' entry: it is not CIFAR-100's; delete it so it is downloaded again")


def _labels(value, n: int, limit: int, what: str, source: str) -> np.ndarray:
    try:
        labels = np.asarray(value)
    except (TypeError, ValueError):
        labels = np.zeros(0)
    if labels.shape != (n,) or labels.dtype.kind not in "iu" or (n and (labels.min() < 0 or labels.max() >= limit)):
        raise DataError(f"{source}: '{what}' is not {n} integers in 0..{limit - 1}: the file is damaged or not "
                        f"CIFAR-100's; delete it so it is downloaded again")
    return labels.astype(np.int64)


def read_cifar100(path: Path, archive: OfficialArchive = CIFAR100_ARCHIVE) -> Iterator[tuple[str, np.ndarray]]:
    """(fine class name, uint8 (n, 3, 32, 32) images) for the 100 classes, in fine-label order, the ``train``
    pickle's images of a class first, then the ``test`` pickle's. Checks names, shapes, dtypes and that each
    fine class sits in its superclass."""
    pickles: dict[str, bytes] = {}
    for name, data in stream_members(archive, path, lambda n: n in _MEMBERS and member_name_ok(n), MAX_MEMBER_BYTES,
                                     stop.check):
        pickles[name.rsplit("/", 1)[-1]] = data
    missing = [m for m in _MEMBERS if m.rsplit("/", 1)[-1] not in pickles]
    if missing:
        raise archive.bad(path, f"it has no {', '.join(missing)} (truncated, or not the CIFAR-100 python archive)")

    def load(name: str):
        # Python 2 pickles: encoding="bytes" keeps the numpy buffers as the raw bytes they are.
        obj = safe_pickle.loads(pickles.pop(name), f"{path}:cifar-100-python/{name}", encoding="bytes")
        if not isinstance(obj, dict):
            raise archive.bad(path, f"cifar-100-python/{name} holds a {type(obj).__name__}, not a dict")
        return obj

    meta = load("meta")
    source = f"{path}:cifar-100-python/meta"
    fine = [_text(x) for x in _field(meta, "fine_label_names", source)]
    coarse = [_text(x) for x in _field(meta, "coarse_label_names", source)]
    if tuple(fine) != FINE_LABEL_NAMES or tuple(coarse) != COARSE_LABEL_NAMES:
        raise archive.bad(path, "its meta pickle does not name CIFAR-100's 100 classes and 20 superclasses")
    superclass_of = {c: coarse.index(s) for s, cs in CIFAR100_SUPERCLASSES.items() for c in cs}

    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for name in ("train", "test"):
        d = load(name)
        source = f"{path}:cifar-100-python/{name}"
        data = _field(d, "data", source)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise archive.bad(path, f"cifar-100-python/{name} 'data' is {got}, expected uint8 (N, 3072)")
        n = data.shape[0]
        labels = _labels(_field(d, "fine_labels", source), n, 100, "fine_labels", source)
        coarse_labels = _labels(_field(d, "coarse_labels", source), n, 20, "coarse_labels", source)
        expected = np.array([superclass_of[c] for c in FINE_LABEL_NAMES])[labels]
        if not np.array_equal(coarse_labels, expected):
            raise archive.bad(path, f"cifar-100-python/{name} puts classes in the wrong superclasses")
        parts.append((data.reshape(n, 3, IMAGE_SIZE, IMAGE_SIZE), labels))
    for index, class_name in enumerate(FINE_LABEL_NAMES):
        images = np.concatenate([data[labels == index] for data, labels in parts])
        if len(images) == 0:
            raise archive.bad(path, f"it has no image of class '{class_name}'")
        yield class_name, np.ascontiguousarray(images)


def metaoptnet_paths(root: Path) -> dict[str, Path]:
    folder = Path(root).expanduser() / METAOPTNET_FOLDER
    return {split: folder / name for split, name in METAOPTNET_FILES.items()}


def read_metaoptnet_fc100(paths: dict[str, Path]) -> Iterator[tuple[str, np.ndarray, str]]:
    """(fine class name, uint8 (n, 3, 32, 32) images, split) from MetaOptNet's three FC100 pickles, each
    split's classes in label order. A class in the wrong file (not FC100's split) is refused."""
    for split, path in paths.items():
        try:
            size = path.stat().st_size
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        if size > MAX_METAOPTNET_BYTES:
            raise DataError(f"{path} is {size} bytes, more than an FC100 pickle can take: it is not MetaOptNet's "
                            f"FC100_{split}.pickle")
        obj = safe_pickle.load(path, encoding="latin1")
        if not isinstance(obj, dict) or "data" not in obj or "labels" not in obj:
            raise DataError(f"{path} is not MetaOptNet's FC100 pickle (a dict with 'data' and 'labels'): "
                            f"replace it, or put the official {CIFAR100_ARCHIVE.filename} in "
                            f"{CIFAR100_ARCHIVE.path(Path(path).parent.parent)}")
        data = obj["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (32, 32, 3) \
                or data.ndim != 4:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: 'data' is {got}, expected uint8 (N, 32, 32, 3)")
        labels = _labels(obj["labels"], len(data), 100, "labels", str(path))
        present = sorted(set(labels.tolist()))
        wrong = [FINE_LABEL_NAMES[i] for i in present if FINE_LABEL_NAMES[i] not in FC100_SPLITS[split]]
        if wrong:
            raise DataError(f"{path} holds classes of another FC100 split ({', '.join(wrong[:3])}): it is not "
                            f"MetaOptNet's FC100_{split}.pickle")
        for index in present:
            stop.check()
            images = data[labels == index].transpose(0, 3, 1, 2)
            yield FINE_LABEL_NAMES[index], np.ascontiguousarray(images), split


def split_indices(class_names: list[str], splits: dict[str, tuple[str, ...]], title: str) -> dict[str, list[int]]:
    """Indices (into ``class_names``) of each split's classes; every listed class must be there."""
    position = {name: i for i, name in enumerate(class_names)}
    out = {}
    for split, names in splits.items():
        missing = [n for n in names if n not in position]
        if missing:
            raise DataError(f"the decoded {title} data lacks the {split} classes {', '.join(missing[:3])}: delete "
                            f"its cache so it is decoded again")
        out[split] = [position[n] for n in names]
    return out



# ----------------------------------------------------------------------------------------- the datasets

class CIFARFS(ImageDataset):
    """CIFAR-FS: Bertinetto et al. 2019, 64 / 16 / 20 CIFAR-100 classes, 600 images of 32x32x3 each."""

    name = "cifarfs"
    title = "CIFAR-FS"
    channels = 3
    image_size = IMAGE_SIZE
    mean, std = MEAN, STD
    split_names = ("bertinetto",)
    checksum = "md5"  # the official archive's, checked by locate()
    downloads = True
    class_splits: ClassVar[dict[str, tuple[str, ...]]] = CIFARFS_SPLITS
    source_folder = CIFAR100_ARCHIVE.folder  # where the files are, and the decoded store beside them

    def archive(self) -> OfficialArchive:
        return CIFAR100_ARCHIVE  # looked up when used: tests swap in the spec of their small archive

    def locate(self, download: bool) -> list[Path]:
        return [self.archive().locate(self.root, download)]

    def layout(self) -> str:
        spec = self.archive()
        return (f"{spec.path(self.root)}: the official CIFAR-100 python archive ({spec.url}, md5 {spec.md5}), "
                f"downloaded there when data.download is true")

    def decode(self, files: list[Path], writer: StoreWriter) -> None:
        with transient_progress(MofNCompleteColumn()) as progress:
            task = progress.add_task(f"decoding {self.title}", total=len(FINE_LABEL_NAMES))
            for name, images in read_cifar100(files[0], self.archive()):
                stop.check()
                writer.add_class(name, images)
                progress.advance(task)

    def split_classes(self, store: ImageStore) -> dict[str, list[int]]:
        return split_indices(list(store.class_names), self.class_splits, self.title)


class FC100(CIFARFS):
    """FC100: Oreshkin et al. 2018, 60 / 20 / 20 CIFAR-100 classes by superclass (12 / 4 / 4), from the
    official archive, or else from MetaOptNet's ``FC100_{train,val,test}.pickle`` in ``<root>/fc100/``."""

    name = "fc100"
    title = "FC100"
    split_names = ("oreshkin",)
    class_splits = FC100_SPLITS

    def __init__(self, root: Path, split: str, **options):
        super().__init__(root, split, **options)
        pickles = metaoptnet_paths(self.root)
        # The official archive when it is there; else MetaOptNet's three pickles; else download the archive.
        self.use_pickles = not self.archive().path(self.root).is_file() and all(p.is_file() for p in pickles.values())
        self.source_folder = METAOPTNET_FOLDER if self.use_pickles else CIFAR100_ARCHIVE.folder
        self.checksummed = not self.use_pickles  # MetaOptNet's pickles have no published checksum

    def locate(self, download: bool) -> list[Path]:
        pickles = metaoptnet_paths(self.root)
        if self.use_pickles:
            return list(pickles.values())
        spec = self.archive()
        if not spec.path(self.root).is_file() and not download:
            missing = [p.name for p in pickles.values() if not p.is_file()]
            raise DataError(f"{spec.path(self.root)} is missing and data.download is false: put the official "
                            f"{spec.filename} ({spec.url}) there, or MetaOptNet's {', '.join(METAOPTNET_FILES.values())} "
                            f"in {pickles['train'].parent} (missing: {', '.join(missing)}), or set data.download=true")
        return super().locate(download)

    def layout(self) -> str:
        return (f"{super().layout()}; or MetaOptNet's {', '.join(METAOPTNET_FILES.values())} in "
                f"{metaoptnet_paths(self.root)['train'].parent} (used when the archive is not there)")

    def decode(self, files: list[Path], writer: StoreWriter) -> None:
        if not self.use_pickles:
            return super().decode(files, writer)
        with transient_progress(MofNCompleteColumn()) as progress:
            task = progress.add_task(f"decoding {self.title}", total=len(FINE_LABEL_NAMES))
            for name, images, split in read_metaoptnet_fc100(dict(zip(METAOPTNET_FILES, files))):
                writer.add_class(name, images, split)
                progress.advance(task)


class _CIFARTasks(ImageTasks):
    def __init__(self, *args, channels: int, image_size: int, **kwargs):
        self.check_image_shape(channels, image_size)
        super().__init__(*args, **kwargs)

    def store_dir(self) -> Path:
        # Beside the source files (root/cifar100 or root/fc100), shared by nothing else; the user cache if
        # that folder is read-only.
        if self.cache_dir is not None:
            return self.cache_dir
        return default_store_dir(self.root, self.data.source_folder)


class CIFARFSTasks(_CIFARTasks):
    """N-way K-shot CIFAR-FS tasks (Bertinetto et al. 2019; split ``bertinetto``). The archive is read from
    ``<root>/cifar100/`` (downloaded if missing and ``download``); the other keys as ``ImageTasks``."""

    dataset = CIFARFS

    def __init__(self, ways: int, shots: int, queries: int, root: str, split: str = "bertinetto",
                 cache_dir: str | None = None, download: bool = True, residency: str = "auto",
                 memory_share: float = 0.5, normalize: bool = True, augment: tuple[str, ...] = (),
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None,
                 channels: int = 3, image_size: int = IMAGE_SIZE):
        super().__init__(ways, shots, queries, root, split, cache_dir, download, residency, memory_share, normalize,
                         augment, train_ways, train_shots, train_queries, channels=channels, image_size=image_size)


class FC100Tasks(_CIFARTasks):
    """N-way K-shot FC100 tasks (Oreshkin et al. 2018; split ``oreshkin``). Read from ``<root>/cifar100/``'s
    official archive (downloaded if missing and ``download``), or MetaOptNet's pickles in ``<root>/fc100/``."""

    dataset = FC100

    def __init__(self, ways: int, shots: int, queries: int, root: str, split: str = "oreshkin",
                 cache_dir: str | None = None, download: bool = True, residency: str = "auto",
                 memory_share: float = 0.5, normalize: bool = True, augment: tuple[str, ...] = (),
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None,
                 channels: int = 3, image_size: int = IMAGE_SIZE):
        super().__init__(ways, shots, queries, root, split, cache_dir, download, residency, memory_share, normalize,
                         augment, train_ways, train_shots, train_queries, channels=channels, image_size=image_size)
