"""``metarun COMMAND [hydra overrides]``: a small dispatcher in front of each command's ``@hydra.main``.

Hydra has no subcommands, so the command word is removed from ``sys.argv`` before the command's
Hydra entry point runs; Hydra's own flags (``-m``, ``--cfg job``, ``--info``, ``--help``) keep
working after it. Errors from bad input are printed as one line naming the problem and the fix;
which jobs of a sweep failed comes from Hydra's job results (``metarun.utils.jobs``).
"""

import importlib
import logging
import os
import sys
import traceback

from metarun import __version__

COMMANDS = {
    "train": ("metarun.train", "meta-train, validate and meta-test: metarun train algo=maml data=omniglot"),
    "eval": ("metarun.evaluate", "meta-test a saved checkpoint: metarun eval ckpt=PATH [test.episodes=N]"),
    "data": ("metarun.datasets", "the datasets on disk, and getting one there: metarun data list | prepare NAME"),
    "report": ("metarun.report", "a sweep's results, seeds aggregated, best first: metarun report DIR [--plot F.png]"),
}
# Commands that are no Hydra job (no run directory, no sweep): their module's main(argv) runs as it is.
PLAIN_COMMANDS = ("data", "report")

USAGE = f"""usage: metarun COMMAND [overrides] [hydra flags]

metarun {__version__}: meta-learning experiments from the shell, configured with Hydra.

commands:
{chr(10).join(f"  {name:<7}{text}" for name, (_, text) in COMMANDS.items())}

examples:
  metarun train algo=maml data=omniglot
  metarun train -m algo.inner_lr=0.1,0.4 data.shots=1,5
  metarun train --cfg job          show the composed config
  metarun train --help             config groups and Hydra flags
  metarun eval ckpt=outputs/train/runs/DATE/checkpoints/best.pt
  metarun data prepare miniimagenet   decode a dataset once into the cache
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


def describe(error: BaseException, command: str) -> str:
    """One line for a user error: Hydra's and OmegaConf's multi-line messages folded."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                                  ValidationError)

    from metarun.errors import MetarunError

    cause = error.__cause__
    if isinstance(cause, MetarunError):  # raised inside a Hydra-instantiated object (a sweeper's check): its own line
        return str(cause)
    if command == "eval" and (choice := eval_group_choice(error)):
        return (f"metarun eval takes the algorithm, data and model from the checkpoint: leave out {choice} "
                f"('metarun eval --help' lists the keys it takes)")
    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").rsplit("/", 1)[0]
        first = str(error).splitlines()[0].split(": ", 1)[-1]
        return f"{first}: choose {group} from {', '.join(sorted(error.options))}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        if line := inapplicable_key(cause, command):
            return line
        return f"unknown key '{cause.full_key}': check its spelling ('metarun {command} --cfg job' lists every key)"
    missing = next((e for e in (error, cause) if isinstance(e, MissingMandatoryValue)), None)
    if missing is not None and getattr(missing, "full_key", None):
        return f"{missing.full_key} is required: give it on the command line ({missing.full_key}=...; 'metarun {command} --help')"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        if "is not a ListConfig, list or tuple" in str(cause):  # data.augment=flip
            value = getattr(cause, "value", None)
            return f"{cause.full_key} takes a list: write {cause.full_key}=[{'' if value is None else value}]"
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    parts = [str(error)] + ([str(cause)] if isinstance(cause, OmegaConfBaseException) else [])
    lines = [line.strip() for part in parts for line in part.splitlines()]
    skip = ("Config search path", "provider=", "object_type=", "reference_type=")
    return " ".join(line for line in lines if line and not line.startswith(skip)) or type(error).__name__


def inapplicable_key(error: BaseException, command: str) -> str | None:
    """The line for an inner-loop key (``algo.inner_steps``) set on an algorithm without it, or None."""
    from metarun.experiment import inapplicable

    algo = getattr(error, "parent_node", None)
    try:
        target = algo.get("_target_")
    except Exception:  # noqa: BLE001 (not a config node: the generic line)
        return None
    return inapplicable(getattr(error, "full_key", ""), target, command)


COMPLETION_FLAGS = ("-sc", "--shell-completion")


def completion_command(argv: list[str]) -> str | None:
    """Shell completion shim. Hydra's bash script calls back ``metarun -sc query=bash`` with the whole
    command line in COMP_LINE: complete the command word here, or route to the command's Hydra with
    the command word taken out of COMP_LINE (Hydra expects ``app overrides...``)."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    command_word_done = len(words) >= 3 or (len(words) == 2 and line[-1:].isspace())
    if len(words) >= 2 and words[1] in PLAIN_COMMANDS and command_word_done:  # not a Hydra command: its actions
        data_action = words[1] == "data" and (len(words) == 2 or (len(words) == 3 and not line[-1:].isspace()))
        print("list prepare" if data_action else "")
        return None
    if len(words) >= 2 and words[1] in COMMANDS and command_word_done:
        os.environ["COMP_LINE"] = line.replace(f" {words[1]}", "", 1)
        return words[1]
    if any(a.startswith("query=") for a in argv[1:]):
        print(" ".join(COMMANDS))
        return None
    return "train"  # install/uninstall: any command's Hydra writes the same script, registered as 'metarun'


def is_user_error(error: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from metarun.errors import MetarunError

    return isinstance(error, (MetarunError, HydraException, OmegaConfBaseException))


def report(error: BaseException, command: str, debug: bool) -> int:
    """Print what stopped the command: one line for a user error, the traceback for a bug; after a
    sweep, each failed job (Hydra raises only the first). Return the exit status: 2 for user errors,
    1 when a bug is among them."""
    from metarun.utils import jobs
    from metarun.utils.faults import user_error

    failures = jobs.record.failures if jobs.record.multirun else []
    if error is jobs.record.launch_error and not debug and is_user_error(user_error(error) or error):
        # The launcher says why its jobs were lost (Slurm refused or cancelled them): that one line, not a
        # line per lost job; jobs that failed on their own are still named.
        failures = [f for f in failures if not isinstance(f.error, jobs.LostJob)]
        status = min([report_one(f.error, command, debug, f"job {f.name} failed") for f in failures], default=2)
        return min(status, report_one(error, command, debug))
    if not failures:
        return report_one(error, command, debug)
    ran = max(jobs.record.jobs, len(jobs.record.launched))  # the callbacks count only the jobs of this process
    failed = len(failures)
    others = ("" if failed == ran == 1 else f" (all {ran} jobs failed)" if failed == ran
              else " (the other jobs ran)" if failed == 1 else f" ({failed} of {ran} jobs failed, the others ran)" if ran
              else f" ({failed} jobs failed)")
    status = 2
    for i, failure in enumerate(failures):
        status = min(status, report_one(failure.error, command, debug,
                                        f"job {failure.name} {'was lost' if isinstance(failure.error, jobs.LostJob) else 'failed'}"
                                        + (others if i == 0 else "")))
    if error is jobs.record.launch_error and not debug:  # its lost jobs are named above: why, in one line
        print(f"metarun: error: the launcher failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}",
              file=sys.stderr)
        status = min(status, 1)
    elif not any(f.error is error for f in failures):  # the sweep itself failed too
        status = min(status, report_one(error, command, debug))
    return status


def report_one(error: BaseException, command: str, debug: bool, job: str = "") -> int:
    from metarun.utils.faults import user_error
    from metarun.utils.jobs import LostJob

    raised, error = error, user_error(error) or error  # a fault of the machine (Hydra creating the run directory, say)
    if isinstance(error, LostJob):  # no traceback to show: the job's process is gone
        print(f"metarun: error: {job + ': ' if job else ''}{error}", file=sys.stderr)
        return 1
    if debug or not is_user_error(error):
        if job:
            print(f"metarun: {job}:", file=sys.stderr)
        traceback.print_exception(raised)  # a bug, not bad input (or HYDRA_FULL_ERROR=1): the whole traceback
        return 1
    print(f"metarun: error: {job + ': ' if job else ''}{describe(error, command)}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMPLETION_FLAGS:
        command = completion_command(argv)
        if command is None:
            return 0
        argv = [command, *argv]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] == "--version":
        print(f"metarun {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"metarun: error: unknown command '{command}': choose one of {', '.join(COMMANDS)} (metarun --help)",
              file=sys.stderr)
        return 2

    from metarun.utils import jobs

    debug = os.environ.get(jobs.FULL_ERROR) == "1"  # the user asked for Hydra's full tracebacks
    logging.raiseExceptions = debug  # a log write that fails (full disk) prints no traceback; the next save reports it
    sys.argv = ["metarun", *argv[1:]]  # the name Hydra's shell completion registers
    jobs.record.reset()
    try:
        if command in PLAIN_COMMANDS:
            return importlib.import_module(COMMANDS[command][0]).main(argv[1:])
        if command == "train":
            from metarun.resume import with_run_overrides

            sys.argv = ["metarun", *with_run_overrides(argv[1:])]  # a bare hydra.run.dir=X resumes X as it was
        with jobs.hydra_raises(), jobs.watch_launches():  # every error reaches report(), which makes it one line
            importlib.import_module(COMMANDS[command][0]).main()
        if jobs.record.multirun and jobs.record.failures:  # the sweep went on past its failed jobs
            return report(jobs.record.failures[0].error, command, debug)
    except KeyboardInterrupt:
        print("metarun: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception as e:
        return report(e, command, debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
