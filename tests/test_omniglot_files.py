"""Omniglot archives: download, content validation, decoding and the decode cache."""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import random
import shutil
import socket
import stat
import threading
import time
import zipfile
import zlib
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from conftest import snapshot
from metarun.data import omniglot_files as of
from metarun.data.download import file_git_blob_sha1, file_md5
from metarun.errors import DataError
from metarun.utils import stop
from metarun.utils.files import STALE_TEMP_SECONDS

NAMES = ("images_background", "images_evaluation")


# ----------------------------------------------------------------------------- helpers


def one_line(err: DataError) -> str:
    message = str(err)
    assert "\n" not in message and "\r" not in message
    return message


def reference_decode(png: bytes) -> np.ndarray:
    """The documented pipeline, written out independently: L, invert, LANCZOS to 28x28."""
    im = Image.open(io.BytesIO(png)).convert("L")
    return np.asarray(ImageOps.invert(im).resize((28, 28), Image.LANCZOS))


def png_bytes(seed: int, size: tuple[int, int] = (105, 105)) -> bytes:
    """A 1-bit image like Omniglot's: white background, a black stroke placed by ``seed``."""
    rng = random.Random(seed)
    im = Image.new("1", size, 1)
    x, y = rng.randrange(5, 60), rng.randrange(5, 60)
    ImageDraw.Draw(im).line([(x, y), (x + rng.randrange(10, 40), y + rng.randrange(10, 40))], fill=0, width=6)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def tiny_members(top: str, layout: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    members = {}
    for a, (alphabet, n_chars) in enumerate(layout.items()):
        for c in range(1, n_chars + 1):
            for d in range(1, 21):
                name = f"{top}/{alphabet}/character{c:02d}/{a * 100 + c:04d}_{d:02d}.png"
                members[name] = png_bytes(zlib.crc32(f"{seed}/{name}".encode()))  # stable across runs, unlike hash()
    return members


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    # Reverse order, so the loader must sort rather than trust the archive's order.
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name in sorted(members, reverse=True):
            zf.writestr(name, members[name])
    return path


TINY = {"images_background": {"Beta": 2, "Alpha": 3}, "images_evaluation": {"Gamma": 2}}


@pytest.fixture
def tiny_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root with two small synthetic archives, and ARCHIVES patched to describe them."""
    folder = tmp_path / "root" / "omniglot"
    folder.mkdir(parents=True)
    specs = {}
    for name, layout in TINY.items():
        path = write_zip(folder / f"{name}.zip", tiny_members(name, layout))
        specs[name] = of.ArchiveSpec(
            filename=path.name,
            md5=file_md5(path),
            git_blob_sha1=file_git_blob_sha1(path),
            alphabets=len(layout),
            characters=sum(layout.values()),
            images=20 * sum(layout.values()),
            max_bytes=10 * path.stat().st_size,
        )
    monkeypatch.setattr(of, "ARCHIVES", specs)
    return tmp_path / "root"


class ArchiveServer:
    """Serves one folder on loopback only, counting the requests."""

    def __init__(self, folder: Path) -> None:
        requests: list[str] = []

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                requests.append(self.path)
                super().do_GET()

        self.requests = requests
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        host, port = self.httpd.server_address[:2]
        self.url = f"http://{host}:{port}/python"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served_shared(tmp_path: Path, shared_data_root: Path, monkeypatch: pytest.MonkeyPatch):
    """Copies of the shared archives behind a loopback server, at <url>/<name>.zip."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a proxy would route loopback requests elsewhere
    served = tmp_path / "served" / "python"
    served.mkdir(parents=True)
    for name in NAMES:
        shutil.copyfile(shared_data_root / "omniglot" / f"{name}.zip", served / f"{name}.zip")
    server = ArchiveServer(tmp_path / "served")
    yield server, served
    server.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/python"


# ----------------------------------------------------------------------------- specs


def test_archive_specs_hold_the_official_values() -> None:
    bg, ev = of.ARCHIVES["images_background"], of.ARCHIVES["images_evaluation"]
    assert (bg.filename, bg.md5, bg.git_blob_sha1) == (
        "images_background.zip", "68d2efa1b9178cc56df9314c21c6e718", "71fd167eb6fdd312049395fbd247147a4b234231")
    assert (ev.filename, ev.md5, ev.git_blob_sha1) == (
        "images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811", "8ccde0ed1565641f1fa8c57cdc6ff634e15fc5c1")
    assert (bg.alphabets, bg.characters, bg.images) == (30, 964, 19280)
    assert (ev.alphabets, ev.characters, ev.images) == (20, 659, 13180)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bg.md5 = "x"  # type: ignore[misc]


# ----------------------------------------------------------------------------- the shared archives


def test_shared_archives_pass_validation(omniglot: of.OmniglotImages, shared_data_root: Path) -> None:
    images = omniglot.images
    assert images.dtype == torch.uint8 and tuple(images.shape) == (1623, 20, 28, 28)
    assert omniglot.background.dtype == torch.bool and int(omniglot.background.sum()) == 964
    assert bool(omniglot.background[:964].all()) and not bool(omniglot.background[964:].any())
    assert len(set(omniglot.alphabets[:964])) == 30 and len(set(omniglot.alphabets[964:])) == 20
    assert len(omniglot.characters) == len(set(omniglot.characters)) == 1623
    assert omniglot.characters[0] == "Alphabet_of_the_Magi/character01"
    assert omniglot.characters[963] == "Tifinagh/character55"
    assert omniglot.characters[964] == "Angelic/character01"
    assert omniglot.characters[-1] == "ULOG/character26"
    for part in (omniglot.characters[:964], omniglot.characters[964:]):
        assert part == sorted(part)
    assert all(c.startswith(a + "/") for a, c in zip(omniglot.alphabets, omniglot.characters))

    # Ink is bright and the minority; the background is exactly 0.
    assert float((images > 127).float().mean()) < 0.2
    assert float((images == 0).float().mean()) > 0.6
    assert bool((images.amax(dim=(2, 3)) >= 128).all())  # every image has ink

    # Spot checks against the PNGs themselves: order of characters and drawers, and the pipeline.
    with zipfile.ZipFile(shared_data_root / "omniglot" / "images_background.zip") as zf:
        png = zf.read("images_background/Alphabet_of_the_Magi/character01/0709_01.png")
        assert np.array_equal(images[0, 0].numpy(), reference_decode(png))
    with zipfile.ZipFile(shared_data_root / "omniglot" / "images_evaluation.zip") as zf:
        png = zf.read("images_evaluation/Angelic/character01/0965_20.png")
        assert np.array_equal(images[964, 19].numpy(), reference_decode(png))


def test_second_load_comes_from_the_cache(
    omniglot: of.OmniglotImages, shared_data_root: Path, omniglot_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(paths: object) -> None:
        raise AssertionError("decoded again although the cache holds these archives")

    monkeypatch.setattr(of, "_decode_archives", no_decoding)
    again = of.load_omniglot(shared_data_root, cache_dir=omniglot_cache_dir, download=False)
    assert torch.equal(again.images, omniglot.images)
    assert torch.equal(again.background, omniglot.background)
    assert again.alphabets == omniglot.alphabets and again.characters == omniglot.characters
    name = of.cache_file_name(of.find_or_download_archives(shared_data_root, download=False))
    assert name.startswith(f"omniglot-v{of.CACHE_FORMAT_VERSION}-")
    assert (omniglot_cache_dir / name).is_file()


def test_loading_from_the_shared_root_writes_nothing_there(
    omniglot: of.OmniglotImages, shared_data_root: Path, shared_data_before: dict, omniglot_cache_dir: Path
) -> None:
    of.load_omniglot(shared_data_root, cache_dir=omniglot_cache_dir, download=False)
    # Compared with the root before the session's first load (which decoded), not with an empty folder:
    # a user's data root may hold the decode cache of their own earlier runs.
    assert snapshot(shared_data_root) == shared_data_before


# ----------------------------------------------------------------------------- downloading


def test_end_to_end_download_verify_and_decode(
    served_shared, tmp_path: Path, omniglot: of.OmniglotImages, omniglot_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, served = served_shared
    for name in NAMES:
        spec = of.ARCHIVES[name]
        copy = served / spec.filename
        monkeypatch.setitem(of.ARCHIVES, name, dataclasses.replace(
            spec, md5=file_md5(copy), git_blob_sha1=file_git_blob_sha1(copy)))

    # The cache key is the archives' content, so the session's decode is reused, not repeated.
    monkeypatch.setattr(of, "_decode_archives", lambda paths: pytest.fail("cache key depends on more than content"))
    root = tmp_path / "root"
    loaded = of.load_omniglot(root, cache_dir=omniglot_cache_dir, url=server.url)

    assert sorted(server.requests) == ["/python/images_background.zip", "/python/images_evaluation.zip"]
    assert sorted(p.name for p in (root / "omniglot").iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    for name in NAMES:
        assert (root / "omniglot" / f"{name}.zip").read_bytes() == (served / f"{name}.zip").read_bytes()
    assert torch.equal(loaded.images, omniglot.images) and loaded.characters == omniglot.characters

    # Present archives are used as they are: a second call downloads nothing.
    of.find_or_download_archives(root, url=server.url)
    assert len(server.requests) == 2


def serve(folder: Path, monkeypatch: pytest.MonkeyPatch) -> ArchiveServer:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a proxy would route loopback requests elsewhere
    return ArchiveServer(folder)


def test_download_verify_and_decode_generated_archives(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same path as the real archives' (download, verify, decode, cache), without needing them.
    served = tmp_path / "served" / "python"
    shutil.copytree(tiny_root / "omniglot", served)
    server = serve(tmp_path / "served", monkeypatch)
    try:
        root = tmp_path / "fresh"
        loaded = of.load_omniglot(root, cache_dir=tmp_path / "cache", url=server.url)
        expected = of.load_omniglot(tiny_root, cache_dir=tmp_path / "cache2", download=False)
    finally:
        server.close()
    assert sorted(server.requests) == ["/python/images_background.zip", "/python/images_evaluation.zip"]
    assert sorted(p.name for p in (root / "omniglot").iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    assert torch.equal(loaded.images, expected.images) and loaded.characters == expected.characters


def test_download_is_checked_against_the_official_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = tmp_path / "served" / "python"
    served.mkdir(parents=True)
    for name, layout in TINY.items():  # right names, not the official files
        write_zip(served / f"{name}.zip", tiny_members(name, layout))
    server = serve(tmp_path / "served", monkeypatch)
    root = tmp_path / "fresh"
    try:
        with pytest.raises(DataError) as info:
            of.find_or_download_archives(root, url=server.url)
    finally:
        server.close()
    message = one_line(info.value)
    assert "md5 mismatch" in message and of.ARCHIVES["images_background"].md5 in message
    assert list((root / "omniglot").iterdir()) == []  # nothing unverified is kept


def test_an_endless_download_is_cut_at_the_archive_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Endless(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self.send_response(200)  # no Content-Length: the body ends when the connection does
            self.end_headers()
            try:
                while True:
                    self.wfile.write(bytes(1 << 16))
            except OSError:
                pass

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    cap = 200_000
    monkeypatch.setitem(of.ARCHIVES, "images_background",
                        dataclasses.replace(of.ARCHIVES["images_background"], max_bytes=cap))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with pytest.raises(DataError) as info:
            of.find_or_download_archives(tmp_path, url=f"http://127.0.0.1:{httpd.server_address[1]}/python")
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = one_line(info.value)
    assert f"more than the {cap} bytes expected" in message and "data.root" in message
    assert list((tmp_path / "omniglot").iterdir()) == []


def test_missing_archives_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        of.load_omniglot(tmp_path, cache_dir=tmp_path / "cache", download=False)
    message = one_line(info.value)
    assert str(tmp_path / "omniglot") in message
    assert "data.root" in message and "METARUN_DATA_DIR" in message and "data.download" in message
    assert len(message) - len(str(tmp_path)) < 200  # one short sentence


def test_failed_download_says_where_to_put_the_archives(tmp_path: Path) -> None:
    url = closed_port_url()
    with pytest.raises(DataError) as info:
        of.find_or_download_archives(tmp_path, url=url)
    message = one_line(info.value)
    assert f"{url}/images_background.zip" in message and "cannot reach the server" in message
    assert "data.root" in message and "METARUN_DATA_DIR" in message
    assert len(message) - len(url) < 250
    assert list((tmp_path / "omniglot").iterdir()) == []


# ----------------------------------------------------------------------------- small synthetic archives


def test_decoding_order_and_pipeline(tiny_root: Path, tmp_path: Path) -> None:
    data = of.load_omniglot(tiny_root, cache_dir=tmp_path / "cache", download=False)
    assert data.characters == [
        "Alpha/character01", "Alpha/character02", "Alpha/character03", "Beta/character01", "Beta/character02",
        "Gamma/character01", "Gamma/character02",
    ]
    assert data.alphabets == ["Alpha"] * 3 + ["Beta"] * 2 + ["Gamma"] * 2
    assert data.background.tolist() == [True] * 5 + [False] * 2
    members = {**tiny_members("images_background", TINY["images_background"]),
               **tiny_members("images_evaluation", TINY["images_evaluation"])}
    for i, character in enumerate(data.characters):
        top = "images_background" if data.background[i] else "images_evaluation"
        for j in range(20):
            prefix = f"{top}/{character}/"
            name = next(n for n in members if n.startswith(prefix) and n.endswith(f"_{j + 1:02d}.png"))
            assert np.array_equal(data.images[i, j].numpy(), reference_decode(members[name])), name


def test_cache_is_keyed_by_archive_content(tiny_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = of.load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert [p.name for p in cache.iterdir()] == [of.cache_file_name(of.find_or_download_archives(tiny_root))]

    # Same names and counts, different pixels: must not be served from the old cache file.
    write_zip(tiny_root / "omniglot" / "images_background.zip",
              tiny_members("images_background", TINY["images_background"], seed=1))
    second = of.load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert len(list(cache.iterdir())) == 2  # no temporary files left next to the caches
    assert not torch.equal(first.images[:5], second.images[:5])
    assert torch.equal(first.images[5:], second.images[5:])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_bad_cache_file_is_rebuilt(tiny_root: Path, tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    first = of.load_omniglot(tiny_root, cache_dir=cache, download=False)
    (path,) = cache.iterdir()
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        torch.save({"images": torch.zeros(3, dtype=torch.uint8), "alphabets": [], "characters": [],
                    "background": torch.zeros(3, dtype=torch.bool)}, path)
    again = of.load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert torch.equal(again.images, first.images) and again.characters == first.characters
    assert torch.equal(torch.load(path, weights_only=True)["images"], first.images)  # rewritten


@pytest.mark.parametrize("damage", ["flipped_byte_on_disk", "resaved_with_other_pixels"])
def test_cache_content_is_verified_against_its_hash(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    cache = tmp_path / "cache"
    first = of.load_omniglot(tiny_root, cache_dir=cache, download=False)
    (path,) = cache.iterdir()
    if damage == "flipped_byte_on_disk":
        data = bytearray(path.read_bytes())
        at = bytes(data).index(first.images.numpy().tobytes())  # torch stores tensor bytes as they are
        data[at + len(first.images.numpy().tobytes()) // 2] ^= 0x5A
        path.write_bytes(bytes(data))
    else:  # the right shapes and a well-formed file: only the hash can tell
        blob = torch.load(path, weights_only=True)
        blob["images"][0, 0, 14, 14] ^= 1
        torch.save(blob, path)

    decodes = []
    real = of._decode_archives
    monkeypatch.setattr(of, "_decode_archives", lambda paths: decodes.append(1) or real(paths))
    with caplog.at_level(logging.WARNING, logger="metarun"):
        again = of.load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert decodes == [1]  # rebuilt, not served from the damaged file
    assert torch.equal(again.images, first.images) and again.characters == first.characters
    assert any("damaged" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metarun"):
        third = of.load_omniglot(tiny_root, cache_dir=cache, download=False)  # the rewritten cache is good
    assert decodes == [1] and torch.equal(third.images, first.images) and not caplog.records


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tiny_root: Path, tmp_path: Path) -> None:
    # Rule: untouched for STALE_TEMP_SECONDS. A concurrent writer's file is younger than that (a cache write
    # takes seconds; a download writes at least once per 60 s read timeout), a killed writer's grows older.
    cache, archives = tmp_path / "cache", tiny_root / "omniglot"
    cache.mkdir()
    old = time.time() - STALE_TEMP_SECONDS - 60
    stale = [cache / ".omniglot-v2-0123456789abcdef.pt.k1ll3d.tmp", archives / ".images_background.zip.k1ll3d.part"]
    fresh = [cache / ".omniglot-v2-0123456789abcdef.pt.w0rk1n.tmp", archives / ".images_evaluation.zip.w0rk1n.part"]
    others = [cache / "notes.tmp", archives / ".something-else.part"]  # not ours: never touched, however old
    for p in stale + fresh + others:
        p.write_bytes(b"half written")
    for p in stale + others:
        os.utime(p, (old, old))
    of.load_omniglot(tiny_root, cache_dir=cache, download=False)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in fresh + others)


def test_decoding_stops_between_characters_on_a_stop_request(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = []
    real = of._decode_png

    def decode_png(*args):
        decoded.append(1)
        if len(decoded) == 25:  # a SIGINT/SIGTERM arrives while the second character is decoded
            stop._requested.set()
        return real(*args)

    monkeypatch.setattr(of, "_decode_png", decode_png)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(stop.StopRequested):
            of.load_omniglot(tiny_root, cache_dir=cache, download=False)
    finally:
        stop._requested.clear()
    assert len(decoded) == 40  # the second character finished, the third never started
    assert not cache.exists() or list(cache.iterdir()) == []  # no cache, no temporary file


def test_a_zip_bomb_is_refused_before_it_is_inflated(tiny_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_root / "omniglot" / f"{BG}.zip"
    bomb = f"{BG}/Beta/character01/0001_01.png"
    write_zip(path, {**tiny_members(BG, TINY[BG]), bomb: bytes(of.MAX_PNG_BYTES + 1)})  # deflates to ~1 KB
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(
        getattr(name, "filename", name)) or real_open(self, name, *a, **k))
    with pytest.raises(DataError) as info:
        of.load_omniglot(tiny_root, cache_dir=tmp_path / "cache", download=False)
    assert f"{bomb} declares {of.MAX_PNG_BYTES + 1} bytes uncompressed" in one_line(info.value)
    assert opened == []  # refused from the directory alone: no member was read, let alone inflated


def test_default_cache_dir(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_root / "omniglot"
    of.load_omniglot(tiny_root, download=False)
    assert len(list(folder.glob("omniglot-v*.pt"))) == 1  # a writable root holds its own cache

    for p in folder.glob("*.pt"):
        p.unlink()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder.chmod(0o555)  # marked read-only; honoured even when the tests run as root
    try:
        before = snapshot(folder)
        assert of.default_cache_dir(tiny_root) == tmp_path / "xdg" / "metarun"
        of.load_omniglot(tiny_root, download=False)
        assert snapshot(folder) == before
        assert len(list((tmp_path / "xdg" / "metarun").glob("omniglot-v*.pt"))) == 1
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert of.default_cache_dir(tiny_root) == tmp_path / "home" / ".cache" / "metarun"
    finally:
        folder.chmod(stat.S_IRWXU)


def _flip_byte_inside_first_png(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(b"IHDR") + 6] ^= 0xFF  # inside a stored member, so only the CRC can notice
    path.write_bytes(bytes(data))


BG = "images_background"
BAD = {
    "not_a_zip": (lambda m, p: p.write_bytes(b"PK\x03\x04 but not really a zip" * 10), "not a readable zip"),
    "truncated": (lambda m, p: (write_zip(p, m), p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
                  "not a readable zip"),
    "missing_character_folder": (
        lambda m, p: write_zip(p, {k: v for k, v in m.items() if "/Alpha/character03/" not in k}),
        "it holds 2 alphabets, 4 characters, 80 images; expected 2, 5, 100",
    ),
    "crc_error": (lambda m, p: (write_zip(p, m, zipfile.ZIP_STORED), _flip_byte_inside_first_png(p)), "CRC"),
    "small_image": (
        lambda m, p: write_zip(p, {**m, f"{BG}/Beta/character01/0001_01.png": png_bytes(1, (104, 105))}),
        "0001_01.png is 104x105, expected 105x105",
    ),
    "undecodable_png": (
        lambda m, p: write_zip(p, {**m, f"{BG}/Beta/character01/0001_01.png": b"\x89PNG\r\n\x1a\nbroken"}),
        "0001_01.png does not decode",
    ),
    "19_and_21_images": (
        lambda m, p: write_zip(p, {**{k: v for k, v in m.items() if not k.endswith("0001_20.png")},
                                   f"{BG}/Beta/character02/0002_21.png": png_bytes(2)}),
        "Beta/character01 has 19 images, expected 20",
    ),
    "extra_alphabet": (
        lambda m, p: write_zip(p, {**m, **tiny_members(BG, {"Delta": 1})}),
        "it holds 3 alphabets, 6 characters, 120 images; expected 2, 5, 100",
    ),
    "wrong_top_folder": (
        lambda m, p: write_zip(p, {k.replace(BG, "images_evaluation", 1): v for k, v in m.items()}),
        "unexpected entry",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_archive_is_a_data_error(tiny_root: Path, tmp_path: Path, case: str) -> None:
    damage, expected = BAD[case]
    path = tiny_root / "omniglot" / f"{BG}.zip"
    damage(tiny_members(BG, TINY[BG]), path)
    with pytest.raises(DataError) as info:
        of.load_omniglot(tiny_root, cache_dir=tmp_path / "cache", download=False)
    message = one_line(info.value)
    assert message.startswith(f"Omniglot archive {path} is unusable: ")
    assert expected in message
    assert f"delete it so it is downloaded again, or replace it with the official file from {of.OFFICIAL_URL}" in message
