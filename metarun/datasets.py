"""``metarun data``: which datasets are on disk, and getting one there.

    metarun data list [data.root=PATH] [data.cache_dir=PATH]
    metarun data prepare NAME [data.KEY=VALUE ...]

``list`` shows every ``data=`` option: whether its files are present and verified (by checksum where
the dataset has an official download, by content otherwise), whether they are decoded into the cache,
their size on disk and the decoded store's size in memory. ``prepare`` downloads what can be
downloaded (with a progress bar), verifies it, decodes it once into the cache and says how long that
took. It composes the same config as ``metarun train data=NAME``, so every ``data.*`` key means the
same here (``data.split``, ``data.crop``, ``data.root``), and a decoded store is the one a run uses.
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import NamedTuple

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from metarun.errors import DataError, MetarunError

USAGE = """usage: metarun data list [data.root=PATH] [data.cache_dir=PATH]
       metarun data prepare NAME [data.KEY=VALUE ...]

  list       every dataset: files present and verified, decoded into the cache, size on disk and in memory
  prepare    download (where an official download exists), verify and decode NAME once into the cache
"""


class FilesStatus(NamedTuple):
    problem: str | None  # why the files cannot be used (missing, and what to put where); None when found
    verified: bool  # checked against a published checksum (else checked by content when decoded)
    disk_bytes: int | None  # the source files
    store: Path | None  # the decoded store (folder or cache file), None until decoded
    memory_bytes: int | None  # the decoded store's size in memory


def files_status(tasks_class: type, data: dict) -> FilesStatus:
    """What ``list`` says of the files behind ``data`` (a ``data=NAME`` config as a dict, of an ImageTasks
    class): found and verified, their size, and whether they are decoded, without downloading or decoding."""
    dataset = tasks_class.dataset
    accepted = inspect.signature(dataset.__init__).parameters
    options = {k: data[k] for k in accepted if k not in ("self", "root", "split") and k in data}
    tasks = tasks_class.__new__(tasks_class)  # not a task source: only where its files and store are
    tasks._set_source(data["root"], data.get("split") or dataset.split_names[0], data.get("cache_dir"), options)
    try:
        files = tasks.data.locate(download=False)
    except DataError as e:
        return FilesStatus(problem=str(e), verified=False, disk_bytes=None, store=None, memory_bytes=None)
    store, nbytes = tasks.decoded(files)
    verified = dataset.checksum is not None and getattr(tasks.data, "checksummed", True)
    return FilesStatus(None, verified, tasks.data.disk_bytes(files), store, nbytes)


def data_config(name: str, overrides: list[str]) -> DictConfig:
    """``data`` of ``metarun train data=NAME OVERRIDES``, validated as a run would validate it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metarun.config import TARGETS, conf_dir
    from metarun.validation import validate_train

    if name not in TARGETS["data"]:
        raise MetarunError(f"unknown dataset '{name}': choose one of {', '.join(TARGETS['data'])} (metarun data list)")
    bad = [o for o in overrides if not o.startswith("data.") or "=" not in o]
    if bad:
        raise MetarunError(f"'{bad[0]}' is not a data key: metarun data takes data.KEY=VALUE overrides only")
    from metarun.cli import describe

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[f"data={name}", *overrides])
    except Exception as e:  # Hydra's and OmegaConf's errors, in the words metarun train would use
        if not is_user_error(e):
            raise
        raise MetarunError(f"data={name}: {describe(e, 'train')}") from None
    finally:
        GlobalHydra.instance().clear()
    validate_train(cfg)
    for key in ("root", "cache_dir"):  # '' would silently mean the current folder
        if key in cfg.data and cfg.data[key] is not None and not str(cfg.data[key]).strip():
            raise MetarunError(f"data.{key} is empty: give a folder (data.{key}=DIR)"
                               + (" or set METARUN_DATA_DIR" if key == "root" else ""))
    return cfg.data


def is_user_error(error: BaseException) -> bool:
    from metarun.cli import is_user_error as user_error

    return user_error(error)


def size_text(nbytes: int | None) -> str:
    from metarun.data.store import size_text as text

    return "-" if nbytes is None else text(nbytes)


def list_datasets(overrides: list[str]) -> tuple[Table, list[str]]:
    from metarun.config import TARGETS
    from metarun.data.images import ImageTasks

    table = Table(title="metarun datasets", title_justify="left")
    for column in ("data=", "dataset", "files", "on disk", "decoded", "in memory"):
        table.add_column(column)
    root, missing = None, []
    for o in overrides:
        if o.split("=", 1)[0] not in ("data.root", "data.cache_dir") or "=" not in o:
            raise MetarunError(f"'{o}' is not taken by metarun data list: it takes data.root=DIR and data.cache_dir=DIR")
    keys = {name: set(data_config(name, []).keys()) for name in TARGETS["data"]}
    for name in TARGETS["data"]:
        # data.root and data.cache_dir apply to the datasets that have them (not sinusoid)
        cfg = data_config(name, [o for o in overrides if o.split("=", 1)[0].removeprefix("data.") in keys[name]])
        tasks = get_class(cfg._target_)
        root = cfg.get("root", root)
        if not issubclass(tasks, ImageTasks):
            table.add_row(name, tasks.__name__.removesuffix("Tasks"), "none (generated)", "-", "-", "-")
            continue
        status = files_status(tasks, OmegaConf.to_container(cfg, resolve=True))
        if status.problem:
            files, reason = listed_problem(name, status.problem, tasks.dataset.downloads)
            missing.append(f"{name}: {reason}")
        else:
            files = f"verified ({tasks.dataset.checksum})" if status.verified else "present"
        decoded = "yes" if status.store is not None else "no"
        table.add_row(name, tasks.dataset.title, files, size_text(status.disk_bytes), decoded,
                      size_text(status.memory_bytes))
    table.caption = f"data.root: {root}"
    return table, missing


def listed_problem(name: str, problem: str, downloads: bool) -> tuple[str, str]:
    """The files column (``missing`` or ``unusable``) and the note under the table for a dataset whose files
    cannot be used. The data layer words its errors for a run; ``list`` never downloads, so where a run
    would say ``data.download is false``, the note says what downloads it."""
    missing = " is missing" in problem or problem.startswith(("no ", "missing "))
    for said, meant in ((" and data.download is false", ""), (", or set data.download=true", ""),
                        (" or set data.download=true", "")):
        problem = problem.replace(said, meant)
    if missing and downloads:
        problem += f" (metarun data prepare {name} downloads it)"
    return ("missing" if missing else "unusable"), problem


def prepare(name: str, overrides: list[str]) -> str:
    from metarun.data.images import ImageTasks
    from metarun.utils.runtime import build

    cfg = data_config(name, overrides)
    tasks = get_class(cfg._target_)
    if not issubclass(tasks, ImageTasks):
        return f"{name}: nothing to prepare (its tasks are generated)"
    # Only the store is prepared: the run's task sizes (data.shots=20 on a fixture of 6 images a class) are
    # checked by the run itself, so prepare builds the smallest tasks and never places the store in memory.
    for key in ("train_ways", "train_shots", "train_queries"):
        if key in cfg:
            cfg[key] = None
    cfg.ways, cfg.shots, cfg.queries = 2, 1, 1
    data = OmegaConf.to_container(cfg, resolve=True)
    already = files_status(tasks, data).store is not None
    start = time.perf_counter()
    source = build(cfg)  # finds or downloads, verifies, and decodes into the cache once
    seconds = time.perf_counter() - start
    status = files_status(tasks, data)
    classes = "/".join(str(len(source.split_class_indices[s])) for s in ("train", "val", "test"))
    done = "already decoded" if already else "decoded"
    where = f" in {status.store}" if status.store is not None else ""
    return (f"{tasks.dataset.title} ready in {seconds:.1f} s: {size_text(status.memory_bytes)} {done}{where}  "
            f"split: {source.split_name}: {classes} train/val/test classes")


def main(argv: list[str]) -> int:
    from metarun.utils.display import console

    if not argv or any(a in ("-h", "--help") for a in argv) or argv[0] == "help":
        print(USAGE, end="")
        return 0
    action, rest = argv[0], argv[1:]
    if action == "list":
        table, missing = list_datasets(rest)
        console().print(table)
        for line in missing:  # what to put where, in the dataset's own words
            console().print(f"- {line}", highlight=False, markup=False, soft_wrap=True)
        return 0
    if action == "prepare":
        if not rest or "=" in rest[0]:
            raise MetarunError("metarun data prepare needs a dataset name: metarun data prepare NAME (metarun data list)")
        print(prepare(rest[0], rest[1:]))
        return 0
    raise MetarunError(f"unknown data command '{action}': use metarun data list or metarun data prepare NAME")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
