"""One official archive of a dataset (CIFAR-100, CUB-200-2011): find it, download it, verify it, stream it.

The archive is untrusted input. It is verified by md5 before anything is read from it, present or
downloaded (a saved HTML page, a truncated transfer or another file is refused with the fix), and it is
read member by member from the compressed stream (``tarfile`` stream mode): nothing is extracted to
disk, only regular-file members are read, and a member larger than a per-member cap is refused
before it is read.
"""

from __future__ import annotations

import logging
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from metarun.data.download import DownloadError, download_file, file_md5
from metarun.errors import DataError
from metarun.utils.files import remove_stale_temps

log = logging.getLogger("metarun")

# (resolved path, size, mtime_ns) of the archives whose md5 this process already checked: hashing the
# 1.1 GB CUB archive takes seconds, and a run locates its files more than once.
_VERIFIED: set[tuple[str, int, int]] = set()


def one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class OfficialArchive:
    """An archive with an official download: where it goes under ``data.root`` and how it is checked."""

    title: str  # "CIFAR-100"
    folder: str  # its folder under data.root: "cifar100"
    filename: str  # "cifar-100-python.tar.gz"
    url: str  # the official download
    md5: str | None  # None only in tests of archives made on the fly
    max_bytes: int  # a download longer than this is cut: a cap, not the exact size

    def path(self, root: Path) -> Path:
        return Path(root).expanduser() / self.folder / self.filename

    def where(self, root: Path) -> str:
        return f"put the official {self.filename} ({self.url}) at {self.path(root)}"

    def bad(self, path: Path, problem: str) -> DataError:
        return DataError(one_line(f"{self.title} archive {path} is unusable: {problem}; delete it so it is "
                                  f"downloaded again, or replace it with the official file from {self.url}"))

    def locate(self, root: Path, download: bool) -> Path:
        """The verified archive under ``root``, downloaded first when missing and ``download`` is true."""
        path = self.path(root)
        for stale in remove_stale_temps(path.parent, (f".{self.filename}.*.part",)):
            log.info(f"removed {stale}, left by an interrupted download")
        if not path.is_file():
            if not download:
                raise DataError(f"{path} is missing and data.download is false: {self.where(root)}, or set "
                                f"data.download=true")
            try:
                download_file(self.url, path, md5=self.md5, max_size=self.max_bytes)
            except DownloadError as e:
                raise DataError(one_line(f"download of {self.url} failed ({e.problem}): {self.where(root)} "
                                         f"by hand")) from e
        self.verify(path)
        return path

    def verify(self, path: Path) -> None:
        """Refuse a file that is not the official archive (an HTML page, truncated, another file)."""
        try:
            st = path.stat()
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            return
        start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if start.startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
            raise self.bad(path, "it is an HTML page, not the archive (a failed download saved as data?)")
        if self.md5 is not None:
            got = file_md5(path)
            if got != self.md5:
                raise self.bad(path, f"its md5 is {got}, not the official {self.md5} ({st.st_size} bytes: "
                                     f"truncated, or another file)")
        _VERIFIED.add(key)


def stream_members(archive: OfficialArchive, path: Path, wanted: Callable[[str], bool], max_member_bytes: int,
                   stop_check: Callable[[], None] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, content) of the regular-file members of the tar at ``path`` that ``wanted`` accepts, in archive
    order, read from the compressed stream. A wanted member above ``max_member_bytes`` is refused unread;
    links, devices and folders are skipped; a damaged stream is a one-line ``DataError``."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if stop_check is not None:
                    stop_check()
                if not member.isreg() or not wanted(member.name):
                    continue
                if member.size > max_member_bytes:
                    raise archive.bad(path, f"{member.name} declares {member.size} bytes, more than the "
                                            f"{max_member_bytes} such a file can take")
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise archive.bad(path, f"{member.name} is cut short (truncated archive)")
                yield member.name, data
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        raise archive.bad(path, f"not a readable tar archive ({type(e).__name__}: {one_line(e) or 'truncated'})") \
            from None


def member_name_ok(name: str) -> bool:
    """A member path we would ever read: relative, no '..' or empty parts, no backslashes."""
    parts = name.split("/")
    return not name.startswith("/") and "\\" not in name and all(p not in ("", ".", "..") for p in parts)

