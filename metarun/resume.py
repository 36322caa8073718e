"""The resume policy: what a resume may change (``check_resumable``), and how
``metarun train hydra.run.dir=X`` alone resumes the run in X as it was started.

Every checkpoint stores the overrides that made its run (``overrides``). Before Hydra composes the
config, the dispatcher puts them in front of the command line's own, so the run directory's config
is the base of a resume; an override given on the command line wins for its key, and the trainer
then checks the result against the checkpoint (``check_resumable``) as for any resume.

The stored overrides come from disk: only plain changes of the run's own groups and keys are taken
(no ``hydra.*``, no ``+``/``~``, no ``_target_``-like keys), so a crafted checkpoint cannot reach
Hydra's launcher, callbacks or the classes it instantiates.
"""

import re
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from metarun.errors import MetarunError
from metarun.experiment import flat_config, upgraded_config, upgraded_override
from metarun.utils.checkpoint import load_checkpoint

RUN_GROUPS = ("data", "model", "algo", "optimizer", "scheduler", "device", "experiment")
# A group choice (algo=fomaml) or a key of the run's own config (algo.inner_lr=0.1, seed=3); no
# component starts with "_" (Hydra's _target_, _partial_, _args_...).
_SAFE_KEY = re.compile(rf"^(({'|'.join(RUN_GROUPS)})|((data|model|algo|optimizer|scheduler|device|train|test)"
                       rf"(\.[A-Za-z][A-Za-z0-9_]*)+)|seed)$")
MULTIRUN_FLAGS = ("-m", "--multirun")

# Keys that may change between a run and its resumption without changing what it computes.
# test.eval_seed is not among them: it fixes the validation tasks that choose the best checkpoint.
RESUMABLE_CHANGES = ("train.iterations", "train.val_every", "train.log_every", "train.task_chunk", "test.episodes", "test.checkpoint",
                     "device.", "algo.batching",
                     "data.root", "data.cache_dir", "data.url", "data.download")


def check_resumable(saved: dict, cfg: DictConfig, path: Path) -> None:
    """Refuse to resume from ``path`` (a checkpoint whose resolved config is ``saved``) when ``cfg``
    changes anything but ``RESUMABLE_CHANGES``: the resumed run must compute what the first one did."""
    now = flat_config(cfg)
    for key, value in flat_config(OmegaConf.create(upgraded_config(saved))).items():
        if key.startswith(RESUMABLE_CHANGES) or now.get(key) == value:
            continue
        raise MetarunError(
            f"{path} was written with {key}={value}, this run has {key}={now.get(key)}: "
            f"resume with the same settings or start a new run directory"
        )


def _run_dir_argument(argv: list[str]) -> int | None:
    """Index of the last ``hydra.run.dir=X`` on the command line."""
    found = None
    for i, arg in enumerate(argv):
        if arg.startswith("hydra.run.dir="):
            found = i
    return found


def _parse(overrides: list[str], where: str):
    try:
        return OverridesParser.create().parse_overrides(overrides=overrides)
    except HydraException as e:
        raise MetarunError(f"{where} holds overrides that do not parse ({str(e).splitlines()[0]}): "
                           f"start a new run directory") from None


def saved_overrides(run_dir: Path) -> list[str] | None:
    """The overrides stored with ``run_dir``'s last checkpoint, checked; None where there are none."""
    last = run_dir / "checkpoints" / "last.pt"
    if not (last.exists() or last.is_symlink()):
        return None
    overrides = load_checkpoint(last).get("overrides")  # a damaged one is reported now, not after a default config
    if overrides is None:
        return None  # written by a metarun before checkpoints kept them: the command line decides
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise MetarunError(f"{last} is damaged: its 'overrides' is not a list of strings; start a new run directory")
    for override in _parse(overrides, str(last)):
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.package or not _SAFE_KEY.match(key):
            raise MetarunError(f"{last} holds the override '{override.input_line}', which a resume never applies "
                               f"(a checkpoint is data, never code): start a new run directory")
    return [upgraded_override(o) for o in overrides]


def with_run_overrides(argv: list[str]) -> list[str]:
    """``argv`` of ``metarun train`` with the resumed run's own overrides in front of its own."""
    index = _run_dir_argument(argv)
    if index is None or any(flag in argv for flag in MULTIRUN_FLAGS):
        return argv
    run_dir = Path(argv[index].split("=", 1)[1].strip("'\"")).expanduser()
    saved = saved_overrides(run_dir)
    if not saved:
        return argv
    given = {o.key_or_group for o in _parse([a for a in argv if "=" in a and not a.startswith("-")], "the command line")}
    kept = [o.input_line for o in _parse(saved, str(run_dir)) if o.key_or_group not in given]
    return [*argv[:index], *kept, *argv[index:]]  # among the command line's overrides, so argparse reads one list
