"""The Optuna search (``hparams_search=...``, hydra_plugins/metarun_optuna_sweeper, metarun/search.py),
against the real Optuna and Hydra's real plugin discovery: search spaces, a search run end to end
through the CLI, a trial pruned, and a killed search resumed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")  # the `search` extra (also in `test`)

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from hydra_plugins.metarun_optuna_sweeper.sweeper import INTERRUPTED, distribution, metric_direction  # noqa: E402
from metarun import search  # noqa: E402
from metarun.config import conf_dir  # noqa: E402
from support import read_metrics  # noqa: E402

# Tiny sinusoid trials; loop batching: no timing of execution paths in each trial.
TINY = ["hparams_search=maml_sinusoid", "train.meta_batch_size=4", "train.val_episodes=8", "test.episodes=10",
        "algo.eval_inner_steps=3", "algo.batching=loop"]
GOOD = "{algo.inner_lr: 0.01, algo.inner_steps: 1, train.meta_lr: 0.001}"
DIVERGING = "{algo.inner_lr: 0.25, algo.inner_steps: 1, train.meta_lr: 0.001}"  # val MSE ~1e14 at iteration 3
FAILING = "{algo.inner_lr: 0.4, algo.inner_steps: 3, train.meta_lr: 0.001}"  # meta-loss not finite at iteration 3


def metarun_search(sweep: Path, *overrides: str, cwd: Path, **popen):
    args = [sys.executable, "-m", "metarun", "train", "-m", *TINY, *overrides, f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if popen:
        return subprocess.Popen(args, cwd=cwd, env=env, **popen)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def load(sweep: Path):
    return optuna.load_study(study_name="metarun", storage=search.open_storage(str(sweep / "optuna.journal")))


def parsed(line: str):
    return distribution(OverridesParser.create().parse_override(line))


def test_search_spaces_become_optuna_distributions():
    assert parsed("algo.inner_lr=tag(log, interval(0.001, 0.5))") == FloatDistribution(0.001, 0.5, log=True)
    assert parsed("train.meta_lr=interval(0.0001, 0.01)") == FloatDistribution(0.0001, 0.01)
    assert parsed("algo.inner_steps=range(1, 6)") == IntDistribution(1, 5)
    assert parsed("algo.inner_steps=int(interval(1, 8))") == IntDistribution(1, 8)
    assert parsed("optimizer=choice(adam, sgd)") == CategoricalDistribution(["adam", "sgd"])
    assert parsed("data.shots=5") is None  # the same in every trial


def test_hparams_search_configs_compose_with_the_sweeper_plugin():
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    # Found through the hydra_plugins namespace package, editable install or wheel alike.
    assert "MetarunOptunaSweeper" in [p.__name__ for p in Plugins.instance().discover(Sweeper)]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        for name, protocol in [("maml_omniglot", "maml_omniglot_5w1s"), ("maml_sinusoid", "maml_sinusoid_k5")]:
            cfg = compose("train", overrides=[f"hparams_search={name}"], return_hydra_config=True)
            sweeper = cfg.hydra.sweeper
            assert sweeper._target_.endswith("MetarunOptunaSweeper") and sweeper.direction == "auto"
            assert set(sweeper.params) == {"algo.inner_lr", "algo.inner_steps", "train.meta_lr"}
            assert sweeper.params["algo.inner_lr"].startswith("tag(log")
            assert cfg.hydra.runtime.choices.experiment == protocol
            # direction: auto maximises Omniglot's accuracy and minimises the sinusoid's MSE
            assert metric_direction(cfg) == ("maximize" if "omniglot" in name else "minimize")
        assert compose("train").get("hparams_search") is None  # a plain run has no search


def test_report_outside_a_search_does_nothing():
    search.report(3, "mse", [{"iteration": 3, "mse": 1.0, "ci95": 0.1}])  # no Hydra, no trial: no Optuna call


@pytest.mark.slow
def test_a_search_prunes_a_diverging_trial_and_reports_only_the_failed_one(tmp_path):
    sweep = tmp_path / "search"
    result = metarun_search(sweep, "train.iterations=6", "train.val_every=3", "hydra.sweeper.n_trials=3",
                            f"hydra.sweeper.enqueue=[{GOOD},{DIVERGING},{FAILING}]",
                            "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.pruner.n_warmup_steps=0", cwd=tmp_path)
    # The failed trial is named and makes the exit status; the pruned one is no failure.
    errors = [line for line in result.stderr.splitlines() if line.startswith("metarun: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "algo.inner_lr=0.4 " in errors[0] and "meta-loss became" in errors[0] and "0.25" not in errors[0]
    study = load(sweep)
    assert study.direction.name == "MINIMIZE"  # sinusoid: MSE, from the run's metric
    good, bad, failed = study.trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [3, 6]
    assert bad.state == TrialState.PRUNED and list(bad.intermediate_values) == [3]
    assert failed.state == TrialState.FAIL
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    # Named by trial number and searched values (the fixed overrides are the same in every trial).
    assert [p.name for p in runs][:2] == ["0_algo.inner_lr=0.01,algo.inner_steps=1,train.meta_lr=0.001",
                                          "1_algo.inner_lr=0.25,algo.inner_steps=1,train.meta_lr=0.001"]
    assert read_metrics(runs[0])["val"]["mse"] == pytest.approx(good.value)
    pruned = read_metrics(runs[1])
    assert pruned["pruned"]["iteration"] == 3 and pruned["iterations"] == 3 and pruned["test"] is None
    assert (runs[1] / "checkpoints" / "last.pt").is_file()  # stopped after its validation, not mid-iteration
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_trial: 0" in results and "pruned: 1" in results and "fail: 1" in results


@pytest.mark.slow
def test_joblib_runs_a_batch_of_trials_at_once_that_report_from_their_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs hydra-joblib-launcher")
    sweep = tmp_path / "search"
    result = metarun_search(sweep, "train.iterations=6", "train.val_every=3", "hydra.sweeper.n_trials=2",
                            "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(sweep).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(sorted(t.intermediate_values) == [3, 6] for t in trials)  # reported by the worker processes
    assert sorted(p.name.split("_")[0] for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]


@pytest.mark.slow
def test_a_killed_search_resumes_where_it_stopped(tmp_path):
    sweep = tmp_path / "search"
    args = ("train.iterations=20", "train.val_every=5", "hydra.sweeper.n_trials=3", "hydra.sweeper.seed=0",
            "hydra.sweeper.pruner.type=none")
    with open(tmp_path / "first.log", "w") as log:
        proc = metarun_search(sweep, *args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not list(sweep.glob("1_*/checkpoints/last.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the trial stays RUNNING in the study
        proc.wait()
    (first,) = sweep.glob("0_*")
    (second,) = sweep.glob("1_*")
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").exists(), (tmp_path / "first.log").read_text()[-3000:]
    finished = (first / "metrics.json").stat().st_mtime_ns
    assert [t.state for t in load(sweep).trials] == [TrialState.COMPLETE, TrialState.RUNNING]

    result = metarun_search(sweep, *args, cwd=tmp_path)  # the same command, the same sweep directory
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(sweep).trials
    states = [t.state for t in trials]
    # Trial 0 kept; trial 1 marked interrupted and its parameters tried again first; n_trials=3 completed in all.
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs[INTERRUPTED] and trials[2].params == trials[1].params
    assert (first / "metrics.json").stat().st_mtime_ns == finished  # not rerun
    assert sorted(p.name.split("_")[0] for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "3"]
    # The retried trial resumed the killed one's run directory from its last checkpoint.
    assert "resuming from" in (second / "train.log").read_text()
    assert read_metrics(second)["iterations"] == 20 and read_metrics(second)["val"]["mse"] == pytest.approx(trials[2].value)
