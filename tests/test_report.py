"""``metarun report``: a real sweep made once by ``metarun train -m`` (2 inner learning rates x 2 seeds) and
one more run in a second sweep directory, read back through the real CLI. The expected numbers are computed
here from the runs' own metrics.json files, independently of metarun.report."""

import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metarun import cli
from metarun.report import aggregate, find_runs, read_runs
from metarun.utils.rundir import owned
from support import TINY_SINUSOID, read_metrics

pytestmark = pytest.mark.slow
BASE = [o for o in TINY_SINUSOID if not o.startswith("algo.inner_lr=")]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metarun(*args, cwd):
    return subprocess.run([sys.executable, "-m", "metarun", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """``sweep``: 4 runs (algo.inner_lr=0.01,0.02 x seed=0,1); ``other``: one run with 12 test tasks (seed 0);
    ``failed``: a job that diverged before its first checkpoint."""
    root = tmp_path_factory.mktemp("report")
    sweep, other = root / "sweep", root / "other"
    for args, folder in ((["algo.inner_lr=0.01,0.02", "seed=0,1"], sweep), (["algo.inner_lr=0.01", "test.episodes=12"], other)):
        made = metarun("train", "-m", *BASE, *args, f"hydra.sweep.dir={folder}", cwd=root)
        assert made.returncode == 0, made.stderr
    made = metarun("train", "-m", *BASE, "algo.inner_lr=1e9", f"hydra.sweep.dir={root / 'failed'}", cwd=root)
    assert made.returncode == 2 and "meta-loss became inf" in made.stderr
    return sweep, other


def report(*args, capsys):
    """``metarun report ARGS`` in this process, through the CLI's dispatcher: (exit status, stdout, stderr)."""
    status = cli.main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("metarun: error: "), err
    for word in words:
        assert word in lines[0], lines[0]


def expected_rows(*folders):
    """Mean and std over seeds, mean CI95, per inner_lr: from metrics.json and .hydra/ alone."""
    groups = {}
    for folder in folders:
        for run in Path(folder).iterdir():
            if run.is_dir():
                overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
                key = tuple(sorted(o for o in overrides if not o.startswith("seed=")))
                groups.setdefault(key, []).append(read_metrics(run)["test"])
    return {key: (statistics.mean(t["mse"] for t in tests), statistics.stdev(t["mse"] for t in tests) if len(tests) > 1
                  else None, statistics.mean(t["ci95"] for t in tests), len(tests)) for key, tests in groups.items()}


def test_seeds_aggregate_into_one_row_per_configuration_best_first(sweeps, capsys):
    sweep, _ = sweeps
    status, out, err = report(sweep, "--json", "-", capsys=capsys)
    assert status == 0 and not err
    document = json.loads(out)  # stdout holds the export alone
    assert (document["problem"], document["metric"], document["higher_is_better"]) == ("regression", "mse", False)
    assert document["swept"] == ["algo.inner_lr"] and document["shared"]["data"] == "sinusoid"
    rows = document["rows"]
    assert [r["algo.inner_lr"] for r in rows] and len(rows) == 2
    expected = {dict(o.split("=", 1) for o in key)["algo.inner_lr"]: value for key, value in expected_rows(sweep).items()}
    for row in rows:
        mean, std, ci95, seeds = expected[row["algo.inner_lr"]]
        assert row["mse"] == pytest.approx(mean) and row["mse_std"] == pytest.approx(std)
        assert row["ci95"] == pytest.approx(ci95) and row["seeds"] == seeds == 2
        assert sorted(row["seed_values"]) == [0, 1] and row["status"] == "ok"
    assert rows[0]["mse"] <= rows[1]["mse"]  # lowest MSE first
    assert rows[0]["mse"] != rows[1]["mse"]  # the sweep's values made a difference to sort by

    status, out, _ = report(sweep, capsys=capsys)  # the table a person reads
    lines = [line for line in out.splitlines() if "±" in line and "│" in line]
    assert status == 0 and len(lines) == 2
    for line, row in zip(lines, rows):
        cells = [c.strip() for c in line.strip("│").split("│")]
        assert cells[:2] == [str(rows.index(row) + 1), row["algo.inner_lr"]]
        assert cells[2] == f"{row['mse']:.4f} ± {row['mse_std']:.4f}" and cells[3:5] == [f"± {row['ci95']:.4f}", "2"]
    assert "regression: test mse (lower is better), 4 runs in 2 configurations" in out


def test_several_sweeps_show_the_overrides_and_protocol_that_differ(sweeps, capsys):
    sweep, other = sweeps
    status, out, _ = report(sweep, other, "--json", "-", capsys=capsys)
    document = json.loads(out)
    assert status == 0 and document["swept"] == ["algo.inner_lr", "test.episodes"]
    rows = document["rows"]
    assert len(rows) == 3 and sorted(r["seeds"] for r in rows) == [1, 2, 2]
    single = next(r for r in rows if r["seeds"] == 1)
    assert single["test.episodes"] == "12" and single["protocol.test_episodes"] == 12 and single["mse_std"] is None
    assert {r["protocol.test_episodes"] for r in rows if r["seeds"] == 2} == {10}
    assert [r["mse"] for r in rows] == sorted(r["mse"] for r in rows)


def test_exports_hold_the_same_table(sweeps, tmp_path, capsys):
    sweep, _ = sweeps
    files = {kind: tmp_path / f"table.{kind}" for kind in ("csv", "md", "json")}
    status, out, _ = report(sweep, "--csv", files["csv"], "--markdown", files["md"], "--json", files["json"], capsys=capsys)
    assert status == 0 and "±" in out  # files written, the table still printed
    rows = json.loads(files["json"].read_text())["rows"]
    table = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    assert [r["algo.inner_lr"] for r in table] == [r["algo.inner_lr"] for r in rows]
    for line, row in zip(table, rows):
        assert float(line["mse"]) == pytest.approx(row["mse"]) and float(line["mse_std"]) == pytest.approx(row["mse_std"])
        assert int(line["seeds"]) == 2 and len(line["runs"].split(";")) == 2
    markdown = files["md"].read_text().splitlines()
    header = markdown.index(next(line for line in markdown if line.startswith("| #")))
    assert markdown[header + 1].startswith("| ---") and len([m for m in markdown if m.startswith("| 1 ") or
                                                                  m.startswith("| 2 ")]) == 2
    assert f"| 1 | {rows[0]['algo.inner_lr']} | {rows[0]['mse']:.4f} ± {rows[0]['mse_std']:.4f} |" in markdown[header + 2]


def test_plot_draws_one_panel_per_swept_hyperparameter(sweeps, tmp_path, capsys):
    from metarun.report_export import plot

    sweep, other = sweeps
    figure = plot(aggregate(read_runs(find_runs([str(sweep), str(other)]))), str(tmp_path / "two.png"))
    assert len(figure.axes) == 2 and [ax.get_xlabel() for ax in figure.axes] == ["algo.inner_lr", "test.episodes"]
    status, _, err = report(sweep, "--plot", tmp_path / "sweep.png", capsys=capsys)
    png = (tmp_path / "sweep.png").read_bytes()
    assert status == 0 and not err and png.startswith(PNG_SIGNATURE) and len(png) > 5000


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("tb"))
    return to


def test_bad_input_is_one_line_or_a_marked_row(sweeps, tmp_path, capsys, monkeypatch):
    sweep, _ = sweeps
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*report(tmp_path / "empty", capsys=capsys)[::2], "no runs under")
    assert_one_line_error(*report(tmp_path / "missing", capsys=capsys)[::2], "is not a directory")
    assert_one_line_error(*report(sweep, "--bogus", capsys=capsys)[::2], "--bogus", "metarun report --help")
    assert_one_line_error(*report(sweep, "--csv", "-", "--json", "-", capsys=capsys)[::2], "one export at most")
    assert_one_line_error(*report(sweep, "--plot", tmp_path / "x.png", "--json", tmp_path / "no" / "x.json",
                                  capsys=capsys)[::2], "cannot write")

    # A half-written metrics.json, a run in progress (its lock held), a stopped run: marked rows, the rest aggregated.
    mixed = tmp_path / "mixed"
    for run in runs:
        copy_run(run, mixed / run.name)
    torn, live, stopped = (copy_run(runs[0], mixed / f"9{i}_extra") for i in range(3))
    (torn / "metrics.json").write_text((torn / "metrics.json").read_text()[:200])
    (live / "metrics.json").unlink()
    (stopped / "metrics.json").unlink()
    with owned(live, "train"):  # the real run-directory lock, as a running metarun train holds it
        status, out, err = report(mixed, capsys=capsys)
    assert status == 0 and not err and "4 runs in 2 configurations" in out
    notes = {name: line for line in out.splitlines() for name in ("90_extra", "91_extra", "92_extra") if name in line}
    assert "unreadable metrics.json" in notes["90_extra"]
    assert f"running: pid {os.getpid()}" in notes["91_extra"]
    assert "stopped: resume with metarun train hydra.run.dir=" in notes["92_extra"]
    status, out, err = report(mixed, "--json", "-", capsys=capsys)  # outside the lock: no longer running
    marked = {Path(r["runs"][0]).name: r["status"] for r in json.loads(out)["rows"] if r["status"] != "ok"}
    assert marked["91_extra"].startswith("stopped") and marked["90_extra"].startswith("unreadable")

    assert_one_line_error(*report(torn, capsys=capsys)[::2], "no finished run")
    status, out, _ = report(sweep, sweep.parent / "failed", capsys=capsys)  # a job of a sweep that failed
    (failed,) = [line for line in out.splitlines() if "1000000000.0" in line]
    assert status == 0 and "failed: the meta-loss became inf" in failed and "4 runs in 2 configurations" in out

    # Runs of another problem and metric beside these: refused, naming both.
    other = copy_run(runs[0], tmp_path / "mixed_kinds" / "a")
    copy_run(runs[1], tmp_path / "mixed_kinds" / "b")
    metrics = read_metrics(other)
    metrics.update(task="classification", metric="accuracy", test={**metrics["test"], "accuracy": 0.5})
    (other / "metrics.json").write_text(json.dumps(metrics))
    assert_one_line_error(*report(tmp_path / "mixed_kinds", capsys=capsys)[::2], "different problems or metrics",
                          "accuracy", "mse")

    assert_one_line_error(*report(runs[0], "--plot", tmp_path / "p.png", capsys=capsys)[::2], "nothing to plot")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    assert_one_line_error(*report(sweep, "--plot", tmp_path / "p.png", capsys=capsys)[::2], "metarun[report]")


def test_help_documents_the_command(tmp_path):
    result = metarun("report", "--help", cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr
    for word in ("usage: metarun report", "--csv", "--markdown", "--json", "--plot", "mean over its seeds", "running"):
        assert word in result.stdout
    assert "report" in metarun("--help", cwd=tmp_path).stdout
    completion = subprocess.run([sys.executable, "-m", "metarun", "-sc", "query=bash"], cwd=tmp_path, text=True,
                                capture_output=True, env={**os.environ, "COMP_LINE": "metarun report "})
    assert completion.returncode == 0 and "prepare" not in completion.stdout  # data's actions are not report's


def test_accuracy_ranks_highest_first_and_a_diverged_configuration_last():
    from metarun.report import Run

    def run(lr, seed, value):
        return Run(Path(f"/runs/{lr}_{seed}"), {"algo.inner_lr": lr}, seed, "classification", "accuracy", value, 0.02)

    rows = aggregate([run("0.1", 0, 0.50), run("0.1", 1, 0.54), run("0.4", 0, 0.61), run("0.4", 1, 0.57),
                      run("1.0", 0, float("nan")), run("1.0", 1, 0.9)]).rows
    assert [r.overrides["algo.inner_lr"] for r in rows] == ["0.4", "0.1", "1.0"]
    assert rows[0].mean == pytest.approx(0.59) and rows[0].std == pytest.approx(statistics.stdev([0.61, 0.57]))
    assert rows[2].status == "diverged: seed 0"  # a NaN never ranks first
