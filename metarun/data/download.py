"""Verified HTTP downloads: stream to a .part file, check it, then move it into place."""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from rich.progress import DownloadColumn, TransferSpeedColumn

from metarun.errors import DataError
from metarun.utils.display import transient_progress

_CHUNK = 1 << 16
# Enough of the body to recognise an HTML page, even after a BOM or leading whitespace.
_SNIFF_BYTES = 512


def _one_line(text: object) -> str:
    """Collapse whitespace so a message stays on the single line the CLI prints."""
    return " ".join(str(text).split())


def git_blob_sha1_bytes(data: bytes) -> str:
    """Git's blob id of ``data``: sha1 of b"blob <len>\\0" + data."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_git_blob_sha1(path: Path) -> str:
    """Git's blob id of a file (binds both its size and its content)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _looks_like_html(head: bytes) -> bool:
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith(b"<!doctype") or start.startswith(b"<html")


def _progress():
    return transient_progress(DownloadColumn(), TransferSpeedColumn())


class DownloadError(DataError):
    """A failed download; ``problem`` is what went wrong, without the advice, for callers that add their own."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_problem(e: OSError, folder: Path) -> tuple[str, str]:
    """(problem, fix) for an error while writing into ``folder``: a full disk is not a network fault."""
    if e.errno in _DISK_FULL:
        return f"disk full while writing into {folder}", "free space there, or set the data root to another folder"
    if e.errno == errno.EFBIG:
        return (f"file size limit reached while writing into {folder}",
                "raise the limit (ulimit -f), or set the data root to another folder")
    return (f"cannot write into {folder} ({e.strerror or e})",
            "check that folder's permissions, or set the data root to a writable folder")


def _write_all(out, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a raw write may take less than asked (e.g. just before the disk fills)
        view = view[out.write(view):]


def download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    git_blob_sha1: str | None = None,
    size: int | None = None,
    max_size: int | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, verified; ``dest`` is only replaced once every check passed.

    The transfer is cut as soon as it exceeds ``size`` (the exact expected size), else ``max_size`` (a cap),
    else the announced Content-Length, so an endless or oversized response never fills the disk.
    """
    dest = Path(dest)
    folder = dest.parent
    manual = f"place the file at {dest} manually, or set the data root to a folder that has it"

    def fail(problem: str, fix: str) -> DownloadError:
        return DownloadError(_one_line(f"download of {url} failed: {problem}; {fix}"), _one_line(problem))

    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A unique temporary name: two runs downloading at once never write into each other's file.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise fail(*_write_problem(e, folder)) from e
    part = Path(tmp)
    limit = size if size is not None else max_size

    try:
        # Unbuffered: every write reaches the disk at once, so a full disk is seen at that write, never
        # again at close() while another error is being reported.
        out = os.fdopen(fd, "wb", buffering=0)
    except BaseException:
        os.close(fd)
        part.unlink(missing_ok=True)
        raise
    try:
        with out:
            request = urllib.request.Request(url, headers={"User-Agent": "metarun"})
            try:
                response = urllib.request.urlopen(request, timeout=timeout)
            except urllib.error.HTTPError as e:
                # HTTPError before URLError: it is a subclass, and a status is more useful than "reason".
                e.close()
                raise fail(f"server answered HTTP {e.code} {e.reason}", f"check the URL, or {manual}") from e
            except urllib.error.URLError as e:
                raise fail(
                    f"cannot reach the server ({e.reason})", f"check the network connection, or {manual}"
                ) from e
            except (OSError, http.client.HTTPException) as e:
                # Timeouts and resets raised while connecting, outside urllib's URLError wrapping.
                raise fail(f"network error ({e!r})", f"check the network connection, or {manual}") from e

            with response:
                status = getattr(response, "status", 200)
                if status != 200:
                    raise fail(f"server answered HTTP {status}", f"check the URL, or {manual}")
                html_page = "the server returned an HTML page instead of the file (a login, error or rate-limit page)"
                if response.headers.get_content_type() == "text/html":
                    raise fail(html_page, f"check the URL, or {manual}")
                length_header = response.headers.get("Content-Length")
                expected_length = int(length_header) if length_header and length_header.isdigit() else None
                too_long = f"check the URL, or {manual}"
                if limit is not None and expected_length is not None and expected_length > limit:
                    raise fail(f"the server announces {expected_length} bytes, more than the {limit} expected",
                               too_long)
                if limit is None:
                    limit = expected_length  # http.client never reads past it; a cap all the same

                received = 0
                digest_md5 = hashlib.md5()
                head = b""
                with _progress() as progress:
                    task = progress.add_task(f"downloading {dest.name}", total=expected_length or size)
                    while True:
                        try:
                            # One byte past the limit is enough to know the body is too long.
                            want = _CHUNK if limit is None else min(_CHUNK, limit - received + 1)
                            chunk = response.read(want)
                        except http.client.IncompleteRead as e:
                            received += len(e.partial)
                            raise fail(
                                f"truncated transfer: got {received} bytes, expected {expected_length}",
                                f"retry, check the network connection, or {manual}",
                            ) from e
                        except (OSError, http.client.HTTPException) as e:
                            raise fail(
                                f"connection lost after {received} bytes ({e!r})",
                                f"retry, check the network connection, or {manual}",
                            ) from e
                        if not chunk:
                            break
                        if limit is not None and received + len(chunk) > limit:
                            raise fail(f"transfer cut: the server sent more than the {limit} bytes expected", too_long)
                        if len(head) < _SNIFF_BYTES:
                            head += chunk[: _SNIFF_BYTES - len(head)]
                            # Check while the head arrives, so an HTML page is never streamed to the end.
                            if _looks_like_html(head):
                                raise fail(html_page, f"check the URL, or {manual}")
                        try:
                            _write_all(out, chunk)
                        except OSError as e:
                            raise fail(*_write_problem(e, folder)) from e
                        digest_md5.update(chunk)
                        received += len(chunk)
                        progress.update(task, advance=len(chunk))

        if _looks_like_html(head):
            raise fail(html_page, f"check the URL, or {manual}")
        if expected_length is not None and received != expected_length:
            raise fail(
                f"truncated transfer: got {received} bytes, expected {expected_length} (Content-Length)",
                f"retry, check the network connection, or {manual}",
            )
        if size is not None and received != size:
            raise fail(f"size mismatch: expected {size} bytes, got {received}", f"check the URL, or {manual}")
        if md5 is not None and digest_md5.hexdigest() != md5.lower():
            raise fail(
                f"md5 mismatch: expected {md5.lower()}, got {digest_md5.hexdigest()}",
                f"check the URL, or {manual}",
            )
        if git_blob_sha1 is not None:
            got = file_git_blob_sha1(part)
            if got != git_blob_sha1.lower():
                raise fail(
                    f"git blob sha1 mismatch: expected {git_blob_sha1.lower()}, got {got}",
                    f"check the URL, or {manual}",
                )
        try:
            os.replace(part, dest)
        except OSError as e:
            raise fail(*_write_problem(e, folder)) from e
    except BaseException:
        # Also on Ctrl-C: a half-written .part must never look like a finished download.
        part.unlink(missing_ok=True)
        raise
    return dest
