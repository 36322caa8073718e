"""``metarun report DIR [DIR...]``: one table of a sweep's results, seeds aggregated as papers report them.

Every run under the directories (a sweep's numbered job folders, a single run, several sweeps) is read
from what ``metarun train`` (or ``eval``) wrote: ``metrics.json`` (the test metric, its 95% CI over the
test tasks, the evaluation protocol) and ``.hydra/overrides.yaml`` (what the command line set). Runs that
differ only by ``seed`` form one configuration: its row shows the mean over seeds ± their standard
deviation (sample, n-1), the mean of the runs' own CI95 beside it, and how many seeds; best first.
Runs without a result (still running, stopped, failed, an unreadable ``metrics.json``) get a marked row.
Everything read is data: JSON and YAML parsed as such (YAML's safe loader), nothing instantiated.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Group
from rich.table import Table
from rich.text import Text

from metarun.errors import MetarunError
from metarun.utils.rundir import LOCK, MARKER, _holder

SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's where built in: many runs read fast; safe either way
HIGHER_IS_BETTER = {"accuracy": True, "mse": False}
IGNORED_KEYS = ("seed", "data.root", "data.cache_dir")  # and hydra.*: where a run went, not what it ran
DESCRIPTION = """Read every run under DIR (a sweep directory, a run directory, or several of either) and print
one row per configuration: the runs' command-line overrides minus the seed. A row shows the test metric
as the mean over its seeds +- their standard deviation, the runs' own 95% CI (over test tasks, averaged)
beside it, and the number of seeds; best first (highest accuracy, lowest MSE). Overrides and protocol
settings (metrics.json's "protocol": shots, test tasks, ...) that differ between rows get a column each.
A blank override cell: that run left the key at its config default.
Runs without a result are marked rows: running (its lock is held), stopped (a last.pt to resume from),
failed (neither), or an unreadable metrics.json."""
EXAMPLES = """examples:
  metarun report outputs/train/multiruns/2026-11-30_10-00-00
  metarun report outputs/train/multiruns/*  --markdown results.md --csv results.csv
  metarun report SWEEP --json -             the table as JSON on stdout (nothing else printed there)
  metarun report SWEEP --plot sweep.png     the metric against each swept hyperparameter (pip install 'metarun[report]')
"""


@dataclass
class Run:
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)  # key -> value as typed, seed and hydra.* left out
    seed: object = None
    problem: str | None = None
    metric: str | None = None
    value: float = math.nan  # the test metric (NaN: diverged, null in metrics.json)
    ci95: float = math.nan
    protocol: dict = field(default_factory=dict)
    status: str = ""  # empty for a finished run, else why it has no result


@dataclass
class Row:
    runs: list[Run]
    mean: float = math.nan
    std: float = math.nan
    ci95: float = math.nan
    status: str = ""

    @property
    def overrides(self) -> dict[str, str]:
        return self.runs[0].overrides

    @property
    def protocol(self) -> dict:
        return self.runs[0].protocol

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


@dataclass
class Report:
    rows: list[Row]
    problem: str | None
    metric: str | None
    config_keys: list[str]  # overrides that differ between rows: the swept hyperparameters
    protocol_keys: list[str]  # protocol settings that differ between rows
    shared: dict[str, str]  # overrides every row has alike


def natural_key(name: str) -> list:
    """``2_...`` before ``10_...``: a sweep's jobs in their order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_runs(dirs: list[str]) -> list[Path]:
    """Every run directory under ``dirs``: a folder with ``metrics.json``, a metarun marker, or a
    ``.hydra/`` record. Runs do not nest, so a run's own folders are not searched."""
    found: dict[Path, None] = {}
    for given in dirs:
        top = Path(given)
        if not top.is_dir():
            raise MetarunError(f"{given} is not a directory: give a sweep's or a run's directory "
                               f"(metarun report outputs/train/multiruns/DATE)")
        for root, folders, files in os.walk(top):
            if "metrics.json" in files or MARKER in files or (Path(root) / ".hydra" / "overrides.yaml").is_file():
                found[Path(root).resolve()] = None
                folders.clear()
            else:
                folders[:] = sorted((f for f in folders if not f.startswith(".")), key=natural_key)
    return list(found)


def parse_overrides(lines: object) -> dict[str, str]:
    """``["algo.inner_lr=0.1", "+x=1", "~y", "seed=3", "hydra.run.dir=D"]`` -> ``{"algo.inner_lr": "0.1",
    "x": "1", "~y": ""}``; the seed, Hydra's own keys and data locations left out."""
    if not isinstance(lines, list):
        raise ValueError("not a list of overrides")
    overrides = {}
    for line in map(str, lines):
        key, _, value = line.partition("=")
        key = key.lstrip("+")
        if key in IGNORED_KEYS or key.startswith("hydra.") or key == "hydra":
            continue
        overrides[key] = value
    return dict(sorted(overrides.items()))


def lock_holder(path: Path) -> str | None:
    """Who runs in ``path`` now, or None: the lock file names its holder while held (rundir.owned)."""
    lock = path / LOCK
    try:
        if not lock.is_file() or lock.stat().st_size == 0:  # emptied when a run ends
            return None
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted: the holder died (SIGKILL) without emptying it
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        return _holder(lock)
    finally:
        os.close(fd)


def read_run(path: Path) -> Run:
    run = Run(path)
    hydra = path / ".hydra"
    try:
        if (hydra / "overrides.yaml").is_file():
            lines = yaml.load((hydra / "overrides.yaml").read_text(), Loader=SafeLoader) or []
            run.overrides = parse_overrides(lines)
            run.seed = next((str(o).split("=", 1)[1] for o in lines if str(o).lstrip("+").startswith("seed=")), None)
        if (hydra / "config.yaml").is_file():
            config = yaml.load((hydra / "config.yaml").read_text(), Loader=SafeLoader)
            if isinstance(config, dict) and config.get("seed") is not None:
                run.seed = config["seed"]
    except (OSError, ValueError, yaml.YAMLError) as e:
        run.status = f"unreadable .hydra record: {one_line(e)}"
        return run
    if holder := lock_holder(path):
        run.status = f"running: {holder}"
        return run
    metrics = path / "metrics.json"
    if not metrics.is_file():
        last, ending = path / "checkpoints" / "last.pt", log_ending(path)
        run.status = (f"failed: {ending.removeprefix('error: ')}" if ending.startswith("error: ") or "Error" in ending
                      else f"stopped: resume with metarun train hydra.run.dir={path}" if last.is_file()
                      else "failed: no metrics.json and no checkpoint (see its log)")
        return run
    try:
        data = json.loads(metrics.read_text())
        run.problem, run.metric = data.get("task"), data["metric"]
        test = data["test"]
        run.value = math.nan if test[run.metric] is None else float(test[run.metric])
        run.ci95 = math.nan if test.get("ci95") is None else float(test["ci95"])
        run.protocol = data.get("protocol") or {}
        if run.metric not in HIGHER_IS_BETTER or not isinstance(run.protocol, dict):
            raise ValueError(f"unknown metric {run.metric!r}")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        run.status = f"unreadable metrics.json: {one_line(e)}"
    except (KeyError, TypeError, AttributeError) as e:
        run.status = f"unreadable metrics.json: no test result ({one_line(e)})"
    return run


def log_ending(path: Path) -> str:
    """The last line of the run's log: ``error: ...`` (or a traceback's last line) where the run failed."""
    for log in (path / "train.log", path / "eval.log"):
        try:
            with open(log, "rb") as f:
                f.seek(max(0, log.stat().st_size - 4096))  # the end alone: a log can be long
                lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            continue
        return lines[-1].strip() if lines else ""
    return ""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def read_runs(paths: list[Path]) -> list[Run]:
    from rich.progress import MofNCompleteColumn

    from metarun.utils.display import transient_progress

    with transient_progress(MofNCompleteColumn()) as progress:  # on a terminal only, gone when done
        task = progress.add_task("reading runs", total=len(paths))
        runs = []
        for path in paths:
            runs.append(read_run(path))
            progress.advance(task)
    return runs


def differing(dicts: list[dict]) -> list[str]:
    keys = sorted({k for d in dicts for k in d})
    return [k for k in keys if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in dicts}) > 1]


def aggregate(runs: list[Run]) -> Report:
    """Group finished runs by their overrides and protocol (the seed aside), best first; the others follow, marked."""
    done = [r for r in runs if not r.status]
    kinds = {(r.problem, r.metric): r for r in done}
    if len(kinds) > 1:
        (a, b) = list(kinds.values())[:2]
        raise MetarunError(f"runs of different problems or metrics: {a.path} ({a.problem}, {a.metric}) and {b.path} "
                           f"({b.problem}, {b.metric}); report each kind separately")
    problem, metric = next(iter(kinds), (None, None))
    groups: dict[str, list[Run]] = {}
    for run in done:
        groups.setdefault(json.dumps([run.overrides, run.protocol], sort_keys=True, default=str), []).append(run)
    rows = []
    for members in groups.values():
        values = [r.value for r in members]
        row = Row(members, mean=statistics.fmean(values))  # NaN when a seed diverged: ranked last
        row.std = statistics.stdev(values) if len(values) > 1 and math.isfinite(row.mean) else math.nan
        cis = [r.ci95 for r in members if math.isfinite(r.ci95)]
        row.ci95 = statistics.fmean(cis) if cis else math.nan
        diverged = [r for r in members if not math.isfinite(r.value)]
        seeds = [str(s) for s in row.seeds]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        notes = ([f"diverged: seed {', '.join(str(r.seed) for r in diverged)}"] if diverged else []) + \
                ([f"seed {', '.join(repeated)} more than once"] if repeated else [])
        row.status = "; ".join(notes)
        rows.append(row)
    sign = -1 if HIGHER_IS_BETTER.get(metric, True) else 1
    rows.sort(key=lambda r: (not math.isfinite(r.mean), sign * r.mean if math.isfinite(r.mean) else 0))
    rows += [Row([r], status=r.status) for r in runs if r.status]
    overrides = [r.overrides for r in rows]
    config_keys = differing(overrides)
    shared = {k: v for k, v in overrides[0].items() if k not in config_keys} if rows else {}
    return Report(rows, problem, metric, config_keys, differing([r.protocol for r in rows if not r.runs[0].status]),
                  shared)


def number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def cells(report: Report) -> tuple[list[str], list[list[str]]]:
    """The table as text: the header and one list of cells per row (the rich table and the Markdown file)."""
    metric = report.metric or "metric"
    header = ["#", *report.config_keys, f"{metric} (mean ± std over seeds)", "run CI95 (mean)", "seeds",
              *report.protocol_keys]
    marked = any(r.status for r in report.rows)
    header += ["note"] if marked else []
    lines = []
    for i, row in enumerate(report.rows, 1):
        finished = not row.runs[0].status
        result = f"{number(row.mean)} ± {number(row.std)}" if finished else "-"
        line = [str(i) if finished else "-", *(row.overrides.get(k, "") for k in report.config_keys), result,
                f"± {number(row.ci95)}" if finished else "-", str(len(row.runs)) if finished else "-",
                *(str(row.protocol.get(k, "")) if finished else "" for k in report.protocol_keys)]
        where = "" if finished or str(row.runs[0].path) in row.status else f" ({row.runs[0].path.name})"  # the job
        lines.append(line + ([row.status + where] if marked else []))
    return header, lines


def title(report: Report, dirs: list[str]) -> str:
    done = sum(len(r.runs) for r in report.rows if not r.runs[0].status)
    better = "higher" if HIGHER_IS_BETTER.get(report.metric, True) else "lower"
    configs = sum(1 for r in report.rows if not r.runs[0].status)
    return (f"{report.problem or 'no finished run'}: test {report.metric or ''} ({better} is better), "
            f"{done} run{'s' * (done != 1)} in {configs} configuration{'s' * (configs != 1)} under {', '.join(dirs)}")


def rich_table(report: Report, dirs: list[str]) -> Group:
    """The title and the shared overrides on lines of their own: a table's title would wrap to its width."""
    header, lines = cells(report)
    table = Table()
    for column in header:
        table.add_column(column, justify="left" if column in report.config_keys or column == "note" else "right")
    for line in lines:
        table.add_row(*line, style="yellow" if line[0] == "-" else None)
    shared = " ".join(f"{k}={v}" for k, v in report.shared.items())
    return Group(Text(title(report, dirs), style="bold"), table, *([Text(f"every run: {shared}")] if shared else []))


def parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not argparse's usage block
            raise MetarunError(f"{message} (metarun report --help)")

    p = Parser(prog="metarun report", description=DESCRIPTION, epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="a sweep's directory, a run's directory, or a folder of them")
    p.add_argument("--csv", metavar="FILE", help="write the table as CSV (numbers unrounded; - for stdout)")
    p.add_argument("--markdown", metavar="FILE", help="write the table as a Markdown table (- for stdout)")
    p.add_argument("--json", metavar="FILE", help="write the table as JSON, with each row's runs (- for stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the metric against each swept hyperparameter, one panel "
                   "each, the seeds' standard deviation as error bars (needs matplotlib: pip install 'metarun[report]')")
    return p


def main(argv: list[str]) -> int:
    from metarun.report_export import write_exports
    from metarun.utils.display import console

    args = parser().parse_args(argv)
    if [args.csv, args.markdown, args.json].count("-") > 1 or args.plot == "-":
        raise MetarunError("one export at most goes to stdout (-), and --plot needs a file name: give the others files")
    runs = read_runs(find_runs(args.dirs))
    if not runs:
        raise MetarunError(f"no runs under {', '.join(args.dirs)}: a run directory holds metrics.json and .hydra/ "
                           f"(what metarun train writes); give a sweep's or a run's directory")
    report = aggregate(runs)
    finished = any(not r.runs[0].status for r in report.rows)
    if "-" not in (args.csv, args.markdown, args.json) or not finished:  # stdout holds an export alone
        console().print(rich_table(report, args.dirs))
    if not finished:
        raise MetarunError(f"no finished run under {', '.join(args.dirs)}: every run is marked in the table "
                           f"(running, stopped, failed or unreadable)")
    write_exports(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
