"""A thin Hydra sweeper on Optuna's ask-and-tell API (``hydra/sweeper=metarun_optuna``).

Why not hydra-optuna-sweeper 1.3.0: it pins optuna<3 and its SQLite storage fails with SQLAlchemy 2.
This one asks a current Optuna (>=4) for ``n_jobs`` trials at a time, hands them to Hydra's launcher
as one batch (basic, joblib or submitit: several trials run at once), and tells Optuna each result:
the job's best validation metric, PRUNED when the job's pruner stopped it (``metarun/search.py``),
FAIL when the job failed (the CLI names failed jobs when the sweep ends).

The study lives in the sweep directory (``optuna.journal``, Optuna's JournalStorage), so
rerunning the same command with the same ``hydra.sweep.dir`` resumes the search: finished trials
are kept and only the remaining ``n_trials`` are asked. A trial that a killed sweep left running is
marked failed ("interrupted") and its parameters are tried again first, in the same run directory,
where ``metarun train`` resumes from its ``checkpoints/last.pt``. Several workers (one command
started several times, on one machine or on Slurm) share the study and run ``n_trials`` in all.
"""

import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from metarun.errors import MetarunError

log = logging.getLogger("metarun")

INTERRUPTED = "interrupted"  # user attr of a trial a killed sweep left running (failed, and asked again)
RUN_DIR = "run_dir"  # user attr: the trial's job directory, relative to the sweep directory
OWNER = "sweeper"  # user attr: host:pid of the sweep process that launched the trial


def distribution(override: Override):
    """The Optuna distribution of one sweep override; None for a plain value (the same in every trial)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)) and values:
            return IntDistribution(min(values), max(values), step=abs(value.step))
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise MetarunError(f"{override.input_line}: the Optuna search takes choice(...), range(...) or "
                       f"interval(...) (tag(log, interval(...)) for a log scale)")


def encoded(value: Any) -> str:
    """``value`` as a Hydra override's value."""
    if isinstance(value, str) and not re.fullmatch(r"[\w.:/+-]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def trial_dir_name(number: int, params: dict) -> str:
    """``3_algo.inner_lr=0.03029,algo.inner_steps=3``: the trial's number (workers sharing a study never
    share a directory) and what it searched, short (the exact values are in its config), for TensorBoard."""
    shown = ",".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in sorted(params.items()))
    return f"{number}_{shown}"[:200]


def storage_url(storage: Optional[str], sweep_dir: Path) -> str:
    if not storage:
        return str((sweep_dir / "optuna.journal").resolve())
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def metric_direction(cfg: DictConfig) -> str:
    """maximize for accuracy, minimize for MSE: the metric of the run ``cfg`` (a ``metarun train`` config) makes."""
    from metarun.algos.base import metric_name
    from metarun.utils.runtime import target_class

    return "maximize" if metric_name(target_class(cfg.data).problem) == "accuracy" else "minimize"


def _alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's worker: it may be running still
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MetarunOptunaSweeper(Sweeper):
    def __init__(self, n_trials: int, n_jobs: int, direction: str, seed: Optional[int], study_name: str,
                 storage: Optional[str], params: Any, enqueue: Any, pruner: Any, trial: Optional[int] = None):
        self.n_trials, self.n_jobs, self.direction, self.seed = n_trials, n_jobs, direction, seed
        self.study_name, self.storage, self.pruner_conf = study_name, storage, pruner
        self.params = dict(params or {})
        self.enqueue = [OmegaConf.to_container(e) if isinstance(e, DictConfig) else dict(e) for e in (enqueue or [])]
        if n_trials < 1 or n_jobs < 1:
            raise MetarunError(f"hydra.sweeper.n_trials={n_trials}, n_jobs={n_jobs}: both must be at least 1")
        if direction not in ("auto", "maximize", "minimize"):
            raise MetarunError(f"hydra.sweeper.direction={direction}: choose maximize, minimize or auto")

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def _metric_direction(self, fixed: List[str]) -> str:
        return metric_direction(self.hydra_context.config_loader.load_sweep_config(self.config, fixed))

    def sweep(self, arguments: List[str]) -> Any:
        try:
            import optuna
        except ImportError:
            raise MetarunError("hydra/sweeper=metarun_optuna needs Optuna: pip install 'metarun[search]' "
                               "(or pip install 'optuna>=4')") from None

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        space, fixed = {}, {}
        for o in overrides:
            dist = distribution(o)
            if dist is None:
                fixed[o.input_line.split("=", 1)[0]] = o.input_line  # a later one for the same key wins
                space.pop(o.get_key_element(), None)
            else:
                space[o.get_key_element()] = dist
        fixed_lines = [line for key, line in fixed.items() if key.lstrip("+~") not in space]
        if not space:
            raise MetarunError("the Optuna search has nothing to search: give hydra.sweeper.params "
                               "(an hparams_search config) or a sweep override such as algo.inner_lr='interval(0.01, 1)'")
        direction = self._metric_direction(fixed_lines) if self.direction == "auto" else self.direction

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        url = storage_url(self.storage, sweep_dir)
        from metarun.search import open_storage, pruner

        study = optuna.create_study(study_name=self.study_name, storage=open_storage(url), direction=direction,
                                    sampler=optuna.samplers.TPESampler(seed=self.seed),
                                    pruner=pruner(self.pruner_conf), load_if_exists=True)
        if study.direction.name.lower() != direction:
            raise MetarunError(f"the study '{self.study_name}' in {url} was made to {study.direction.name.lower()}, "
                               f"this search would {direction}: use another hydra.sweep.dir or hydra.sweeper.study_name")
        for params in self.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
        self._requeue_interrupted(study, sweep_dir, optuna)
        log.info(f"Optuna search: {direction} over {', '.join(space)}; study '{self.study_name}' in {url}")

        returns, owner = [], f"{socket.gethostname()}:{os.getpid()}"
        while (left := self.n_trials - self._counted(study, optuna)) > 0:
            batch = [study.ask(space) for _ in range(min(self.n_jobs, left))]
            jobs = []
            for trial in batch:
                subdir = trial.user_attrs.get(RUN_DIR) or trial_dir_name(trial.number, trial.params)
                trial.set_user_attr(OWNER, owner)
                params = [f"{k}={encoded(v)}" for k, v in trial.params.items()]
                jobs.append([*fixed_lines, *params, f"hydra.sweeper.trial={trial.number}",
                             f"hydra.sweeper.storage={encoded(url)}", f"hydra.sweeper.study_name={encoded(self.study_name)}",
                             f"hydra.sweep.subdir={encoded(subdir)}"])
            results = self.launcher.launch(jobs, initial_job_idx=batch[0].number)
            for trial, result in zip(batch, results):
                self._tell(study, trial, result, optuna)
            returns.append(results)
        self._summary(study, sweep_dir, optuna)
        return returns

    @staticmethod
    def _counted(study, optuna) -> int:
        """Trials that count towards n_trials: all but those waiting and those a killed sweep left behind."""
        return sum(1 for t in study.get_trials(deepcopy=False)
                   if t.state != optuna.trial.TrialState.WAITING and not t.user_attrs.get(INTERRUPTED))

    @staticmethod
    def _requeue_interrupted(study, sweep_dir: Path, optuna) -> None:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if _alive(t.user_attrs.get(OWNER, "")):
                continue
            optuna.Trial(study, t._trial_id).set_user_attr(INTERRUPTED, True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            run_dir = t.user_attrs.get(RUN_DIR) or next((p.name for p in sorted(sweep_dir.glob(f"{t.number}_*"))), None)
            study.enqueue_trial(t.params, user_attrs={RUN_DIR: run_dir} if run_dir else None)
            log.warning(f"trial {t.number} was interrupted (its sweep was killed): trying its parameters again")

    def _tell(self, study, trial, result, optuna) -> None:
        from metarun.search import PrunedResult

        try:
            value = result.return_value  # NaN for a failed job under metarun's JobResults callback, which records it
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        if isinstance(value, PrunedResult):
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info(f"trial {trial.number}: pruned at iteration {value.iteration} ({trial.params})")
            return
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = float("nan")
        if value != value or value in (float("inf"), float("-inf")):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning(f"trial {trial.number}: failed or not finite ({trial.params})")
            return
        study.tell(trial, value)
        log.info(f"trial {trial.number}: {value:.4f} ({trial.params})")

    def _summary(self, study, sweep_dir: Path, optuna) -> None:
        states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
        counts = {s: states.count(s) for s in ("complete", "pruned", "fail") if s in states}
        best = None
        try:
            best = study.best_trial
        except ValueError:
            pass  # no trial completed
        results = {"study_name": study.study_name, "direction": study.direction.name.lower(), "trials": counts,
                   "best_trial": best.number if best else None, "best_value": best.value if best else None,
                   "best_params": dict(best.params) if best else None}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log.info(f"Optuna search: {counts}; best: "
                 + (f"trial {best.number}, {best.value:.4f} with {best.params}" if best else "none completed")
                 + f" ({sweep_dir / 'optimization_results.yaml'})")

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        pass  # each batch is composed by the launcher; a bad override fails its job, reported by the CLI
