"""miniImageNet few-shot tasks (Vinyals et al. 2016) under Ravi & Larochelle's split (ICLR 2017).

100 ImageNet classes of 600 images each at 84x84x3, split 64 / 16 / 20 into train / validation / test.
The split is the files' own: every accepted format ships one file (or set of files) per split, and
the classes are tagged with it when decoded. miniImageNet has no official download, so the files are
the ones researchers share, read from ``<data.root>/miniimagenet/`` in any of three formats:

- the pickles ``mini-imagenet-cache-{train,val,test}.pkl`` (Ren et al.'s few-shot-ssl release): a dict
  with ``image_data``, uint8 (N, 84, 84, 3), and ``class_dict``, {wnid: [indices into image_data]};
  read with a restricted unpickler (``metarun.data.safe_pickle``), never ``pickle.load``;
- Ravi's image folder: ``train.csv``/``val.csv``/``test.csv`` (header ``filename,label``) with the
  images in ``images/`` beside them, decoded with PIL and resized once to 84x84 with LANCZOS (what
  the widely used mini-imagenet-tools script does; Ravi's released images are already 84x84 and are
  then kept as they are);
- torchmeta's cache ``{split}_data.hdf5`` (group ``datasets``, one uint8 (600, 84, 84, 3) dataset per
  wnid) with ``{split}_labels.json`` (the sorted wnids), when h5py is installed (``metarun[hdf5]``).

Classes are stored split by split, each split's wnids in sorted order, so every format gives the same
store and the same episodes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import MofNCompleteColumn

from metarun.data import safe_pickle
from metarun.data.images import ImageDataset, ImageTasks
from metarun.errors import DataError
from metarun.utils import stop
from metarun.utils.display import transient_progress

FOLDER = "miniimagenet"
FILE_SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84
# Channel statistics of miniImageNet's training images, as MetaOptNet (Lee et al. 2019,
# data/mini_imagenet.py) and FEAT normalise with them; in [0, 1] units.
MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)
STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)

PICKLE = "mini-imagenet-cache-{}.pkl"
CSV = "{}.csv"
IMAGES_DIR = "images"
HDF5 = "{}_data.hdf5"
HDF5_LABELS = "{}_labels.json"
HDF5_EXTRA = "pip install 'metarun[hdf5]'"  # how a user gets h5py


def have_h5py() -> bool:
    try:
        import h5py  # noqa: F401
    except ImportError:
        return False
    return True


def split_files(fmt: str) -> list[str]:
    """The file names of one format, in (train, val, test) order; hdf5 gives data files then label files."""
    if fmt == "pickle":
        return [PICKLE.format(s) for s in FILE_SPLITS]
    if fmt == "csv":
        return [CSV.format(s) for s in FILE_SPLITS]
    if fmt == "hdf5":
        return [HDF5.format(s) for s in FILE_SPLITS] + [HDF5_LABELS.format(s) for s in FILE_SPLITS]
    raise ValueError(fmt)


FORMATS = ("pickle", "csv", "hdf5")  # the order in which a folder holding several is read


def layout(root: Path | str) -> str:
    """Where the files go, in one line (errors, README, ``metarun data``)."""
    folder = Path(root) / FOLDER
    return (f"miniImageNet has no official download; put one of these in {folder}/: "
            f"{', '.join(split_files('pickle'))} (the shared pickles), "
            f"or {', '.join(split_files('csv'))} with their images in {IMAGES_DIR}/ (Ravi & Larochelle's image folder), "
            f"or {', '.join(split_files('hdf5'))} (torchmeta's cache; needs {HDF5_EXTRA})")


def find_files(root: Path | str) -> tuple[str, list[Path]]:
    """The format found under ``<root>/miniimagenet/`` and its files; a DataError naming what to put where."""
    folder = Path(root) / FOLDER
    partial = []
    for fmt in FORMATS:
        paths = [folder / name for name in split_files(fmt)]
        present = [p for p in paths if p.is_file()]
        if fmt == "csv" and present and not (folder / IMAGES_DIR).is_dir():
            partial.append(f"{folder / IMAGES_DIR}/ (the images the csv files name)")
        if len(present) == len(paths) and not (fmt == "csv" and not (folder / IMAGES_DIR).is_dir()):
            if fmt == "hdf5" and not have_h5py():
                raise DataError(f"{folder} holds torchmeta's HDF5 files but h5py is not installed: {HDF5_EXTRA}")
            return fmt, paths
        if present:
            partial += [p.name for p in paths if not p.is_file()]
    missing = f"missing {', '.join(partial)}; " if partial else f"no miniImageNet files in {folder}; "
    raise DataError(missing + layout(root))


# ---------------------------------------------------------------------------------------------- readers
# Each yields (class name, uint8 (n, 84, 84, 3) images) for one split file, in sorted class-name order.


def _check_images(images, source: str, what: str) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{source}: {what} should be uint8 (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images, got {got}: "
                        f"the file is not miniImageNet's; download it again")
    return images


def load_pickle(path: Path):
    """``safe_pickle.load`` (latin1: also reads Python 2 pickles of numpy arrays), its errors ending in a fix."""
    try:
        return safe_pickle.load(path, encoding="latin1")
    except DataError as e:
        message = str(e)
        if "again" in message or "unpack" in message:
            raise
        raise DataError(f"{message}; download it again from a source you trust") from None


def read_pickle(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """One ``mini-imagenet-cache-{split}.pkl``: {'image_data': (N, 84, 84, 3) uint8, 'class_dict': {wnid: [i]}}."""
    data = load_pickle(path)
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path} should be a dict with keys 'image_data' and 'class_dict', got {keys}: "
                        f"it is not a miniImageNet cache pickle; download it again")
    images = _check_images(data["image_data"], str(path), "'image_data'")
    classes = data["class_dict"]
    if not isinstance(classes, dict) or not classes:
        raise DataError(f"{path}: 'class_dict' should be a non-empty dict {{wnid: [image indices]}}; download it again")
    for name in sorted(classes, key=str):
        try:
            raw = np.asarray(classes[name]).reshape(-1)
            if raw.dtype.kind not in "iu":  # 0.5 or "3" would be cut or parsed into another image
                raise TypeError(raw.dtype)
            index = raw.astype(np.int64)
        except (TypeError, ValueError):
            raise DataError(f"{path}: 'class_dict'[{name!r}] is not a list of image indices; download it again") from None
        if len(index) == 0:
            raise DataError(f"{path}: class {name} of 'class_dict' has no images; download it again")
        bad = index[(index < 0) | (index >= len(images))]
        if len(bad):
            raise DataError(f"{path}: 'class_dict'[{name!r}] names image {int(bad[0])} but 'image_data' holds "
                            f"{len(images)}; the file is damaged, download it again")
        yield str(name), images[index]


def decode_image(data: bytes | Path, source: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 3) RGB from an image file or encoded bytes; resized with LANCZOS if another size."""
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{source} is missing: put it back (or download the dataset again)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{source} does not decode as an image ({e}): download it again") from None


def parse_csv(path: Path) -> dict[str, list[str]]:
    """One of Ravi's ``{split}.csv`` (``filename,label``): {label: [file names]}, every file checked present."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}): download Ravi & Larochelle's csv files again") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path} should start with the header 'filename,label' (Ravi & Larochelle's split files); "
                        f"is it an HTML page or another file? download it again")
    by_class: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0] or not row[1]:
            raise DataError(f"{path}, line {line}: expected 'filename,label', got {','.join(row)!r}; fix or replace the file")
        by_class.setdefault(row[1], []).append(row[0])
    if not by_class:
        raise DataError(f"{path} lists no images; download Ravi & Larochelle's csv files again")
    images_dir = path.parent / IMAGES_DIR
    missing = [f for files in by_class.values() for f in files if not (images_dir / f).is_file()]
    if missing:
        raise DataError(f"{len(missing)} images listed in {path.name} are missing from {images_dir}/ "
                        f"(first: {missing[0]}): put the whole image folder there")
    return by_class


def read_csv(path: Path, by_class: dict[str, list[str]], progress=None) -> Iterator[tuple[str, np.ndarray]]:
    """The classes of a parsed ``{split}.csv``, decoded from ``images/`` beside it."""
    images_dir = path.parent / IMAGES_DIR
    for name in sorted(by_class):
        stop.check()
        files = by_class[name]
        images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for i, file in enumerate(files):
            images[i] = decode_image(images_dir / file, f"{images_dir / file} (listed in {path.name})")
            if progress is not None:
                progress()
        yield name, images


@contextlib.contextmanager
def torchmeta_hdf5(path: Path, labels_path: Path):
    """torchmeta's ``{split}_labels.json`` (the list of class names) and the group 'datasets' of its
    ``{split}_data.hdf5``, both checked: ``with torchmeta_hdf5(p, l) as (labels, group, h5py): ...``."""
    import h5py

    try:
        labels = json.loads(Path(labels_path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{labels_path} is not torchmeta's labels file (a JSON list of class names: {e}); "
                        f"rebuild it with torchmeta or use the pickles") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{labels_path} should be a JSON list of class names; rebuild it with torchmeta or use the pickles")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path} is not an HDF5 file (truncated, or an HTML page saved as data? {e}): "
                        f"rebuild it with torchmeta or use the pickles") from None
    with f:
        group = f.get("datasets")
        if not isinstance(group, h5py.Group):
            raise DataError(f"{path} has no group 'datasets' (keys: {', '.join(f.keys()) or 'none'}): "
                            f"it is not torchmeta's cache; rebuild it with torchmeta or use the pickles")
        yield labels, group, h5py


def read_hdf5(path: Path, labels_path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """torchmeta's ``{split}_data.hdf5`` (group 'datasets', one (n, 84, 84, 3) uint8 dataset per wnid) and
    ``{split}_labels.json`` (the list of wnids)."""
    with torchmeta_hdf5(path, labels_path) as (labels, group, h5py):
        for name in sorted(labels):
            ds = group.get(name)
            if not isinstance(ds, h5py.Dataset):
                raise DataError(f"{path} has no dataset 'datasets/{name}', which {labels_path.name} names: "
                                f"the two files do not belong together; rebuild them with torchmeta")
            try:
                images = ds[()]
            except (OSError, ValueError, TypeError) as e:
                raise DataError(f"{path}: 'datasets/{name}' cannot be read ({e}): the file is damaged; rebuild it") from None
            yield name, _check_images(images, str(path), f"'datasets/{name}'")


# ---------------------------------------------------------------------------------------------- decoding


def decode_into(fmt: str, files: list[Path], writer) -> None:
    """Write every class of the three split files to ``writer`` (a StoreWriter), tagged with its split,
    as uint8 (n, 3, 84, 84); progress on stderr, a stop request honoured between classes."""
    csv_images = None
    if fmt == "csv":  # all three checked before any image is decoded, so a bad file fails in seconds
        parsed = [parse_csv(p) for p in files]
        csv_images = sum(len(v) for by_class in parsed for v in by_class.values())
    progress = transient_progress(MofNCompleteColumn())
    with progress:
        bar = progress.add_task("decoding miniImageNet", total=csv_images or 100)
        seen: dict[str, Path] = {}
        for i, split in enumerate(FILE_SPLITS):
            if fmt == "pickle":
                classes = read_pickle(files[i])
            elif fmt == "csv":
                classes = read_csv(files[i], parsed[i], progress=lambda: progress.advance(bar))
            elif fmt == "hdf5":
                classes = read_hdf5(files[i], files[i + 3])
            else:
                raise ValueError(fmt)
            for name, images in classes:
                stop.check()
                if name in seen:
                    raise DataError(f"class {name} is in both {seen[name].name} and {files[i].name}: the files are "
                                    f"not one miniImageNet release; download them again")
                seen[name] = files[i]
                writer.add_class(name, images.transpose(0, 3, 1, 2), split=split)
                if fmt != "csv":
                    progress.advance(bar)


# ---------------------------------------------------------------------------------------------- dataset


def folder_summary(folder: Path) -> dict:
    """Number, total size and newest change of the files in ``folder``: in the cache key of an image folder,
    so that replacing images decodes again (cheap: one stat per file, no reading)."""
    count = size = newest = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file():
                st = entry.stat()
                count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return {"files": count, "bytes": size, "newest": newest}


def classes_by_tag(store, title: str) -> dict[str, list[int]]:
    """Store class indices of each split, from the split tags the decoder gave every class."""
    out = {s: [] for s in FILE_SPLITS}
    for i, tag in enumerate(store.splits_of_class):
        if tag not in out:
            raise DataError(f"the {title} image store has class {store.class_names[i]} in no split ({tag!r}): "
                            f"delete the store folder (data.cache_dir) to decode again")
        out[tag].append(i)
    return out


class MiniImageNet(ImageDataset):
    """miniImageNet files under ``<root>/miniimagenet/`` in any accepted format (module docstring)."""

    name = "miniimagenet"
    title = "miniImageNet"
    channels = 3
    image_size = IMAGE_SIZE
    mean, std = MEAN, STD
    split_names = ("ravi",)  # Ravi & Larochelle's 64/16/20, defined by the files

    format: str | None = None
    # This module's readers; tieredImageNet, whose files define its split the same way, names its own.
    find_files, layout_of, decode_into = staticmethod(find_files), staticmethod(layout), staticmethod(decode_into)

    def locate(self, download: bool) -> list[Path]:
        # No official download exists: ``download`` changes nothing, the error says where the files go.
        self.format, files = self.find_files(self.root)
        return files

    def layout(self) -> str:
        return self.layout_of(self.root)

    def cache_key(self) -> dict:
        key = {**super().cache_key(), "format": self.format}
        if self.format == "csv":
            key["images"] = folder_summary(self.root / FOLDER / IMAGES_DIR)
        return key

    def decode(self, files: list[Path], writer) -> None:
        self.decode_into(self.format or self.find_files(self.root)[0], files, writer)

    def disk_bytes(self, files: list[Path]) -> int:
        images = folder_summary(self.root / FOLDER / IMAGES_DIR)["bytes"] if self.format == "csv" else 0
        return super().disk_bytes(files) + images  # the csv files name the images, which are the bulk

    def split_classes(self, store) -> dict[str, list[int]]:
        return classes_by_tag(store, self.title)


class MiniImageNetTasks(ImageTasks):
    """N-way K-shot miniImageNet tasks (Vinyals et al. 2016) on Ravi & Larochelle's 64/16/20 split.

    ``ways``/``shots``/``queries`` set the validation and test tasks, ``train_ways``/``train_shots``/
    ``train_queries`` (None: the same) the meta-training tasks. The files are read from
    ``<root>/miniimagenet/`` (no official download exists: a missing file is an error saying what to
    put where) and decoded once into ``cache_dir`` (None: beside the files, or the user cache).
    ``residency``, ``memory_share``, ``normalize`` (MetaOptNet's channel statistics) and ``augment`` as
    for every image dataset (``metarun.data.images.ImageTasks``).

    Usage: ``metarun train data=miniimagenet model=conv4 model.hidden=32``."""

    dataset = MiniImageNet

    def __init__(self, ways: int, shots: int, queries: int, root: str, split: str = "ravi",
                 cache_dir: str | None = None, download: bool = True, channels: int = 3, image_size: int = IMAGE_SIZE,
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None,
                 residency: str = "auto", memory_share: float = 0.5, normalize: bool = True,
                 augment: tuple[str, ...] = ()):
        self.check_image_shape(channels, image_size)
        super().__init__(ways, shots, queries, root, split, cache_dir, download, residency, memory_share, normalize,
                         augment, train_ways, train_shots, train_queries)
