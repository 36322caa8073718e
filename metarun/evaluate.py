"""``metarun eval ckpt=PATH``: meta-test a saved checkpoint on the fixed test tasks of its data.

The checkpoint describes itself: its resolved config rebuilds the data source, network and
algorithm; this command supplies only the device, where the data lives, and the test settings.
Writes ``metrics.json`` (the ``test`` section of ``metarun train``'s) into its own run directory.
"""

import logging
from pathlib import Path

import hydra
import rich
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metarun.config import conf_dir
from metarun.errors import MetarunError
from metarun.evaluation import meta_test
from metarun.train import build_experiment, protocol
from metarun.utils.checkpoint import load_checkpoint
from metarun.utils.display import progress_bar, results_table, run_title, show_results
from metarun.utils.runtime import require_positive
from metarun.utils.files import write_json
from metarun.utils.task import run_task

log = logging.getLogger("metarun")


def run_config(cfg: DictConfig, saved: dict) -> DictConfig:
    """The checkpoint's config with this command's evaluation settings laid over it."""
    run = OmegaConf.create(saved)
    run.device = cfg.device
    for key, value in cfg.test.items():
        if value is not None:
            run.test[key] = value
    for key in ("root", "cache_dir", "download", "url"):  # only where the data has files (not sinusoid)
        if key in run.data and not (key == "url" and cfg.data.url is None):
            run.data[key] = cfg.data[key]
    for key in ("eval_inner_steps", "batching"):
        if cfg.algo[key] is not None:
            if key not in run.algo:
                raise MetarunError(f"algo.{key} does not apply to {run.algo._target_.rsplit('.', 1)[-1]} "
                                   f"(it has no inner loop): leave it out")
            run.algo[key] = cfg.algo[key]
    return run


def evaluate(cfg: DictConfig, run_dir: Path) -> float:
    require_positive(cfg, "batch_size", *(["test.episodes"] if cfg.test.episodes is not None else []))
    path = Path(cfg.ckpt).expanduser()
    state = load_checkpoint(path)
    run = run_config(cfg, state["config"])
    _, data, algo = build_experiment(run)
    algo.load_state_dict(state["algo"])
    algo.tuned_batching = state.get("batching")  # auto: the path the run took
    log.info(f"evaluating {path} (iteration {state['iteration']}) on {run.test.episodes} test tasks")
    with progress_bar() as progress:
        test = meta_test(algo, data, "test", run.test.episodes, cfg.batch_size, algo.eval_inner_steps,
                         run.test.eval_seed, progress)
    test["checkpoint"] = f"{path} (iteration {state['iteration']})"
    write_json(run_dir / "metrics.json", {"task": algo.task, "metric": algo.metric, "test": test,
                                          "protocol": protocol(run, algo),
                                          "config": OmegaConf.to_container(run, resolve=True)})
    show_results(results_table(f"{run_title(run)}: {path}", algo.metric, test, None))
    return test[algo.metric]


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="eval")
def main(cfg: DictConfig) -> float:
    return run_task(evaluate, cfg, Path(HydraConfig.get().runtime.output_dir), "eval.log")
