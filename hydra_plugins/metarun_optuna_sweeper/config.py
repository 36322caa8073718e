"""``hydra/sweeper=metarun_optuna``: the sweeper's keys, registered in Hydra's ConfigStore.

Hydra imports every module under the ``hydra_plugins`` namespace package when it starts, so this
registration runs before any config is composed. Optuna itself is imported only when a search runs.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class PrunerConf:
    """Optuna's pruners (steps are training iterations, one report per validation)."""

    type: str = "median"  # median, hyperband or none
    n_startup_trials: int = 2  # median: no pruning until this many trials have completed
    n_warmup_steps: int = 0  # median: no pruning of a trial before this iteration
    min_resource: int = 1  # hyperband: iterations of the smallest rung
    max_resource: Any = "auto"  # hyperband: train.iterations, or "auto" (learned from the first trials)
    reduction_factor: int = 3  # hyperband


@dataclass
class MetarunOptunaSweeperConf:
    _target_: str = "hydra_plugins.metarun_optuna_sweeper.sweeper.MetarunOptunaSweeper"
    n_trials: int = 20  # trials in the study in all, over every worker and every resume
    n_jobs: int = 1  # trials asked at once, one launcher batch (hydra/launcher=joblib or submitit runs them together)
    direction: str = "auto"  # maximize, minimize, or auto: from the run's metric (accuracy: maximize, mse: minimize)
    seed: Optional[int] = None  # the TPE sampler's seed
    study_name: str = "metarun"
    storage: Optional[str] = None  # null: ${hydra.sweep.dir}/optuna.journal; a *.journal path or an sqlite:/// URL
    params: Dict[str, str] = field(default_factory=dict)  # key: "tag(log, interval(1e-4, 1))" | "range(1, 6)" | "choice(a, b)"
    enqueue: List[Dict[str, Any]] = field(default_factory=list)  # trials to try first ({algo.inner_lr: 0.4, ...})
    pruner: PrunerConf = field(default_factory=PrunerConf)
    trial: Optional[int] = None  # set by the sweeper for each job: the trial the job reports to (metarun/search.py)


ConfigStore.instance().store(group="hydra/sweeper", name="metarun_optuna", node=MetarunOptunaSweeperConf,
                             provider="metarun")
