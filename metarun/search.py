"""The job's side of an Optuna search (``metarun train -m hparams_search=...``): report, and stop when pruned.

The sweeper (``hydra_plugins/metarun_optuna_sweeper``) asks Optuna for a trial and launches the job
with ``hydra.sweeper.trial=N``, ``hydra.sweeper.storage=...`` and ``hydra.sweeper.study_name=...``
among its Hydra overrides, so the trial travels with the job's config to any launcher (joblib,
Slurm). The trainer calls ``report()`` after each validation: the job opens the study from its
storage (a journal or SQLite file that every process shares), records the validation metric as the
trial's intermediate value at that iteration, and raises ``Pruned`` when the study's pruner (median
or Hyperband) rejects the trial. ``prunable(train)`` turns that into a clean end: ``metrics.json``
says the run was pruned, and the job returns a ``PrunedResult`` that the sweeper tells Optuna as
PRUNED (a completed job, so the CLI does not count it among failed jobs).

Outside a search (a single run, another sweeper) ``report()`` does nothing and Optuna is not imported.
"""

import logging
from pathlib import Path

from omegaconf import OmegaConf

from metarun.utils.files import write_json

log = logging.getLogger("metarun")


class Pruned(Exception):
    """The search's pruner stopped this trial at ``iteration``; ``history`` is its validations so far."""

    def __init__(self, trial: int, iteration: int, metric: str, history: list):
        super().__init__(f"trial {trial} pruned at iteration {iteration}")
        self.trial, self.iteration, self.metric, self.history = trial, iteration, metric, list(history)


class PrunedResult:
    """What a pruned job returns to the sweeper: its last validation value and where it stopped."""

    def __init__(self, trial: int, iteration: int, value: float):
        self.trial, self.iteration, self.value = trial, iteration, value

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        return f"PrunedResult(trial={self.trial}, iteration={self.iteration}, value={self.value})"


def trial_node():
    """The trial this job runs (``hydra.sweeper``'s ``trial``, ``storage`` and ``study_name``), or None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().get("sweeper")
    if sweeper is None or OmegaConf.select(sweeper, "trial", default=None) is None:
        return None
    return sweeper


def open_storage(url: str):
    """Optuna storage for ``url``: a ``*.journal`` file (JournalStorage, safe for several processes
    on one file system) or an RDB URL such as ``sqlite:///search.db``."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    return JournalStorage(JournalFileBackend(url))


def pruner(conf):
    """The search's pruner from ``hydra.sweeper.pruner``: built by the sweeper and by each job alike
    (a study loaded from storage does not keep its pruner)."""
    import optuna

    from metarun.errors import MetarunError

    kind = conf.type
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=conf.n_startup_trials, n_warmup_steps=conf.n_warmup_steps)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=conf.min_resource, max_resource=conf.max_resource,
                                              reduction_factor=conf.reduction_factor)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise MetarunError(f"hydra.sweeper.pruner.type={kind}: choose median, hyperband or none")


_open: dict = {}  # (storage, study, trial number) -> the Optuna trial, for the length of one job


def _trial(node):
    import optuna

    key = (node.storage, node.study_name, int(node.trial))
    if key not in _open:
        _open.clear()  # a launcher that runs jobs one after another in this process: one open trial at a time
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=node.study_name, storage=open_storage(node.storage), pruner=pruner(node.pruner))
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(node.trial))
        _open[key] = optuna.Trial(study, trial_id)
    return _open[key]


def report(iteration: int, metric: str, history: list) -> None:
    """After a validation: give the trial every validation it lacks (a resumed job's earlier ones
    too), then raise ``Pruned`` if the pruner rejects it. A no-op outside a search."""
    node = trial_node()
    if node is None:
        return
    trial = _trial(node)
    known = trial.study._storage.get_trial(trial._trial_id).intermediate_values
    for entry in history:
        if entry["iteration"] not in known:
            trial.report(float(entry[metric]), entry["iteration"])
    if trial.should_prune():
        log.warning(f"trial {node.trial}: pruned at iteration {iteration} by the search's pruner "
                    f"(val {metric} {history[-1][metric]:.4f})")
        raise Pruned(int(node.trial), iteration, metric, history)


def prunable(fn):
    """``fn(cfg, run_dir)`` that ends cleanly when the pruner stops it: ``metrics.json`` records the
    pruning, and the job returns a ``PrunedResult``."""

    def run(cfg, run_dir: Path):
        try:
            return fn(cfg, run_dir)
        except Pruned as p:
            last = p.history[-1][p.metric] if p.history else float("nan")
            write_json(Path(run_dir) / "metrics.json", {
                "metric": p.metric, "pruned": {"trial": p.trial, "iteration": p.iteration, "val": last},
                "test": None, "val": {"history": p.history}, "iterations": p.iteration,
            })
            return PrunedResult(p.trial, p.iteration, last)

    return run
