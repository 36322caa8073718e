"""Small archives in the real on-disk formats of CIFAR-100, MetaOptNet's FC100 and CUB-200-2011.

Same member names, keys, dtypes and layouts as the official files, few images. The CIFAR-100 and FC100
pickles are written as Python 2 wrote them (protocol 2, every str a byte string), which is what the
official archive holds and why it is read with ``encoding="bytes"``.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from metarun.data.cifar import CIFAR100_SUPERCLASSES, COARSE_LABEL_NAMES, FC100_SPLITS, FINE_LABEL_NAMES
from metarun.data.cub import CUB_CLASSES, TOP


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: str and bytes both as BINSTRING (a Python 2 ``str``)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # Python 2's numpy named its module numpy.core (GLOBAL is a text opcode: no lengths to fix).
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_image(fine: int, k: int) -> np.ndarray:
    """A (3072,) image telling its class and number: channel 0 = class, channel 1 = k, channel 2 = gradient."""
    img = np.zeros((3, 32, 32), dtype=np.uint8)
    img[0] = fine
    img[1] = k
    img[2] = np.arange(32, dtype=np.uint8)[None, :] * 4
    return img.reshape(-1)


def cifar_pickles(train_per_class: int = 2, test_per_class: int = 1) -> dict[str, bytes]:
    superclass_of = {c: COARSE_LABEL_NAMES.index(s) for s, cs in CIFAR100_SUPERCLASSES.items() for c in cs}
    out = {}
    for name, per_class, first in (("train", train_per_class, 0), ("test", test_per_class, 100)):
        # Shuffled class order, as in the real pickles.
        labels = np.random.default_rng(len(name)).permutation(np.repeat(np.arange(100), per_class)).tolist()
        seen: dict[int, int] = {}
        rows = []
        for label in labels:
            seen[label] = seen.get(label, 0) + 1
            rows.append(cifar_image(label, first + seen[label]))
        out[name] = py2_pickle({
            "filenames": [f"img_{i}.png" for i in range(len(labels))],
            "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": labels,
            "coarse_labels": [superclass_of[FINE_LABEL_NAMES[i]] for i in labels],
            "data": np.stack(rows).astype(np.uint8),
        })
    out["meta"] = py2_pickle({"fine_label_names": list(FINE_LABEL_NAMES),
                              "coarse_label_names": list(COARSE_LABEL_NAMES)})
    return out


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_cifar100_archive(path: Path, pickles: dict[str, bytes] | None = None) -> Path:
    pickles = cifar_pickles() if pickles is None else pickles
    return write_tar(path, {f"cifar-100-python/{name}": data for name, data in pickles.items()})


def write_metaoptnet_fc100(folder: Path, per_class: int = 3) -> dict[str, Path]:
    """MetaOptNet's FC100_{train,val,test}.pickle: latin-1 (Python 2) dicts, 'data' (N, 32, 32, 3), 'labels'."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, names in FC100_SPLITS.items():
        labels = [FINE_LABEL_NAMES.index(n) for n in names for _ in range(per_class)]
        data = np.stack([cifar_image(label, k % per_class + 1).reshape(3, 32, 32).transpose(1, 2, 0)
                         for k, label in enumerate(labels)])
        paths[split] = folder / f"FC100_{split}.pickle"
        paths[split].write_bytes(py2_pickle({"data": data, "labels": labels}))
    return paths


# --------------------------------------------------------------------------------------------------- CUB

def jpeg(size: tuple[int, int], colour: int, mode: str = "RGB") -> bytes:
    """A JPEG whose left half is ``colour`` and right half white (so a crop is visible)."""
    im = Image.new("RGB", size, (255, 255, 255))
    im.paste((colour, 255 - colour, colour // 2), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    im.convert(mode).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def cub_members(per_class: int = 2, size: tuple[int, int] = (40, 30), modes: dict[int, str] | None = None,
                text_first: bool = False) -> dict[str, bytes]:
    """The official layout: CUB_200_2011/{images,classes,image_class_labels,bounding_boxes}.txt and
    images/NNN.Name/Name_NNNN_ID.jpg; the text files after the images unless ``text_first``."""
    modes = modes or {}
    images, texts = {}, {"images.txt": [], "classes.txt": [], "image_class_labels.txt": [], "bounding_boxes.txt": []}
    image_id = 0
    for class_id, folder in enumerate(CUB_CLASSES, 1):
        texts["classes.txt"].append(f"{class_id} {folder}")
        for k in range(per_class):
            image_id += 1
            rel = f"{folder}/{folder.split('.', 1)[1]}_{k:04d}_{image_id}.jpg"
            texts["images.txt"].append(f"{image_id} {rel}")
            texts["image_class_labels.txt"].append(f"{image_id} {class_id}")
            # The box covers the left half: cropped images are all colour, whole ones half white.
            texts["bounding_boxes.txt"].append(f"{image_id} 0.0 0.0 {size[0] / 2:.1f} {size[1]:.1f}")
            images[f"{TOP}/images/{rel}"] = jpeg(size, class_id, modes.get(image_id, "RGB"))
    text_members = {f"{TOP}/{name}": ("\n".join(lines) + "\n").encode() for name, lines in texts.items()}
    members = {"attributes.txt": b"1 has_bill_shape::curved\n", f"{TOP}/README": b"CUB-200-2011\n"}
    if text_first:
        return {**members, **text_members, **images}
    return {**members, **images, **text_members}


def write_cub_archive(path: Path, members: dict[str, bytes] | None = None) -> Path:
    return write_tar(path, cub_members() if members is None else members)
