"""``metarun report``'s exports: the same table as CSV, Markdown and JSON, and a plot of the metric
against each swept hyperparameter (matplotlib, the ``report`` extra)."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import yaml

from metarun.errors import MetarunError
from metarun.utils.files import atomic_write
from metarun.report import Report, Row, cells


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN: null, as metrics.json writes it


def records(report: Report) -> list[dict]:
    """One dict per row, numbers unrounded: what CSV and JSON hold."""
    metric = report.metric or "metric"
    out = []
    for row in report.rows:
        finished = not row.runs[0].status
        out.append({
            **{k: row.overrides.get(k) for k in report.config_keys},
            metric: finite(row.mean) if finished else None, f"{metric}_std": finite(row.std) if finished else None,
            "ci95": finite(row.ci95) if finished else None, "seeds": len(row.runs) if finished else 0,
            **{f"protocol.{k}": row.protocol.get(k) for k in report.protocol_keys},
            "status": row.status or "ok",
            "seed_values": [r.seed for r in row.runs], "runs": [str(r.path) for r in row.runs],
        })
    return out


def csv_text(report: Report) -> str:
    rows = records(report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else "" if v is None else v
                         for k, v in row.items()})
    return buffer.getvalue()


def markdown_text(report: Report, dirs: list[str]) -> str:
    from metarun.report import title

    header, lines = cells(report)

    def line(values):
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    align = ["---" if h in report.config_keys or h == "note" else "---:" for h in header]
    shared = " ".join(f"`{k}={v}`" for k, v in report.shared.items())
    return "\n".join([f"**{title(report, dirs)}**", "", line(header), line(align), *map(line, lines)]
                     + (["", f"Every run: {shared}"] if shared else [])) + "\n"


def json_text(report: Report, dirs: list[str]) -> str:
    from metarun.report import HIGHER_IS_BETTER

    document = {"problem": report.problem, "metric": report.metric,
                "higher_is_better": HIGHER_IS_BETTER.get(report.metric), "dirs": dirs,
                "swept": report.config_keys, "shared": report.shared, "rows": records(report)}
    return json.dumps(document, indent=2, default=str) + "\n"


def write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
        return
    try:
        with atomic_write(writable(target), "w") as f:  # a kill mid-write leaves the previous export whole
            f.write(text)
    except OSError as e:
        raise MetarunError(f"cannot write {target}: {e.strerror or e}; choose another file") from None


def writable(target) -> Path:
    """``target``, whose folder must exist (an export never creates folders: a typo would hide the file)."""
    if not Path(target).parent.is_dir():
        raise MetarunError(f"cannot write {target}: no folder {Path(target).parent}; choose another file")
    return Path(target)


def parsed(value: str):
    """An override's value as a number where it is one (``0.01``), else its text."""
    try:
        loaded = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return loaded if isinstance(loaded, (int, float)) and not isinstance(loaded, bool) else value


def plot(report: Report, path: str):
    """The metric against each swept hyperparameter, one panel each; runs that share the other swept
    values form one line, the seeds' standard deviation as error bars. Returns the figure."""
    try:
        import matplotlib
    except ImportError:
        raise MetarunError("--plot needs matplotlib: pip install 'metarun[report]'") from None
    matplotlib.use("Agg")  # files only, no display needed (a cluster node, CI)
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if not r.runs[0].status and math.isfinite(r.mean)]
    if not report.config_keys:
        raise MetarunError("nothing to plot: every run has the same overrides apart from the seed "
                           "(sweep a hyperparameter with metarun train -m KEY=A,B)")
    keys = report.config_keys
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for key, ax in zip(keys, axes[0]):
        values = sorted({r.overrides.get(key, "") for r in rows})
        numeric = all(not isinstance(parsed(v), str) for v in values)
        values.sort(key=parsed if numeric else None)
        position = {v: parsed(v) if numeric else i for i, v in enumerate(values)}
        lines: dict[str, list[Row]] = {}
        for row in rows:
            label = ", ".join(f"{k}={row.overrides.get(k, '')}" for k in keys if k != key)
            lines.setdefault(label, []).append(row)
        for label, members in lines.items():
            members.sort(key=lambda r: position[r.overrides.get(key, "")])
            ax.errorbar([position[r.overrides.get(key, "")] for r in members], [r.mean for r in members],
                        yerr=[r.std if math.isfinite(r.std) else 0.0 for r in members], marker="o", capsize=3,
                        label=label or None)
        if numeric and all(position[v] > 0 for v in values) and max(position.values()) >= 10 * min(position.values()):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), values, rotation=20)
        ax.set_xlabel(key)
        ax.set_ylabel(f"test {report.metric} (mean ± std over seeds)")
        if 1 < len(lines) <= 8:
            ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        with atomic_write(writable(path)) as f:
            fig.savefig(f, dpi=100, format=Path(path).suffix[1:] or None)
    except (OSError, ValueError) as e:  # ValueError: a format matplotlib does not write (.xyz)
        raise MetarunError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}; choose a .png file") from None
    finally:
        plt.close(fig)
    return fig


def write_exports(report: Report, args) -> None:
    if args.csv:
        write(args.csv, csv_text(report))
    if args.markdown:
        write(args.markdown, markdown_text(report, args.dirs))
    if args.json:
        write(args.json, json_text(report, args.dirs))
    if args.plot:
        plot(report, args.plot)
