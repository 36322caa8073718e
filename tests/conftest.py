"""Session-wide fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
