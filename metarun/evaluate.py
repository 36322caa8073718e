"""``metarun eval ckpt=PATH``: meta-test a saved checkpoint on the fixed test tasks of its data.

The checkpoint describes itself: its resolved config rebuilds the data source, network and
algorithm; this command supplies only the device, where the data lives, and the test settings.
Writes ``metrics.json`` (the ``test`` section of ``metarun train``'s) into its own run directory.
"""

import logging
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun.config import conf_dir
from metarun.errors import MetarunError
from metarun.execution import PATHS, Execution, cache_path
from metarun.experiment import build_experiment, protocol, upgraded_config
from metarun.metatest import meta_test
from metarun.utils.checkpoint import load_checkpoint, load_state
from metarun.utils.command import run_command
from metarun.utils.display import progress_bar, results_table, run_title, show_results
from metarun.utils.files import write_json
from metarun.utils.rundir import write_hydra_record
from metarun.utils.share import apply_share
from metarun.utils.targets import GROUPS, option_for
from metarun.validation import validate_eval

log = logging.getLogger("metarun")


def trusted_config(saved: dict, path: Path) -> DictConfig:
    """The checkpoint's config, rebuilt from metarun's own config groups.

    A checkpoint is data: each group must name one of metarun's classes (``utils/targets.py``), and
    its values are laid over that option's typed schema, so an unknown key, a wrong type or a
    foreign ``_target_`` is one line of error and nothing is imported or built."""
    saved = upgraded_config(saved)
    groups = {group: option_for(group, saved.get(group), str(path)) for group in GROUPS}
    base = compose_train([f"{group}={option}" for group, option in groups.items()])
    try:
        return OmegaConf.merge(base, saved)
    except OmegaConfBaseException as e:
        raise MetarunError(f"{path} holds a config this metarun cannot rebuild ({str(e).splitlines()[0]}): "
                           f"evaluate it with the metarun that wrote it") from None


def compose_train(overrides: list[str]) -> DictConfig:
    """The ``train`` config with ``overrides``, inside a running Hydra app or not; no ``hydra`` node."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def run_config(cfg: DictConfig, run: DictConfig) -> DictConfig:
    """The checkpoint's (trusted) config with this command's evaluation settings laid over it."""
    run.device = cfg.device
    for key, value in cfg.test.items():
        if value is not None:
            run.test[key] = value
    for key in ("root", "cache_dir", "download", "url"):  # only where the data has files (not sinusoid)
        if key in run.data and not (key == "url" and cfg.data.url is None):
            run.data[key] = cfg.data[key]
    if cfg.data.get("residency") is not None:  # where this machine keeps the store: same episodes either way
        if "residency" not in run.data:
            raise MetarunError(f"data.residency does not apply to {run.data._target_.rsplit('.', 1)[-1]} "
                               f"(it has no image store): leave it out")
        run.data.residency = cfg.data.residency
    for key in ("eval_inner_steps", "batching"):
        if cfg.algo[key] is not None:
            if key not in run.algo:
                raise MetarunError(f"algo.{key} does not apply to {run.algo._target_.rsplit('.', 1)[-1]} "
                                   f"(it has no inner loop): leave it out")
            run.algo[key] = cfg.algo[key]
    return run


def evaluate(cfg: DictConfig, run_dir: Path) -> float:
    apply_share(cfg)  # this job's threads and GPU when a launcher runs several jobs at once (utils/share.py)
    validate_eval(cfg)
    path = Path(cfg.ckpt).expanduser()
    state = load_checkpoint(path)
    run = run_config(cfg, trusted_config(state["config"], path))
    _, data, algo = build_experiment(run)
    load_state(algo, state["algo"], path, "algorithm (network and meta-learned parameters)")
    algo.tuned_batching = state.get("batching") if state.get("batching") in PATHS else None  # auto: the path the run took
    # Evaluation shapes the run met take its paths; new ones (another batch_size) are decided when met.
    algo.execution = Execution(algo.batching, None, cache_path())
    algo.execution.load_state_dict(state.get("execution"))
    write_hydra_record(run_dir, cfg)  # the evaluation is accepted from here on
    store = data.summary().get("store")  # where the image store lives (data.residency) and its size
    log.info(f"evaluating {path} (iteration {state['iteration']}) on {run.test.episodes} test tasks"
             + (f"  store: {store}" if store else ""))
    with progress_bar() as progress:
        test = meta_test(algo, data, "test", run.test.episodes, cfg.batch_size, algo.eval_inner_steps,
                         run.test.eval_seed, progress)
    test["checkpoint"] = f"{path} (iteration {state['iteration']})"
    write_json(run_dir / "metrics.json", {"task": algo.problem, "metric": algo.metric, "test": test,
                                          "protocol": protocol(run, algo),
                                          "config": OmegaConf.to_container(run, resolve=True)})
    show_results(results_table(f"{run_title(run)}: {path}", algo.metric, test, None))
    return test[algo.metric]


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="eval")
def main(cfg: DictConfig) -> float:
    return run_command(evaluate, cfg, Path(HydraConfig.get().runtime.output_dir), "eval")
