"""Omniglot archives: find or download them, decode and validate them once, cache the result."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from rich.progress import MofNCompleteColumn

from metarun.data.download import DownloadError, download_file
from metarun.errors import DataError
from metarun.utils import stop
from metarun.utils.display import transient_progress
from metarun.utils.files import atomic_write, remove_stale_temps

log = logging.getLogger("metarun")

OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

# Bump when decoding or the cache file changes (size, filter, layout, the stored hash): old cache files
# then simply stop matching. v2: the cache stores a sha256 of its content and is verified on load.
CACHE_FORMAT_VERSION = 2
IMAGES_PER_CHARACTER = 20
SOURCE_SIZE = 105
IMAGE_SIZE = 28
# The archives are untrusted input: an Omniglot PNG (105x105, 1 bit) takes under 1 KB (at most 578 bytes in
# the repacked copies), so a member declaring more than this uncompressed is a zip bomb or not Omniglot,
# refused before it is inflated.
MAX_PNG_BYTES = 1 << 20


@dataclass(frozen=True)
class ArchiveSpec:
    """What one official archive is: its checksums and what it must contain."""

    filename: str
    md5: str
    git_blob_sha1: str
    alphabets: int
    characters: int
    images: int
    max_bytes: int  # a download longer than this is cut: a cap, not the exact size

    @property
    def top_folder(self) -> str:
        return self.filename.removesuffix(".zip")


# The official byte sizes are not known offline; the git blob sha1 hashes b"blob <size>\0" + content,
# so it pins the size as well as the content. max_bytes, only a bound on an endless or huge response,
# is about twice the repacked copies' sizes (9,006,415 and 6,163,654 bytes).
ARCHIVES: dict[str, ArchiveSpec] = {
    "images_background": ArchiveSpec(
        filename="images_background.zip",
        md5="68d2efa1b9178cc56df9314c21c6e718",
        git_blob_sha1="71fd167eb6fdd312049395fbd247147a4b234231",
        alphabets=30,
        characters=964,
        images=19280,
        max_bytes=18_000_000,
    ),
    "images_evaluation": ArchiveSpec(
        filename="images_evaluation.zip",
        md5="6b91aef0f799c5bb55b94e3f2daec811",
        git_blob_sha1="8ccde0ed1565641f1fa8c57cdc6ff634e15fc5c1",
        alphabets=20,
        characters=659,
        images=13180,
        max_bytes=12_500_000,
    ),
}

# Fixed order: background characters first, then evaluation.
ARCHIVE_NAMES = ("images_background", "images_evaluation")


@dataclass
class OmniglotImages:
    """All Omniglot characters, decoded: ink bright (high values) on a 0 background."""

    images: torch.Tensor  # uint8 (characters, 20, 28, 28)
    alphabets: list[str]  # one per character
    characters: list[str]  # one per character, "Alphabet/characterNN"
    background: torch.Tensor  # bool (characters,), True for images_background characters


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _bad_archive(path: Path, problem: str) -> DataError:
    return DataError(
        _one_line(
            f"Omniglot archive {path} is unusable: {problem}; delete it so it is downloaded again, "
            f"or replace it with the official file from {OFFICIAL_URL}/{path.name}"
        )
    )


# Temporary files of interrupted writes: atomic_write's ".<name>.<random>.tmp" beside the cache and
# download_file's ".<name>.<random>.part" beside the archives.
CACHE_TEMPS = (".omniglot-*.pt.*.tmp",)
DOWNLOAD_TEMPS = tuple(f".{spec.filename}.*.part" for spec in ARCHIVES.values())


def _remove_stale_temps(folder: Path, patterns: tuple[str, ...]) -> None:
    for path in remove_stale_temps(folder, patterns):
        log.info(f"removed {path}, left by an interrupted write")


def find_or_download_archives(root: Path, url: str = OFFICIAL_URL, download: bool = True) -> dict[str, Path]:
    """Paths of both archives under ``root/omniglot``, downloading (and verifying) missing ones."""
    folder = Path(root) / "omniglot"
    url = url.rstrip("/")
    where = ("set data.root or METARUN_DATA_DIR to a folder with omniglot/images_background.zip and "
             "images_evaluation.zip")
    _remove_stale_temps(folder, DOWNLOAD_TEMPS)
    paths: dict[str, Path] = {}
    for name in ARCHIVE_NAMES:
        spec = ARCHIVES[name]
        path = folder / spec.filename
        # Present archives are trusted here and validated by content when decoded,
        # so repacked copies with other checksums still work.
        if not path.is_file():
            if not download:
                raise DataError(f"Omniglot archive {path} is missing and data.download is false: {where}")
            try:
                download_file(f"{url}/{spec.filename}", path, md5=spec.md5, git_blob_sha1=spec.git_blob_sha1,
                              max_size=spec.max_bytes)
            except DownloadError as e:
                raise DataError(_one_line(f"download of {url}/{spec.filename} failed ({e.problem}): {where}")) from e
        paths[name] = path
    return paths


def _archive_key(paths: dict[str, Path]) -> str:
    """sha256 over both archives' bytes: any different archive gets a different cache file."""
    combined = hashlib.sha256()
    for name in ARCHIVE_NAMES:
        h = hashlib.sha256()
        with open(paths[name], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        combined.update(name.encode() + b"\0" + h.digest())
    return combined.hexdigest()


def _is_writable_dir(folder: Path) -> bool:
    try:
        st = folder.stat()
    except OSError:
        return False
    # root passes os.access even on folders marked read-only; honour the mode bits so a shared
    # read-only data folder is never written into.
    write_bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    return stat.S_ISDIR(st.st_mode) and bool(st.st_mode & write_bits) and os.access(folder, os.W_OK)


def default_cache_dir(root: Path) -> Path:
    """``root/omniglot`` if writable, else ``$XDG_CACHE_HOME/metarun`` or ``~/.cache/metarun``."""
    folder = Path(root) / "omniglot"
    if _is_writable_dir(folder):
        return folder
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "metarun"


def cache_file_name(paths: dict[str, Path]) -> str:
    """Cache file name for these archives: format version plus a short content hash."""
    return f"omniglot-v{CACHE_FORMAT_VERSION}-{_archive_key(paths)[:16]}.pt"


def _expected_characters() -> int:
    return sum(ARCHIVES[name].characters for name in ARCHIVE_NAMES)


def _content_hash(images: torch.Tensor, alphabets: list[str], characters: list[str],
                  background: torch.Tensor) -> str:
    """sha256 of the decoded images and their metadata: what the cache file must hold exactly."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT_VERSION, list(images.shape), alphabets, characters]).encode())
    h.update(images.contiguous().numpy())
    h.update(background.to(torch.uint8).contiguous().numpy())
    return h.hexdigest()


def _read_cache(path: Path) -> OmniglotImages | None:
    """The cached images, or None when the file is missing, unreadable or not exactly what we wrote."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images, background = blob["images"], blob["background"]
        alphabets, characters = list(blob["alphabets"]), list(blob["characters"])
        n = _expected_characters()
        ok = (
            isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and tuple(images.shape) == (n, IMAGES_PER_CHARACTER, IMAGE_SIZE, IMAGE_SIZE)
            and isinstance(background, torch.Tensor)
            and background.dtype == torch.bool
            and tuple(background.shape) == (n,)
            and len(alphabets) == n
            and len(characters) == n
            and all(isinstance(x, str) for x in alphabets + characters)
        )
        # The right shapes are not enough: flipped bits on disk would train on wrong pixels.
        ok = ok and blob.get("sha256") == _content_hash(images, alphabets, characters, background)
    except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
        ok = False
    if not ok:
        log.warning(f"the Omniglot cache {path} is damaged (unreadable, or its content does not match its stored "
                    f"sha256): decoding again")
        return None
    return OmniglotImages(images=images, alphabets=alphabets, characters=characters, background=background)


def _write_cache(path: Path, data: OmniglotImages) -> None:
    """Write atomically; a failure only costs decoding again next time."""
    try:
        with atomic_write(path) as f:
            torch.save(
                {
                    "images": data.images,
                    "alphabets": data.alphabets,
                    "characters": data.characters,
                    "background": data.background,
                    "sha256": _content_hash(data.images, data.alphabets, data.characters, data.background),
                },
                f,
            )
    except OSError as e:
        log.warning(f"could not write the Omniglot cache {path} ({e.strerror or e}); "
                    f"it will be decoded again next time")


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _bad_archive(path, f"not a readable zip file ({e}), e.g. truncated or not a zip") from e


def _scan(zf: zipfile.ZipFile, path: Path, spec: ArchiveSpec) -> list[tuple[str, str, list[str]]]:
    """Sorted (alphabet, character folder, member names sorted by file name), with counts checked."""
    members: dict[tuple[str, str], list[str]] = {}
    for info in zf.infolist():
        name = info.filename
        base = name.rsplit("/", 1)[-1]
        # macOS zip droppings and non-PNG files are not part of the data set.
        if info.is_dir() or name.startswith("__MACOSX/") or base.startswith("._"):
            continue
        if not base.lower().endswith(".png"):
            continue
        if info.file_size > MAX_PNG_BYTES:
            raise _bad_archive(path, f"{name} declares {info.file_size} bytes uncompressed, more than the "
                                     f"{MAX_PNG_BYTES} an Omniglot image can take (a zip bomb?)")
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != spec.top_folder:
            raise _bad_archive(path, f"unexpected entry {name!r}, expected {spec.top_folder}/ALPHABET/characterNN/*.png")
        members.setdefault((parts[1], parts[2]), []).append(name)

    n_alphabets = len({alphabet for alphabet, _ in members})
    n_images = sum(len(names) for names in members.values())
    counts = (
        f"{n_alphabets} alphabets, {len(members)} characters, {n_images} images; "
        f"expected {spec.alphabets}, {spec.characters}, {spec.images}"
    )
    if (n_alphabets, len(members), n_images) != (spec.alphabets, spec.characters, spec.images):
        raise _bad_archive(path, f"it holds {counts}")
    for (alphabet, character), names in sorted(members.items()):
        if len(names) != IMAGES_PER_CHARACTER:
            raise _bad_archive(
                path, f"{alphabet}/{character} has {len(names)} images, expected {IMAGES_PER_CHARACTER}"
            )
    return [
        (alphabet, character, sorted(names, key=lambda n: n.rsplit("/", 1)[-1]))
        for (alphabet, character), names in sorted(members.items())
    ]


def _decode_png(zf: zipfile.ZipFile, path: Path, member: str) -> np.ndarray:
    try:
        data = zf.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as e:
        raise _bad_archive(path, f"cannot read {member} ({e})") from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (SOURCE_SIZE, SOURCE_SIZE):
                raise _bad_archive(
                    path, f"{member} is {im.size[0]}x{im.size[1]}, expected {SOURCE_SIZE}x{SOURCE_SIZE}"
                )
            # Omniglot draws black ink on white; invert so ink is bright and the background is 0.
            inverted = ImageOps.invert(im.convert("L"))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _bad_archive(path, f"{member} does not decode as an image ({e})") from e
    return np.asarray(inverted.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS), dtype=np.uint8)


def _decode_archives(paths: dict[str, Path]) -> OmniglotImages:
    """Decode and validate both archives (about 10 s on one core, so no worker processes)."""
    with contextlib.ExitStack() as stack:
        layouts = []
        # Check every archive's structure before decoding any, so a bad file fails in seconds.
        for name in ARCHIVE_NAMES:
            zf = stack.enter_context(_open_zip(paths[name]))
            layouts.append((name, zf, _scan(zf, paths[name], ARCHIVES[name])))

        n_characters = sum(len(layout) for _, _, layout in layouts)
        images = np.zeros((n_characters, IMAGES_PER_CHARACTER, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        alphabets: list[str] = []
        characters: list[str] = []
        background: list[bool] = []
        progress = transient_progress(MofNCompleteColumn())
        with progress:
            task = progress.add_task("decoding Omniglot", total=n_characters * IMAGES_PER_CHARACTER)
            for name, zf, layout in layouts:
                for alphabet, character, members in layout:
                    stop.check()  # a character takes milliseconds: SIGINT/SIGTERM stop the ~10 s decode at once
                    index = len(characters)
                    for drawer, member in enumerate(members):
                        images[index, drawer] = _decode_png(zf, paths[name], member)
                    alphabets.append(alphabet)
                    characters.append(f"{alphabet}/{character}")
                    background.append(name == "images_background")
                    progress.advance(task, len(members))

    return OmniglotImages(
        images=torch.from_numpy(images),
        alphabets=alphabets,
        characters=characters,
        background=torch.tensor(background, dtype=torch.bool),
    )


def load_omniglot(
    root: Path,
    cache_dir: Path | None = None,
    url: str = OFFICIAL_URL,
    download: bool = True,
) -> OmniglotImages:
    """All 1623 Omniglot characters, decoded once into a cache file and loaded from it afterwards."""
    paths = find_or_download_archives(root, url=url, download=download)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    _remove_stale_temps(folder, CACHE_TEMPS)
    cache_path = folder / cache_file_name(paths)
    cached = _read_cache(cache_path)
    if cached is not None:
        return cached
    data = _decode_archives(paths)
    _write_cache(cache_path, data)
    return data
