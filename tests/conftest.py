"""Session-wide fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metarun.data.omniglot_files import ARCHIVES, OmniglotImages, load_omniglot

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """Read-only data root holding omniglot/*.zip: $METARUN_DATA_DIR, else <repo>/../shared/data."""
    env = os.environ.get("METARUN_DATA_DIR")
    # Absolute, so subprocess tests running in other folders find it (the README uses ../shared/data).
    root = (Path(env) if env else REPO_ROOT.parent / "shared" / "data").resolve()
    missing = [str(root / "omniglot" / spec.filename) for spec in ARCHIVES.values()
               if not (root / "omniglot" / spec.filename).is_file()]
    if missing:
        # Failing, not skipping: silently skipped data tests would hide a broken setup.
        pytest.fail(f"Omniglot archives missing: {', '.join(missing)}; set METARUN_DATA_DIR to a folder "
                    f"with omniglot/images_background.zip and omniglot/images_evaluation.zip", pytrace=False)
    return root


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session cache dir, so the full dataset is decoded once per test run."""
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def omniglot(shared_data_root: Path, omniglot_cache_dir: Path) -> OmniglotImages:
    """The shared archives, decoded once per session."""
    return load_omniglot(shared_data_root, cache_dir=omniglot_cache_dir, download=False)
