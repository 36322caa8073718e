"""tieredImageNet few-shot tasks (Ren et al., "Meta-Learning for Semi-Supervised Few-Shot Classification", ICLR 2018).

608 ImageNet classes grouped in 34 high-level categories, split by category: 351 classes (20 categories)
for training, 97 (6) for validation, 160 (8) for testing; 779,165 images at 84x84x3, classes of
unequal size (732 to 1300 images). The split is the files' own. There is no official download; the
files are read from ``<data.root>/tieredimagenet/`` in either format researchers share:

- Ren et al.'s release (``tiered-imagenet.tar``): ``{split}_images_png.pkl``, a pickled list of
  PNG-encoded images (uint8 arrays of the PNG bytes), with ``{split}_labels.pkl``, a dict with
  ``label_specific`` (class of each image), ``label_general`` (its category) and, in most copies,
  ``label_specific_str``/``label_general_str`` (their names). Accepted directly in the folder or in
  the tar's ``tiered-imagenet/`` subfolder. The image pickle (about 12 GB for train) is streamed: each
  image is handed on as it is unpickled and a class is decoded (PIL) and written as soon as it is
  complete, so with the release's class-sorted files one class is in memory at a time;
- torchmeta's cache ``{split}_data.hdf5`` (group ``datasets``, one variable-length uint8 dataset of
  PNG bytes per class, with attribute ``label_general``) and ``{split}_labels.json`` (class names),
  when h5py is installed (``metarun[hdf5]``).

Every class's category is recorded in the store's meta (``categories``: {class name: category}).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from rich.progress import MofNCompleteColumn

from metarun.data import safe_pickle
from metarun.data.images import ImageTasks
from metarun.data.miniimagenet import (FILE_SPLITS, HDF5, HDF5_EXTRA, HDF5_LABELS, IMAGE_SIZE, MEAN, STD,
                                       MiniImageNet, decode_image, have_h5py, load_pickle, torchmeta_hdf5)
from metarun.errors import DataError
from metarun.utils import stop
from metarun.utils.display import transient_progress

__all__ = ["TieredImageNet", "TieredImageNetTasks", "layout", "find_files", "decode_into", "stream_pickled_list"]

FOLDER = "tieredimagenet"
TAR_FOLDER = "tiered-imagenet"  # what tiered-imagenet.tar unpacks into
IMAGES_PKL = "{}_images_png.pkl"
LABELS_PKL = "{}_labels.pkl"
FORMATS = ("pickle", "hdf5")
_BULKY = 4096  # bytes: objects at least this big (images) are never referenced twice in the pickle


def split_files(fmt: str) -> list[str]:
    """File names of one format: the three image (or data) files, then the three label files."""
    if fmt == "pickle":
        return [IMAGES_PKL.format(s) for s in FILE_SPLITS] + [LABELS_PKL.format(s) for s in FILE_SPLITS]
    if fmt == "hdf5":
        return [HDF5.format(s) for s in FILE_SPLITS] + [HDF5_LABELS.format(s) for s in FILE_SPLITS]
    raise ValueError(fmt)


def layout(root: Path | str) -> str:
    folder = Path(root) / FOLDER
    return (f"tieredImageNet has no official download; put one of these in {folder}/: "
            f"{', '.join(split_files('pickle'))} (Ren et al.'s release, also read from its {TAR_FOLDER}/ folder), "
            f"or {', '.join(split_files('hdf5'))} (torchmeta's cache; needs {HDF5_EXTRA})")


def find_files(root: Path | str) -> tuple[str, list[Path]]:
    """The format found under ``<root>/tieredimagenet/`` and its files; a DataError naming what to put where."""
    folder = Path(root) / FOLDER
    partial = []
    for fmt, where in (("pickle", folder), ("pickle", folder / TAR_FOLDER), ("hdf5", folder)):
        paths = [where / name for name in split_files(fmt)]
        present = [p.is_file() for p in paths]
        if all(present):
            if fmt == "hdf5" and not have_h5py():
                raise DataError(f"{folder} holds torchmeta's HDF5 files but h5py is not installed: {HDF5_EXTRA}")
            return fmt, paths
        if any(present):
            partial += [str(p.relative_to(folder)) for p, ok in zip(paths, present) if not ok]
    missing = f"missing {', '.join(partial)} in {folder}; " if partial else f"no tieredImageNet files in {folder}; "
    raise DataError(missing + layout(root))


# ---------------------------------------------------------------------------------------------- pickles


_FORGOTTEN = type("_Forgotten", (), {"__repr__": lambda self: "<an image already handed on>"})()


class _StreamingUnpickler(pickle._Unpickler):
    """safe_pickle's restriction (numpy arrays and builtins only), and each item of the top-level list
    is handed to ``sink`` as soon as it is read instead of being kept: a pickled list of PNGs is then
    read in bounded memory. Arrays and large strings are not memoised either (an image is never
    referenced twice)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, sink, encoding: str):
        super().__init__(file, encoding=encoding)
        self._sink = sink

    def find_class(self, module: str, name: str):
        if (module, name) in safe_pickle._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a data file never needs")

    def _outer_list(self):
        if not self.metastack and len(self.stack) == 1 and type(self.stack[0]) is list:
            return self.stack[0]
        return None

    def _append(self):
        value = self.stack.pop()
        if self._outer_list() is not None:
            self._sink(value)
        else:
            self.stack[-1].append(value)

    def _appends(self):
        items = self.pop_mark()
        if self._outer_list() is not None:
            for item in items:
                self._sink(item)
        else:
            self.stack[-1].extend(items)

    def _remember(self, key):
        value = self.stack[-1]
        # An array is memoised while still empty (BUILD fills it in later), so arrays are never kept.
        bulky = isinstance(value, np.ndarray) or (isinstance(value, (bytes, bytearray, str)) and len(value) >= _BULKY)
        self.memo[key] = _FORGOTTEN if bulky else value

    def _binput(self):
        self._remember(self.read(1)[0])

    def _long_binput(self):
        self._remember(int.from_bytes(self.read(4), "little"))

    def _memoize(self):
        self._remember(len(self.memo))

    def _put(self):
        self._remember(int(self.readline()[:-1].decode("ascii")))

    dispatch[pickle.APPEND[0]] = _append
    dispatch[pickle.APPENDS[0]] = _appends
    dispatch[pickle.BINPUT[0]] = _binput
    dispatch[pickle.LONG_BINPUT[0]] = _long_binput
    dispatch[pickle.MEMOIZE[0]] = _memoize
    dispatch[pickle.PUT[0]] = _put


def stream_pickled_list(path: Path, sink, encoding: str = "latin1") -> None:
    """Call ``sink(item)`` for each item of the list pickled in ``path``, in order, without keeping them.
    A pickled array of objects (not a list) is accepted too, though then read whole."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if head[:1] == b"<" or head[:2] == b"PK":
                safe_pickle.loads(head, path)  # raises its one-line HTML / zip message
            f.seek(0)
            rest = _StreamingUnpickler(f, sink, encoding).load()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"{path} is not a plain data pickle: {e}; download it again from a source you trust") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            UnicodeDecodeError, OverflowError, pickle.PickleError) as e:
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}): download it again") from None
    if isinstance(rest, np.ndarray) and rest.dtype == object:
        rest = list(rest.reshape(-1))
    if not isinstance(rest, list):
        raise DataError(f"{path} should hold a list of PNG-encoded images, got {type(rest).__name__}: "
                        f"it is not tieredImageNet's images file; download it again")
    for item in rest:
        sink(item)


def _labels(path: Path, split: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(class index of each image, class names, category name of each class) from ``{split}_labels.pkl``."""
    data = load_pickle(path)
    if not isinstance(data, dict) or not {"label_specific", "label_general"} <= set(data):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path} should be a dict with keys 'label_specific' and 'label_general', got {keys}: "
                        f"it is not tieredImageNet's labels file; download it again")
    arrays = {}
    for key in ("label_specific", "label_general"):
        a = np.asarray(data[key]) if isinstance(data[key], (np.ndarray, list)) else None
        if a is None or a.ndim != 1 or a.size == 0 or a.dtype.kind not in "iu" or a.min() < 0:
            raise DataError(f"{path}: '{key}' should be a non-empty list of class indices (one per image); "
                            f"download it again")
        arrays[key] = a.astype(np.int64)
    specific, general = arrays["label_specific"], arrays["label_general"]
    if len(specific) != len(general):
        raise DataError(f"{path}: 'label_specific' has {len(specific)} entries but 'label_general' {len(general)}; "
                        f"download it again")
    n_classes = int(specific.max()) + 1

    def names(key: str, needed: int, default) -> list[str]:
        value = data.get(key)
        if value is None:
            return [default(i) for i in range(needed)]
        value = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
        if value is None or len(value) < needed:
            raise DataError(f"{path}: '{key}' should name each of the {needed} labels; download it again")
        return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in value]

    class_names = names("label_specific_str", n_classes, lambda i: f"{split}-{i:03d}")
    category_names = names("label_general_str", int(general.max()) + 1, lambda i: f"{split}-category-{i:02d}")
    categories = [""] * n_classes
    for c in np.unique(specific):
        g = np.unique(general[specific == c])
        if len(g) != 1:
            raise DataError(f"{path}: class {class_names[c]} has images in {len(g)} categories of 'label_general'; "
                            f"download it again")
        categories[c] = category_names[int(g[0])]
    return specific, class_names, categories


def _png_bytes(item, source: str) -> bytes:
    if item is _FORGOTTEN:
        raise DataError(f"{source} repeats an earlier image object, which tieredImageNet's files never do: "
                        f"download the file again")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):  # a Python 2 str read with latin1
        return item.encode("latin1")
    raise DataError(f"{source} is {type(item).__name__}, not PNG bytes: the file is not tieredImageNet's; "
                    f"download it again")


def _decode_class(encoded: list[bytes], source: str) -> np.ndarray:
    images = np.empty((len(encoded), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, data in enumerate(encoded):
        images[i] = decode_image(data, f"{source} image {i}").transpose(2, 0, 1)
    return images


def _decode_pickles(images_path: Path, labels_path: Path, split: str, writer, progress, bar,
                    labels: tuple[np.ndarray, list[str], list[str]]) -> dict[str, str]:
    specific, class_names, categories = labels
    counts = np.bincount(specific, minlength=len(class_names))
    pending: dict[int, list[bytes]] = {}
    seen = 0
    written: dict[str, str] = {}

    def sink(item) -> None:
        nonlocal seen
        if seen >= len(specific):
            raise DataError(f"{images_path} holds more images than the {len(specific)} {labels_path.name} labels: "
                            f"the two files are from different releases; download them again")
        c = int(specific[seen])
        pending.setdefault(c, []).append(_png_bytes(item, f"{images_path} item {seen}"))
        seen += 1
        if len(pending[c]) == counts[c]:  # the class is complete: decode it and let its PNGs go
            stop.check()
            name = class_names[c]
            writer.add_class(name, _decode_class(pending.pop(c), f"{images_path}, class {name},"), split=split)
            written[name] = categories[c]
            progress.advance(bar, int(counts[c]))

    stream_pickled_list(images_path, sink)
    if seen != len(specific):
        raise DataError(f"{images_path} holds {seen} images but {labels_path.name} labels {len(specific)}: "
                        f"the file is truncated or from another release; download it again")
    return written


# ---------------------------------------------------------------------------------------------- hdf5


def _decode_hdf5(path: Path, labels_path: Path, split: str, writer, progress, bar) -> dict[str, str]:
    written = {}
    with torchmeta_hdf5(path, labels_path) as (labels, group, h5py):
        for name in labels:
            stop.check()
            ds = group.get(name)
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or len(ds) == 0:
                raise DataError(f"{path}: 'datasets/{name}', which {labels_path.name} names, should be a list of "
                                f"PNG-encoded images; rebuild the files with torchmeta")
            try:
                encoded = [_png_bytes(np.asarray(ds[j]), f"{path} 'datasets/{name}'[{j}]") for j in range(len(ds))]
                category = ds.attrs.get("label_general", "")
            except (OSError, ValueError, TypeError) as e:
                raise DataError(f"{path}: 'datasets/{name}' cannot be read ({e}): the file is damaged; rebuild it") from None
            writer.add_class(name, _decode_class(encoded, f"{path} 'datasets/{name}'"), split=split)
            written[name] = category.decode() if isinstance(category, bytes) else str(category)
            progress.advance(bar, len(encoded))
    return written


def decode_into(fmt: str, files: list[Path], writer) -> None:
    """Write every class of the three splits to ``writer`` (a StoreWriter) tagged with its split, as uint8
    (n, 3, 84, 84), and each class's category to ``writer.meta['categories']``."""
    progress = transient_progress(MofNCompleteColumn())
    categories: dict[str, str] = {}
    labels = None
    if fmt == "pickle":  # the small label files first: a bad one fails before gigabytes of images are read
        labels = [_labels(files[i + 3], split) for i, split in enumerate(FILE_SPLITS)]
    with progress:
        bar = progress.add_task("decoding tieredImageNet", total=sum(len(x[0]) for x in labels) if labels else None)
        for i, split in enumerate(FILE_SPLITS):
            if fmt == "pickle":
                written = _decode_pickles(files[i], files[i + 3], split, writer, progress, bar, labels[i])
            else:
                written = _decode_hdf5(files[i], files[i + 3], split, writer, progress, bar)
            for name, category in written.items():
                if name in categories:
                    raise DataError(f"class {name} is in two splits ({files[i].name} and another): the files are "
                                    f"not one tieredImageNet release; download them again")
                categories[name] = category
    writer.meta["categories"] = categories


# ---------------------------------------------------------------------------------------------- dataset


class TieredImageNet(MiniImageNet):
    """tieredImageNet files under ``<root>/tieredimagenet/`` in either accepted format (module docstring):
    read as miniImageNet's are (the files define the split), with this module's readers."""

    name = "tieredimagenet"
    title = "tieredImageNet"
    channels = 3
    image_size = IMAGE_SIZE
    # MetaOptNet (Lee et al. 2019, data/tiered_imagenet.py) normalises tieredImageNet with miniImageNet's statistics.
    mean, std = MEAN, STD
    split_names = ("ren",)  # Ren et al.'s 351/97/160 classes (20/6/8 categories), defined by the files
    find_files, layout_of, decode_into = staticmethod(find_files), staticmethod(layout), staticmethod(decode_into)


class TieredImageNetTasks(ImageTasks):
    """N-way K-shot tieredImageNet tasks (Ren et al. 2018) on its 351/97/160-class split by category.

    ``ways``/``shots``/``queries`` set the validation and test tasks, ``train_ways``/``train_shots``/
    ``train_queries`` (None: the same) the meta-training tasks. The files are read from
    ``<root>/tieredimagenet/`` (no official download exists: a missing file is an error saying what to
    put where) and decoded once into ``cache_dir`` (None: beside the files, or the user cache); the
    store (16.5 GB) is read from disk per batch unless it fits in ``memory_share`` of the device.
    ``residency``, ``normalize`` (MetaOptNet's channel statistics) and ``augment`` as for every image
    dataset (``metarun.data.images.ImageTasks``). Each class's category is in ``store.meta['categories']``.

    Usage: ``metarun train data=tieredimagenet model=resnet12``."""

    dataset = TieredImageNet

    def __init__(self, ways: int, shots: int, queries: int, root: str, split: str = "ren",
                 cache_dir: str | None = None, download: bool = True, channels: int = 3, image_size: int = IMAGE_SIZE,
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None,
                 residency: str = "auto", memory_share: float = 0.5, normalize: bool = True,
                 augment: tuple[str, ...] = ()):
        self.check_image_shape(channels, image_size)
        super().__init__(ways, shots, queries, root, split, cache_dir, download, residency, memory_share, normalize,
                         augment, train_ways, train_shots, train_queries)
