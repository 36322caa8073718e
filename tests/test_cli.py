"""Tier 3 through the real command line, in subprocesses: what a user types and sees."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from metarun.utils.checkpoint import load_checkpoint
from support import (TINY_OMNIGLOT, TINY_SINUSOID, group_options, hold_one_iteration, omniglot_location, read_metrics,
                     slurm_problem)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def metarun(*args, cwd, timeout=300, python=sys.executable):
    return subprocess.run([python, "-m", "metarun", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("metarun: error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for word in words:
        assert word in lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".log"}


def test_help_and_hydra_flags(tmp_path):
    for args in (["--help"], []):
        result = metarun(*args, cwd=tmp_path)
        assert result.returncode == 0 and "train" in result.stdout and "eval" in result.stdout
    console = subprocess.run([Path(sys.executable).parent / "metarun", "--help"], capture_output=True, text=True)
    assert console.returncode == 0 and "metarun train algo=maml data=omniglot" in console.stdout
    result = metarun("train", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "schema" not in result.stdout
    for group in ("algo", "data", "model", "optimizer", "scheduler", "device", "experiment"):  # every option, no schema
        assert f"\n{group}: {', '.join(group_options(group))}\n" in result.stdout, group
    assert {"maml", "protonet", "reptile"} <= set(group_options("algo"))  # the helper found the group
    result = metarun("train", "--cfg", "job", "data=sinusoid", "model=mlp", cwd=tmp_path)
    assert result.returncode == 0 and "metarun.data.sinusoid.SinusoidTasks" in result.stdout
    assert metarun("train", "--info", cwd=tmp_path).returncode == 0
    assert_one_line_error(metarun("trian", cwd=tmp_path), "unknown command 'trian'")
    assert not (tmp_path / "outputs").exists()


def test_bad_input_is_one_line_and_overwrites_nothing(tmp_path, shared_data_root, omniglot_cache_dir):
    run_dir = tmp_path / "run"
    assert metarun("train", *TINY_SINUSOID, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    before = snapshot(run_dir)
    for override, words in [
        ("algo=nope", ["algo/nope", "fomaml, maml"]),
        ("data.shots=abc", ["data.shots"]),
        ("data.shotz=1", ["unknown key 'data.shotz'"]),
        ("algo.inner_lr=0.5", ["resume with the same settings"]),
        ("model=conv4", ["model=mlp for sinusoid"]),
    ]:
        assert_one_line_error(metarun("train", *TINY_SINUSOID, override, f"hydra.run.dir={run_dir}", cwd=tmp_path), *words)
        assert snapshot(run_dir) == before, override

    omniglot = omniglot_location(shared_data_root, omniglot_cache_dir)
    for overrides, words in [
        (["data.ways=200"], ["data.ways=200", "use at most 100 ways"]),
        (["data.shots=15", "data.queries=10"], ["exceeds the 20 images per Omniglot class"]),
        ([f"data.root={tmp_path / 'empty'}", "data.download=true", "data.url=http://127.0.0.1:9"], ["download of", "failed"]),
    ]:
        result = metarun("train", *TINY_OMNIGLOT, *omniglot, *overrides, f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
        assert_one_line_error(result, *words)
        assert not (tmp_path / "bad" / "checkpoints").exists()


def test_multirun_sweeps_into_named_job_directories(tmp_path, shared_data_root, omniglot_cache_dir):
    sweep = tmp_path / "sweep"
    result = metarun("train", "-m", "algo.inner_lr=0.1,0.4", "data.shots=1,5", *TINY_OMNIGLOT,
                     *omniglot_location(shared_data_root, omniglot_cache_dir), f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(jobs) == 4
    names = [job.name.split(",") for job in jobs]  # Hydra sorts the overrides in the name
    assert [n[0].split("_")[0] for n in names] == ["0", "1", "2", "3"]
    assert [(("algo.inner_lr=0.1" in n[0] + "," + ",".join(n)), "data.shots=1" in n) for n in names] == [
        (True, True), (True, False), (False, True), (False, False)]
    for job in jobs:
        assert read_metrics(job)["test"]["episodes"] == 6
        assert list((job / "tb").glob("events.out.tfevents.*"))


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, shared_data_root, omniglot_cache_dir):
    sweep = tmp_path / "sweep"
    result = metarun("train", "-m", "data.shots=30,1", *TINY_OMNIGLOT,
                     *omniglot_location(shared_data_root, omniglot_cache_dir), f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert_one_line_error(result, "data.shots=30", "failed", "exceeds the 20 images")
    failed, ok = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert not (failed / "metrics.json").exists() and read_metrics(ok)["iterations"] == 4
    assert "exceeds the 20 images" in (failed / "train.log").read_text()


def test_every_failed_job_of_a_sweep_is_named(tmp_path):
    # Hydra raises only the first failed job's error; the job results (utils/jobs.py) name each one.
    sweep = tmp_path / "sweep"
    result = metarun("train", "-m", "data.shots=0,5,-1", *TINY_SINUSOID, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "Error executing job" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("metarun: error: job data.shots=") for line in lines), result.stderr
    assert "job data.shots=0 " in lines[0] and "(2 of 3 jobs failed, the others ran)" in lines[0]
    assert "job data.shots=-1 " in lines[1] and "data.shots=-1 is not allowed" in lines[1]
    failed_0, ok, failed_2 = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert read_metrics(ok)["iterations"] == 6 and not (failed_0 / "metrics.json").exists()
    assert "data.shots=-1 is not allowed" in (failed_2 / "train.log").read_text()


# Each launcher config in conf/hydra/launcher/ (CONTRIBUTING.md): a two-job sweep through it names its failed job.
@pytest.mark.parametrize("launcher", group_options("hydra/launcher"))
def test_a_launcher_reports_its_failed_job(tmp_path, launcher):
    if launcher == "slurm" and (problem := slurm_problem()):  # a real cluster runs this sweep (CI starts one)
        pytest.skip(problem)
    sweep = tmp_path / "sweep"
    result = metarun("train", "-m", f"hydra/launcher={launcher}", "data.shots=0,5", *TINY_SINUSOID,
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert_one_line_error(result, "job data.shots=0", "failed", "data.shots=0 is not allowed")
    assert read_metrics(next(sweep.glob("1_*")))["iterations"] == 6


# The real CLI, holding MAML's iteration until the test's signal has arrived (support.hold_one_iteration).
HOLD_ONE_ITERATION = hold_one_iteration("metarun.algos.maml", "MAML")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, sig):
    # A fixed path: two runs that tuned batching=auto apart may take different paths, whose float32
    # rounding differs (test_train checks that a resumed run keeps the path its checkpoint records).
    settings = TINY_SINUSOID + ["train.iterations=60", "train.val_every=25", "algo.batching=loop"]
    whole = metarun("train", *settings, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr

    run_dir, cue = tmp_path / "killed", tmp_path / "held"
    process = subprocess.Popen([sys.executable, "-c", HOLD_ONE_ITERATION, str(cue), "37", "train", *settings,
                                f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not cue.exists():  # iteration 37 is held, after the checkpoint of iteration 25
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(sig)
    stderr = process.communicate(timeout=300)[1]
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"]
    if sig == signal.SIGINT:
        # The stop cuts the held meta-batch short between its tasks and saves the state after the last
        # completed iteration (36): a checkpoint between the periodic ones, with iteration 37's draws rewound.
        assert process.returncode == 130 and "interrupted" in stderr, stderr
        assert stopped_at == 36
    else:
        assert stopped_at == 25  # the last periodic checkpoint; iterations 26-36 are lost and redone
    # The hint's own command: the run directory alone resumes the run with the overrides it was started with.
    resumed = metarun("train", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    got, want = read_metrics(run_dir), read_metrics(tmp_path / "whole")
    for timing in ("training_seconds", "wall_clock_seconds"):
        got.pop(timing), want.pop(timing)
    assert got == want


def test_checkpoint_survives_kill_during_saves(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from metarun.utils.checkpoint import save_checkpoint
        i = 0
        while True:
            i += 1
            save_checkpoint({str(tmp_path / 'last.pt')!r}, {{"iteration": i, "w": torch.randn(1_000_000)}})
            print(i, flush=True)
    """)
    for attempt in range(5):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        process.stdout.readline()  # one save done
        time.sleep(0.05 + 0.07 * attempt)
        process.kill()
        process.wait()
        assert load_checkpoint(tmp_path / "last.pt", needs={})["w"].shape == (1_000_000,)


def test_regular_install_runs_from_another_directory(tmp_path):
    # Build from a copy (an in-tree build would write into the repo), install the wheel into a fresh venv.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "outputs", "build", "*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheels"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    # The new venv gets metarun's dependencies from the interpreter running the tests through a .pth file,
    # not --system-site-packages: run from inside a venv, that flag shows the base Python's packages, which
    # a fresh venv's base does not have. Offline: pip installs only the wheel.
    import site
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    ours = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        ours.append(site.getusersitepackages())
    theirs = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # Plain path lines: the .pth files there (this checkout's editable install) stay unprocessed, and the
    # venv's own site-packages come first, so the installed wheel is what imports.
    (Path(theirs) / "_metarun_test_dependencies.pth").write_text(
        "".join(f"{p}\n" for p in dict.fromkeys(ours) if Path(p).is_dir()))
    wheel = next((tmp_path / "wheels").glob("metarun-*.whl"))
    # --ignore-installed: the editable metarun of this checkout is visible too and has the same version.
    install = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps",
                              "--no-index", "--ignore-installed", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    where = subprocess.run([venv / "bin" / "python", "-c", "import metarun; print(metarun.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert where.stdout.startswith(str(venv)) and str(REPO) not in where.stdout, where.stdout + where.stderr
    result = subprocess.run([venv / "bin" / "metarun", "train", "--cfg", "job", "algo=fomaml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "first_order: true" in result.stdout, result.stderr
    result = subprocess.run([venv / "bin" / "python", "-m", "metarun", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and "eval" in result.stdout


def test_eval_through_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    assert metarun("train", *TINY_SINUSOID, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    result = metarun("eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", "test.episodes=10",
                     f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_metrics(tmp_path / "eval")["test"]["episodes"] == 10 and (tmp_path / "eval" / ".hydra").is_dir()
    assert_one_line_error(metarun("eval", f"ckpt={tmp_path / 'missing.pt'}", f"hydra.run.dir={tmp_path / 'e2'}",
                                  cwd=tmp_path), "does not exist")
    assert_one_line_error(metarun("eval", "ckpt=x", "test.episodes=0", f"hydra.run.dir={tmp_path / 'e3'}",
                                  cwd=tmp_path), "test.episodes=0 is not allowed")


def test_shell_completion_goes_through_the_dispatcher(tmp_path):
    script = metarun("train", "--shell-completion", "install=bash", cwd=tmp_path).stdout
    assert "-F hydra_bash_completion metarun\n" in script or script.rstrip().endswith("hydra_bash_completion metarun")

    def complete(line):
        result = subprocess.run([sys.executable, "-m", "metarun", "-sc", "query=bash"], cwd=tmp_path, text=True,
                                capture_output=True, env={**os.environ, "COMP_LINE": line})
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("metarun tr") == ["train", "eval", "data", "report"]
    assert complete("metarun data ") == ["list", "prepare"]
    assert complete("metarun train algo=") == [f"algo={a}" for a in group_options("algo")]
    assert "data.shots=" in complete("metarun train data.")
    assert "test.episodes=" in complete("metarun eval test.ep")


def test_a_run_names_its_directory_and_its_log_keeps_the_results(tmp_path):
    import re

    # No hydra.run.dir: the default run directory, in this test's own working directory; stdout is a pipe.
    result = metarun("train", "algo=fomaml", *TINY_SINUSOID, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_fomaml_sinusoid_10s", run_dir.name)
    assert f"run directory: {run_dir}  device: cpu" in result.stdout  # one line, not cut at 80 columns
    title = f"FOMAML, sinusoid 10-shot: {run_dir}"
    assert result.stdout.count(title) == 1
    log = (run_dir / "train.log").read_text()
    assert "meta-testing the best checkpoint (iteration " in log and "on 10 test tasks" in log and title in log and re.search(r"test\s+│\s+\d+\.\d+\s+│\s+± ", log)

    result = metarun("eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", "test.episodes=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (eval_dir,) = (tmp_path / "outputs" / "eval" / "runs").iterdir()
    assert eval_dir.name.endswith("_fomaml_sinusoid_10s_best")
    assert "FOMAML, sinusoid 10-shot" in (eval_dir / "eval.log").read_text()


def test_eval_help_and_errors_name_only_what_eval_takes(tmp_path):
    result = metarun("eval", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for key in ("ckpt=", "batch_size=", "data.root=", "data.cache_dir=", "device=", "test.episodes=", "test.eval_seed=",
                "algo.eval_inner_steps=", "algo.batching="):
        assert key in result.stdout, key
    for train_only in ("algo: anil", "experiment:", "model:", "algo=fomaml", "data.shots", "optimizer:"):
        assert train_only not in result.stdout, train_only
    for override in ("algo=fomaml", "data=sinusoid", "model=conv4", "experiment=maml_omniglot_5w1s", "data.shots=5"):
        result = metarun("eval", "ckpt=x.pt", override, f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
        assert_one_line_error(result, "eval takes the algorithm, data and model from the checkpoint", override)


def wait_for(path: Path, text: str, process, timeout=120):
    deadline = time.time() + timeout
    while not (path.exists() and text in path.read_text()):
        assert process.poll() is None and time.time() < deadline, f"the run ended before '{text}' in {path.name}"
        time.sleep(0.05)


@pytest.mark.parametrize("phase", ["validation", "test"])
def test_sigterm_in_a_long_phase_stops_within_seconds_and_resumes_from_there(tmp_path, phase):
    # 200,000 fixed tasks make validation (or the test) last minutes; SIGTERM must end it in seconds.
    long = "train.val_episodes=200000" if phase == "validation" else "test.episodes=200000"
    settings = TINY_SINUSOID + ["algo.batching=loop", long]
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "metarun", "train", *settings, f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run_dir / "train.log", "iteration 3/6" if phase == "validation" else "meta-testing", process)
    time.sleep(0.5)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert time.time() - sent < 15 and process.returncode == 130, err
    assert f"resumewith:metaruntrainhydra.run.dir={run_dir}" in "".join((out + err).split())  # however it wraps
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["iteration"] == (3 if phase == "validation" else 6) and not (run_dir / "metrics.json").exists()
    if phase == "validation":
        assert state["history"] == []  # the state after iteration 3, its validation still to do on resume


def test_a_run_directory_has_one_run_and_eval_never_writes_into_it(tmp_path):
    run_dir = tmp_path / "run"
    settings = TINY_SINUSOID + ["algo.batching=loop"]
    process = subprocess.Popen([sys.executable, "-m", "metarun", "train", *settings, "train.iterations=100000",
                                "train.val_every=2", f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(run_dir / "train.log", "iteration 2: val", process)
        second = metarun("train", *settings, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert_one_line_error(second, f"{run_dir} is in use by pid {process.pid}", "metarun train")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 130
    before = snapshot(run_dir)
    result = metarun("eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, "metarun train run directory, which metarun eval never writes into")
    assert snapshot(run_dir) == before


def test_failed_and_refused_runs_leave_no_stray_directory(tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "notes.txt").write_text("precious")
    (tmp_path / "afile").write_text("")
    for args, words in [
        (["data=sinusoid", "model=mlp", "data.shots=0"], ["data.shots"]),  # fails inside the run
        (TINY_SINUSOID + ["hydra.run.dir=thesis"], ["is not empty and is not a metarun run directory"]),
        (TINY_SINUSOID + ["hydra.run.dir=afile/run"], ["not a folder", "ENOTDIR"]),
    ]:
        assert_one_line_error(metarun("train", *args, cwd=tmp_path), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "thesis"]
    assert [p.name for p in (tmp_path / "thesis").iterdir()] == ["notes.txt"]


def test_a_crafted_checkpoint_is_refused_through_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    assert metarun("train", *TINY_SINUSOID, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    written = tmp_path / "written"
    state["config"]["data"] = {"_target_": "pathlib.Path.write_text", "self": str(written), "data": "pwned"}
    torch.save(state, tmp_path / "crafted.pt")
    result = metarun("eval", f"ckpt={tmp_path / 'crafted.pt'}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert_one_line_error(result, "pathlib.Path.write_text", "not one of metarun's")
    assert not written.exists() and not (tmp_path / "eval").exists()


def test_a_list_key_given_one_value_is_told_to_write_a_list():
    from hydra import compose, initialize_config_dir

    from metarun.cli import describe
    from metarun.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        with pytest.raises(Exception) as error:
            compose("train", overrides=["data=cifarfs", "data.augment=flip"])
    assert describe(error.value, "train") == "data.augment takes a list: write data.augment=[flip]"


def test_a_user_error_raised_inside_an_instantiated_object_is_its_own_line():
    # Hydra wraps what a sweeper's constructor raises ("Error in call to target ...: MetarunError(...)").
    from hydra.errors import InstantiationException

    from metarun.cli import describe
    from metarun.errors import MetarunError

    try:
        try:
            raise MetarunError("hydra.sweeper.n_trials=-1, n_jobs=1: both must be at least 1")
        except MetarunError as e:
            raise InstantiationException("Error in call to target 'x.Sweeper':\nMetarunError(...)") from e
    except InstantiationException as wrapped:
        assert describe(wrapped, "train") == "hydra.sweeper.n_trials=-1, n_jobs=1: both must be at least 1"
