"""download_file against a loopback HTTP server: good transfers and every failure it must catch."""

from __future__ import annotations

import errno
import hashlib
import random
import resource
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

from metarun.data import download
from metarun.data.download import download_file, file_git_blob_sha1, file_md5, git_blob_sha1_bytes
from metarun.errors import DataError

BODY = random.Random(0).randbytes(300_000)  # several chunks, so streaming is exercised
BODY_MD5 = hashlib.md5(BODY).hexdigest()
BODY_BLOB = git_blob_sha1_bytes(BODY)
HTML = b"<!DOCTYPE html>\n<html><body>Rate limit exceeded</body></html>\n"

Route = Callable[[BaseHTTPRequestHandler], None]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        route = self.server.routes.get(self.path)  # type: ignore[attr-defined]
        if route is None:
            self.send_error(404)
        else:
            route(self)

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


class LoopbackServer:
    def __init__(self) -> None:
        # 127.0.0.1 only: tests must never talk to anything but this machine.
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.routes = {}  # type: ignore[attr-defined]
        self.release = threading.Event()  # lets stalled handlers finish at teardown
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def route(self, path: str, handler: Route) -> str:
        self.httpd.routes[path] = handler  # type: ignore[attr-defined]
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(body: bytes, status: int = 200, ctype: str = "application/octet-stream",
          length: int | None = None) -> Route:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        if length != -1:  # -1: no Content-Length, the body ends when the connection closes
            h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        h.wfile.write(body)
        h.close_connection = True  # a Content-Length above len(body) then reads as a cut transfer

    return handle


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would send loopback requests elsewhere.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    srv = LoopbackServer()
    yield srv
    srv.close()


def assert_one_line(err: DataError) -> str:
    message = str(err)
    assert "\n" not in message and "\r" not in message
    return message


def test_git_blob_sha1_matches_git(tmp_path: Path) -> None:
    # Values from `git hash-object`.
    assert git_blob_sha1_bytes(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_sha1_bytes(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    f = tmp_path / "f"
    f.write_bytes(BODY)
    assert file_git_blob_sha1(f) == BODY_BLOB
    assert file_md5(f) == BODY_MD5


def test_good_download_is_verified_and_in_place(server: LoopbackServer, tmp_path: Path) -> None:
    url = server.route("/data/file.zip", reply(BODY))
    dest = tmp_path / "nested" / "file.zip"  # the folder does not exist yet
    out = download_file(url, dest, md5=BODY_MD5, git_blob_sha1=BODY_BLOB, size=len(BODY))
    assert out == dest
    assert dest.read_bytes() == BODY
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.zip"]  # no .part left


def part_files(folder: Path) -> list[Path]:
    return list(folder.glob("*.part")) + list(folder.glob(".*.part"))


def test_concurrent_downloads_use_separate_part_files(server: LoopbackServer, tmp_path: Path) -> None:
    import threading

    url = server.route("/c", reply(BODY))
    results = []
    threads = [threading.Thread(target=lambda: results.append(download_file(url, tmp_path / "c", md5=BODY_MD5)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and (tmp_path / "c").read_bytes() == BODY and not part_files(tmp_path)


def test_good_download_replaces_old_file(server: LoopbackServer, tmp_path: Path) -> None:
    url = server.route("/f", reply(BODY))
    dest = tmp_path / "f"
    dest.write_bytes(b"old")
    download_file(url, dest, md5=BODY_MD5)
    assert dest.read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


FAILURES = {
    "truncated": (reply(BODY, length=len(BODY) + 5000), {}, "truncated transfer"),
    "html_200_content_type": (reply(HTML, ctype="text/html"), {}, "HTML page"),
    "html_200_sniffed": (reply(b"\n  " + HTML), {}, "HTML page"),
    "html_200_uppercase": (reply(b"<HTML><BODY>nope</BODY></HTML>"), {}, "HTML page"),
    "html_404": (reply(HTML, status=404, ctype="text/html"), {}, "HTTP 404"),
    "server_error": (reply(b"oops", status=500), {}, "HTTP 500"),
    "md5": (reply(BODY), {"md5": "0" * 32}, f"md5 mismatch: expected {'0' * 32}, got {BODY_MD5}"),
    "git_blob": (
        reply(BODY),
        {"git_blob_sha1": git_blob_sha1_bytes(bytes(len(BODY)))},  # same size, other content
        f"git blob sha1 mismatch: expected {git_blob_sha1_bytes(bytes(len(BODY)))}, got {BODY_BLOB}",
    ),
    "size": (reply(BODY), {"size": len(BODY) + 1}, "size mismatch"),
    # A body longer than expected is refused when announced, cut as soon as it exceeds it otherwise.
    "announced_over_size": (reply(BODY), {"size": 1000}, f"announces {len(BODY)} bytes, more than the 1000 expected"),
    "announced_over_cap": (reply(BODY), {"max_size": 1000}, f"announces {len(BODY)} bytes, more than the 1000 exp"),
    "unannounced_over_size": (reply(BODY, length=-1), {"size": 1000}, "transfer cut: the server sent more than the 1000"),
    # Bytes past Content-Length are never read; checksums then catch the body as it was announced.
    "longer_than_content_length": (reply(BODY, length=1000), {"md5": BODY_MD5}, "md5 mismatch"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failed_download_leaves_dest_untouched(server: LoopbackServer, tmp_path: Path, case: str) -> None:
    handler, checks, expected = FAILURES[case]
    url = server.route("/archive.zip", handler)
    dest = tmp_path / "archive.zip"
    dest.write_bytes(b"previous content")
    with pytest.raises(DataError) as info:
        download_file(url, dest, **checks)
    message = assert_one_line(info.value)
    assert expected in message
    assert url in message
    assert dest.read_bytes() == b"previous content"
    assert not part_files(tmp_path)


def test_refused_connection_says_where_to_place_the_file(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port that is certainly closed once we let go of it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/images_background.zip"
    dest = tmp_path / "images_background.zip"
    with pytest.raises(DataError) as info:
        download_file(url, dest, timeout=5)
    message = assert_one_line(info.value)
    assert url in message
    assert f"place the file at {dest} manually" in message
    assert "network" in message
    assert not dest.exists() and not part_files(tmp_path)


@pytest.mark.parametrize("stall", ["before_headers", "mid_body"])
def test_timeout_is_a_data_error(server: LoopbackServer, tmp_path: Path, stall: str) -> None:
    def handle(h: BaseHTTPRequestHandler) -> None:
        if stall == "before_headers":
            server.release.wait(10)
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(BODY)))
        h.end_headers()
        h.wfile.write(BODY[:1000])
        h.wfile.flush()
        server.release.wait(10)

    url = server.route("/slow", handle)
    dest = tmp_path / "slow"
    with pytest.raises(DataError) as info:
        download_file(url, dest, timeout=0.3)
    message = assert_one_line(info.value)
    assert url in message and "network" in message
    assert not dest.exists() and not part_files(tmp_path)


def endless(server: LoopbackServer) -> Route:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()  # no Content-Length: nothing says where the body ends
        try:
            while not server.release.is_set():
                h.wfile.write(BODY[:65536])
        except OSError:  # the client cut the transfer
            pass
        h.close_connection = True

    return handle


@pytest.mark.parametrize("limit", ["size", "max_size"])
def test_an_endless_body_is_cut_at_the_limit(server: LoopbackServer, tmp_path: Path, limit: str) -> None:
    url = server.route("/endless", endless(server))
    dest = tmp_path / "endless"
    with pytest.raises(DataError) as info:
        download_file(url, dest, **{limit: 500_000}, timeout=10)
    message = assert_one_line(info.value)
    assert "transfer cut: the server sent more than the 500000 bytes expected" in message and url in message
    assert not dest.exists() and not part_files(tmp_path)


def test_the_body_never_exceeds_the_limit_on_disk(server: LoopbackServer, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    written = []
    real = download._write_all
    monkeypatch.setattr(download, "_write_all", lambda out, data: (written.append(len(data)), real(out, data)))
    url = server.route("/endless", endless(server))
    with pytest.raises(DataError):
        download_file(url, tmp_path / "endless", max_size=200_000, timeout=10)
    assert sum(written) <= 200_000


@pytest.mark.parametrize("code, expected", [
    (errno.ENOSPC, "disk full while writing into {folder}"),
    (errno.EDQUOT, "disk full while writing into {folder}"),
    (errno.EFBIG, "file size limit reached while writing into {folder}"),
    (errno.EACCES, "cannot write into {folder}"),
])
def test_a_failing_disk_is_not_reported_as_the_network(server: LoopbackServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, code: int, expected: str) -> None:
    chunks = []

    def write_all(out, data):
        if chunks:  # the first chunk fits, the second finds the disk full
            raise OSError(code, os.strerror(code))
        chunks.append(data)
        out.write(data)

    monkeypatch.setattr(download, "_write_all", write_all)
    url = server.route("/f.zip", reply(BODY))
    dest = tmp_path / "data" / "f.zip"
    dest.parent.mkdir()
    dest.write_bytes(b"previous content")
    with pytest.raises(DataError) as info:
        download_file(url, dest, md5=BODY_MD5)
    message = assert_one_line(info.value)
    assert expected.format(folder=dest.parent) in message
    assert "connection" not in message and "network" not in message
    assert dest.read_bytes() == b"previous content" and not part_files(dest.parent)


def test_a_real_file_size_limit_is_reported_as_such(server: LoopbackServer, tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the kernel refuse the write with EFBIG (Python ignores SIGXFSZ): no mock involved.
    url = server.route("/f.zip", reply(BODY))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(DataError) as info:
            download_file(url, tmp_path / "f.zip", md5=BODY_MD5)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = assert_one_line(info.value)
    assert f"file size limit reached while writing into {tmp_path}" in message
    assert not part_files(tmp_path) and not (tmp_path / "f.zip").exists()


def test_an_unwritable_destination_is_one_line(server: LoopbackServer, tmp_path: Path) -> None:
    url = server.route("/f.zip", reply(BODY))
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(DataError) as info:
        download_file(url, blocker / "omniglot" / "f.zip")
    assert f"cannot write into {blocker / 'omniglot'}" in assert_one_line(info.value)
