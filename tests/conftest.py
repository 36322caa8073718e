"""Session-wide fixtures shared by the test modules."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from metarun.data.official_archive import OfficialArchive
from metarun.data.omniglot_files import ARCHIVES, OmniglotImages, load_omniglot


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """Data root holding the real omniglot/*.zip, from $METARUN_DATA_DIR; tests that need it skip without it.

    No fallback to a folder outside the repository: a fresh clone must pass its tests on its own, and CI
    sets METARUN_DATA_DIR. The data layer is also tested on generated archives, which need nothing.
    """
    env = os.environ.get("METARUN_DATA_DIR")
    if not env:
        pytest.skip("needs the real Omniglot archives: set METARUN_DATA_DIR to a folder with "
                    "omniglot/images_background.zip and omniglot/images_evaluation.zip")
    # Absolute, so subprocess tests running in other folders find it (the README uses ../shared/data).
    root = Path(env).expanduser().resolve()
    missing = [spec.filename for spec in ARCHIVES.values() if not (root / "omniglot" / spec.filename).is_file()]
    if missing:
        pytest.skip(f"needs the real Omniglot archives: METARUN_DATA_DIR={env} has no omniglot/{' or '.join(missing)}")
    return root


@pytest.fixture(scope="session")
def shared_data_before(shared_data_root: Path) -> dict[str, tuple[int, int]]:
    """The data root as it was before this session loaded anything from it (it may hold a user's own
    decode cache from earlier runs: only changes made by the tests count)."""
    return snapshot(shared_data_root)


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session cache dir, so the full dataset is decoded once per test run."""
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def omniglot(shared_data_root: Path, shared_data_before: dict, omniglot_cache_dir: Path) -> OmniglotImages:
    """The shared archives, decoded once per session."""
    return load_omniglot(shared_data_root, cache_dir=omniglot_cache_dir, download=False)


# ------------------------------------------------------------------------------ generated image datasets

# Enough for every image experiment's episodes: ProtoNets train 30-way (5-shot: 20-way) with 15 queries,
# MAML's 5-shot takes 5 + 15 images per class, Reptile 15 training shots; 20 images a class cover them all.
IMAGE_CLASSES = {"train": 32, "val": 6, "test": 6}
IMAGES_PER_CLASS = 20


@dataclass(frozen=True)
class GeneratedImageData:
    """A data root holding small miniImageNet, tieredImageNet and CIFAR-100 files in their real formats,
    and the CIFAR-100 archive spec that accepts the generated archive (its md5 is not the official one)."""

    root: Path
    cifar100_archive: OfficialArchive


@pytest.fixture(scope="session")
def generated_image_data(tmp_path_factory: pytest.TempPathFactory) -> GeneratedImageData:
    """Written once per session; each dataset's store is decoded beside its files on first use, then reused."""
    import image_fixtures
    from cifar_cub_fixtures import cifar_pickles, write_cifar100_archive
    from metarun.data import cifar
    from metarun.data.download import file_md5

    root = tmp_path_factory.mktemp("image_data")
    image_fixtures.write_mini_pickles(root, per_class=IMAGES_PER_CLASS, classes=IMAGE_CLASSES)
    with pytest.MonkeyPatch.context() as mp:  # the tiered writer takes its class sizes from tiered_classes
        mp.setattr(image_fixtures, "tiered_classes", partial(image_fixtures.tiered_classes,
                                                             sizes=(IMAGES_PER_CLASS, IMAGES_PER_CLASS + 3)))
        image_fixtures.write_tiered_pickles(root, classes={s: (n, 2) for s, n in IMAGE_CLASSES.items()})
    # CIFAR-FS's class lists are the paper's: all 100 CIFAR-100 classes, train and test images pooled.
    path = write_cifar100_archive(cifar.CIFAR100_ARCHIVE.path(root),
                                  cifar_pickles(train_per_class=IMAGES_PER_CLASS - 5, test_per_class=5))
    return GeneratedImageData(root, dataclasses.replace(cifar.CIFAR100_ARCHIVE, md5=file_md5(path)))


@pytest.fixture
def image_data_root(generated_image_data: GeneratedImageData, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The generated data root, with the generated CIFAR-100 archive accepted for this test only."""
    from metarun.data import cifar

    monkeypatch.setattr(cifar, "CIFAR100_ARCHIVE", generated_image_data.cifar100_archive)
    return generated_image_data.root


@pytest.fixture(autouse=True)
def execution_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test its own execution cache (metarun.execution): no test writes to the user's cache dir
    or takes a path another test timed. Subprocesses inherit it through the environment."""
    path = tmp_path_factory.mktemp("execution") / "execution.json"
    monkeypatch.setenv("METARUN_EXECUTION_CACHE", str(path))
    return path
