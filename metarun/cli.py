"""``metarun TASK [hydra overrides]``: a small dispatcher in front of each task's ``@hydra.main``.

Hydra has no subcommands, so the task word is removed from ``sys.argv`` before the task's Hydra
entry point runs; Hydra's own flags (``-m``, ``--cfg job``, ``--info``, ``--help``) keep working
after it. Errors from bad input are printed as one line naming the problem and the fix.
"""

import importlib
import os
import sys
import traceback

from metarun import __version__

TASKS = {
    "train": ("metarun.train", "meta-train, validate and meta-test: metarun train algo=maml data=omniglot"),
    "eval": ("metarun.evaluate", "meta-test a saved checkpoint: metarun eval ckpt=PATH [test.episodes=N]"),
}

USAGE = f"""usage: metarun TASK [overrides] [hydra flags]

metarun {__version__}: meta-learning experiments from the shell, configured with Hydra.

tasks:
{chr(10).join(f"  {name:<7}{text}" for name, (_, text) in TASKS.items())}

examples:
  metarun train algo=maml data=omniglot
  metarun train -m algo.inner_lr=0.1,0.4 data.shots=1,5
  metarun train --cfg job          show the composed config
  metarun train --help             config groups and Hydra flags
  metarun eval ckpt=outputs/train/runs/DATE/checkpoints/best.pt
"""


def describe(error: BaseException) -> str:
    """One line for a user error: Hydra's and OmegaConf's multi-line messages folded."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").rsplit("/", 1)[0]
        first = str(error).splitlines()[0].replace("In 'train': ", "").replace("In 'eval': ", "")
        return f"{first}: choose {group} from {', '.join(sorted(error.options))}"
    parts = [str(error)]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        parts.append(str(cause))
    lines = []
    for part in parts:
        for line in part.splitlines():
            line = line.strip()
            if not line or line.startswith(("Config search path", "provider=", "object_type=", "reference_type=")):
                continue
            if line.startswith("full_key:") and any("full_key" in x for x in lines):
                continue
            lines.append(line)
    return " ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] == "--version":
        print(f"metarun {__version__}")
        return 0
    task = argv[0]
    if task not in TASKS:
        print(f"metarun: error: unknown task '{task}': choose one of {', '.join(TASKS)} (metarun --help)", file=sys.stderr)
        return 2

    # Hydra re-raises instead of printing its own multi-line report, so every error gets one line here.
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [f"metarun-{task}", *argv[1:]]
    from metarun.errors import MetarunError

    try:
        importlib.import_module(TASKS[task][0]).main()
    except KeyboardInterrupt:
        print("metarun: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception as e:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if debug:
            traceback.print_exc()
        elif isinstance(e, (MetarunError, HydraException, OmegaConfBaseException)):
            print(f"metarun: error: {describe(e)}", file=sys.stderr)
        else:  # a bug, not bad input: keep the traceback for the report
            traceback.print_exc()
        return getattr(e, "exit_code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
