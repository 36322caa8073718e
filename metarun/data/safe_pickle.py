"""Read pickles from a user's disk without running their code.

The formats researchers share miniImageNet, tieredImageNet, FC100 and CIFAR-100 in are pickles.
``pickle.load`` on such a file imports and calls whatever the file names (``os.system``, a ``.pth``
hook), so a pickle is read here with an unpickler that resolves only the handful of globals plain
numpy arrays are made of. Anything else in the file is refused with a ``DataError`` naming it.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

from metarun.errors import DataError

# The globals a pickled numpy array (protocols 2 to 5, numpy 1.x and 2.x) is rebuilt from, and nothing else.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol-2 pickles of bytes made under Python 3 (the CIFAR-100 archive's)
}


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a data file never needs")


def loads(data: bytes, source: str | Path, encoding: str = "ASCII") -> Any:
    """Unpickle ``data`` (read from ``source``, named in errors), allowing only numpy arrays and builtins.

    ``encoding="latin1"`` reads Python 2 pickles of numpy arrays (MetaOptNet's FC100 files)."""
    if data[:1] == b"<" or data[:15].lower().startswith((b"<!doctype", b"<html")):
        raise DataError(f"{source} is an HTML page, not a pickle (a failed download from a file-sharing host?): "
                        f"download it again")
    if data[:2] == b"PK":
        raise DataError(f"{source} is a zip archive, not a pickle: unpack it first")
    try:
        return _NumpyOnly(io.BytesIO(data), encoding=encoding).load()
    except pickle.UnpicklingError as e:
        if "truncated" in str(e):
            raise DataError(f"{source} is truncated (a cut-off download or copy): download it again") from None
        raise DataError(f"{source} is not a plain data pickle: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            UnicodeDecodeError, zipfile.BadZipFile, OverflowError) as e:
        raise DataError(f"{source} is truncated or corrupt ({type(e).__name__}: {e}): download it again") from None


def load(path: Path, encoding: str = "ASCII") -> Any:
    """``loads`` of the file at ``path``; an unreadable file is a ``DataError``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return loads(data, path, encoding)
