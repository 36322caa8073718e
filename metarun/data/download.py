"""Verified HTTP downloads: stream to a .part file, check it, then move it into place."""

from __future__ import annotations

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


def download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    git_blob_sha1: str | None = None,
    size: int | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, verified; ``dest`` is only replaced once every check passed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: two runs downloading at once never write into each other's file.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    part = Path(tmp)
    manual = f"place the file at {dest} manually, or set the data root to a folder that has it"

    def fail(problem: str, fix: str) -> DataError:
        return DataError(_one_line(f"download of {url} failed: {problem}; {fix}"))

    try:
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

            received = 0
            digest_md5 = hashlib.md5()
            head = b""
            try:
                with open(part, "wb") as out, _progress() as progress:
                    task = progress.add_task(f"downloading {dest.name}", total=expected_length)
                    while True:
                        chunk = response.read(_CHUNK)
                        if not chunk:
                            break
                        if len(head) < _SNIFF_BYTES:
                            head += chunk[: _SNIFF_BYTES - len(head)]
                            # Check while the head arrives, so an HTML page is never streamed to the end.
                            if _looks_like_html(head):
                                raise fail(html_page, f"check the URL, or {manual}")
                        out.write(chunk)
                        digest_md5.update(chunk)
                        received += len(chunk)
                        progress.update(task, advance=len(chunk))
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
        os.replace(part, dest)
    except BaseException:
        # Also on Ctrl-C: a half-written .part must never look like a finished download.
        part.unlink(missing_ok=True)
        raise
    return dest
