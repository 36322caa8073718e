"""``metarun TASK [hydra overrides]``: a small dispatcher in front of each task's ``@hydra.main``.

Hydra has no subcommands, so the task word is removed from ``sys.argv`` before the task's Hydra
entry point runs; Hydra's own flags (``-m``, ``--cfg job``, ``--info``, ``--help``) keep working
after it. Errors from bad input are printed as one line naming the problem and the fix.
"""

import importlib
import logging
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


# Config groups that only training composes; eval rebuilds them from the checkpoint's config.
TRAIN_ONLY_GROUPS = ("algo", "data", "model", "optimizer", "scheduler", "experiment")


def eval_group_choice(error: BaseException) -> str | None:
    """What an eval command line set of the train-only groups (``algo=fomaml``, ``data.shots=5``), if that failed."""
    import re

    text = " ".join(str(e) for e in (error, error.__cause__) if e is not None)
    groups = "|".join(TRAIN_ONLY_GROUPS)
    for pattern in (rf"use \+((?:{groups})(?:\.[\w.]+)?=\S*)",  # Hydra quotes the override it could not apply
                    rf"Could not (?:override|append to) '((?:{groups})(?:\.[\w.]+)?)'",
                    rf"Could not delete '((?:{groups})(?:\.[\w.]+)?)'",
                    rf"In '(?:schema_)?({groups})[_/]"):  # +algo=fomaml: its schema clashes with eval's algo keys
        if found := re.search(pattern, text):
            return ("~" if "delete" in pattern else "") + found.group(1)
    return None


def describe(error: BaseException, task: str) -> str:
    """One line for a user error: Hydra's and OmegaConf's multi-line messages folded."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                                  ValidationError)

    cause = error.__cause__
    if task == "eval" and (choice := eval_group_choice(error)):
        return (f"metarun eval takes the algorithm, data and model from the checkpoint: leave out {choice} "
                f"('metarun eval --help' lists the keys it takes)")
    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").rsplit("/", 1)[0]
        first = str(error).splitlines()[0].split(": ", 1)[-1]
        return f"{first}: choose {group} from {', '.join(sorted(error.options))}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        return f"unknown key '{cause.full_key}': check its spelling ('metarun {task} --cfg job' lists every key)"
    missing = next((e for e in (error, cause) if isinstance(e, MissingMandatoryValue)), None)
    if missing is not None and getattr(missing, "full_key", None):
        return f"{missing.full_key} is required: give it on the command line ({missing.full_key}=...; 'metarun {task} --help')"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    parts = [str(error)] + ([str(cause)] if isinstance(cause, OmegaConfBaseException) else [])
    lines = [line.strip() for part in parts for line in part.splitlines()]
    skip = ("Config search path", "provider=", "object_type=", "reference_type=")
    return " ".join(line for line in lines if line and not line.startswith(skip)) or type(error).__name__


class FailedJobs:
    """Stands in for stderr during a Hydra call: takes Hydra's 'Error executing job with overrides'
    line, which would make a second line, and remembers which job failed."""

    PREFIX = "Error executing job with overrides: "

    def __init__(self, stream):
        self.stream, self.overrides = stream, []

    def write(self, text):
        if text.startswith(self.PREFIX):
            self.overrides.append(text[len(self.PREFIX):].strip())
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


COMPLETION_FLAGS = ("-sc", "--shell-completion")


def completion_task(argv: list[str]) -> str | None:
    """Shell completion shim. Hydra's bash script calls back ``metarun -sc query=bash`` with the whole
    command line in COMP_LINE: complete the task word here, or route to the task's Hydra with the
    task word taken out of COMP_LINE (Hydra expects ``app overrides...``)."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    task_word_done = len(words) >= 3 or (len(words) == 2 and line[-1:].isspace())
    if len(words) >= 2 and words[1] in TASKS and task_word_done:
        os.environ["COMP_LINE"] = line.replace(f" {words[1]}", "", 1)
        return words[1]
    if any(a.startswith("query=") for a in argv[1:]):
        print(" ".join(TASKS))
        return None
    return "train"  # install/uninstall: any task's Hydra writes the same script, registered as 'metarun'


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMPLETION_FLAGS:
        task = completion_task(argv)
        if task is None:
            return 0
        argv = [task, *argv]
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
    logging.raiseExceptions = debug  # a log write that fails (full disk) prints no traceback; the next save reports it
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = ["metarun", *argv[1:]]  # the name Hydra's shell completion registers
    from metarun.errors import MetarunError

    stderr = sys.stderr = FailedJobs(sys.stderr)
    try:
        if task == "train":
            from metarun.resume import with_run_overrides

            sys.argv = ["metarun", *with_run_overrides(argv[1:])]  # a bare hydra.run.dir=X resumes X as it was
        importlib.import_module(TASKS[task][0]).main()
    except KeyboardInterrupt:
        print("metarun: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception as e:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from metarun.utils.faults import user_error

        e = user_error(e) or e  # a fault of the machine before the run started (Hydra creating the run directory)

        if debug or not isinstance(e, (MetarunError, HydraException, OmegaConfBaseException)):
            traceback.print_exc()  # a bug, not bad input: keep the traceback for the report
            return 1
        multirun = {"-m", "--multirun"} & set(argv) and stderr.overrides
        job = f"job {stderr.overrides[0]} failed (the other jobs ran): " if multirun else ""
        print(f"metarun: error: {job}{describe(e, task)}", file=sys.stderr)
        return 2
    finally:
        sys.stderr = stderr.stream
    return 0


if __name__ == "__main__":
    sys.exit(main())
