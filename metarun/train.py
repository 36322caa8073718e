"""``metarun train``: meta-train, validate every ``train.val_every`` iterations, meta-test the best.

One loop, read top to bottom. Everything the run writes goes under its Hydra run directory:
``checkpoints/{last,best}.pt``, ``tb/`` (TensorBoard), ``metrics.json``, ``config_tree.txt`` and
Hydra's ``.hydra/`` and ``train.log``. Rerunning with the same ``hydra.run.dir`` resumes from
``checkpoints/last.pt`` and ends with exactly the numbers of an uninterrupted run (on CPU).
Under ``torchrun --nproc_per_node N -m metarun train`` the ranks share each meta-batch and rank 0
alone writes the run (``metarun.distributed``); the numbers are those of one process, to rounding.
"""

import logging
import math
import shutil
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metarun import distributed, search
from metarun.config import conf_dir
from metarun.data.tasks import task_generator
from metarun.errors import MetarunError
from metarun.execution import cache_path
from metarun.experiment import build_experiment, flat_config, protocol
from metarun.metatest import meta_test
from metarun.resume import check_resumable
from metarun.utils import stop
from metarun.utils.checkpoint import FOR_RESUME, load_checkpoint, load_state, save_checkpoint
from metarun.utils.command import run_command
from metarun.utils.display import print_config_tree, progress_bar, results_table, run_title, show_results
from metarun.utils.logger import MetricLogger, TensorBoardLogger
from metarun.utils.runtime import build
from metarun.utils.files import write_json
from metarun.utils.rundir import run_overrides, write_hydra_record
from metarun.utils.share import apply_share
from metarun.validation import validate_train

log = logging.getLogger("metarun")


def train(cfg: DictConfig, run_dir: Path, world: distributed.World | None = None) -> float:
    """Train in ``run_dir``; under torchrun ``world`` holds this process's rank, and rank 0's ``run_dir``
    is the run's (``metarun.distributed``: the other ranks only read it)."""
    apply_share(cfg)  # this job's threads and GPU when a launcher runs several jobs at once (utils/share.py)
    validate_train(cfg)
    world = world or distributed.World()
    distributed.check(world, cfg.train.meta_batch_size)
    run_dir = Path(world.broadcast(str(run_dir)))  # rank 0's, which it owns from here on
    if world.leader:
        run_dir.mkdir(parents=True, exist_ok=True)
    device, data, algo = build_experiment(cfg)
    better = (lambda a, b: a > b) if algo.metric == "accuracy" else (lambda a, b: a < b)
    optimizer = build(cfg.optimizer)(algo.parameters())
    scheduler = build(cfg.scheduler)(optimizer)  # stepped once per meta-iteration
    algo.check_optimizer(optimizer)
    # How batches of tasks run (loop or vmap, chunks of tasks): decided per phase and shape, logged, checkpointed.
    execution = algo.execution = distributed.execution(world, algo.batching, cfg.train.get("task_chunk"), cache_path())
    tasks_rng = task_generator("train", cfg.seed)  # the training task stream; saved in checkpoints
    ckpt_dir, tb_dir = run_dir / "checkpoints", run_dir / "tb"
    total, metric = cfg.train.iterations, algo.metric
    # seconds: the training iterations alone; wall_seconds: the whole run, every attempt, validation included.
    iteration, best, history, seconds, wall_seconds = 0, None, [], 0.0, 0.0

    if (ckpt_dir / "last.pt").exists():
        last = ckpt_dir / "last.pt"
        state = load_checkpoint(last, FOR_RESUME)
        check_resumable(state["config"], cfg, last)
        if state["iteration"] > total:
            raise MetarunError(f"{run_dir} has already trained {state['iteration']} iterations, more than "
                               f"train.iterations={total}: resume with train.iterations={state['iteration']} or more, "
                               f"or start a new run directory")
        load_state(algo, state["algo"], last, "algorithm (network and meta-learned parameters)")
        load_state(optimizer, state["optimizer"], last, "optimizer (optimizer=)")
        load_state(scheduler, state["scheduler"], last, "learning-rate schedule (scheduler=)")
        restore_rng(state["rng"], tasks_rng, device, last)
        iteration, best, history, seconds = state["iteration"], state.get("best"), state["history"], state["seconds"]
        wall_seconds = float(state.get("wall_seconds", seconds))
        log.info(f"resuming from {last} at iteration {iteration}")
        execution.load_state_dict(state.get("execution"), state.get("batching"))  # the paths the run took (auto)

    started = time.perf_counter()
    overrides, record = run_overrides(), write_hydra_record(run_dir, cfg) if world.leader else {}  # accepted from here on
    rng_at_iteration = rng_state(tasks_rng, device)  # the random streams as of the last completed iteration
    saved_at = iteration if (ckpt_dir / "last.pt").exists() else None

    def checkpoint(name: str, rng: dict | None = None) -> None:
        nonlocal saved_at
        if name == "last.pt":
            saved_at = iteration
        if not world.leader:
            return
        save_checkpoint(ckpt_dir / name, {
            "iteration": iteration, "algo": algo.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "batching": execution.current or algo.path(device),
            "execution": execution.state_dict(), "best": best, "history": history,
            "seconds": seconds, "wall_seconds": wall_seconds + time.perf_counter() - started, "metric": metric,
            "config": OmegaConf.to_container(cfg, resolve=True), "overrides": overrides, "hydra": record,
            "rng": rng if rng is not None else rng_state(tasks_rng, device),
        })

    def validate(progress) -> None:
        nonlocal best
        val = meta_test(algo, data, "val", cfg.train.val_episodes, cfg.train.meta_batch_size,
                        algo.eval_inner_steps, cfg.test.eval_seed, progress, world=world)
        history.append({"iteration": iteration, metric: val[metric], "ci95": val["ci95"]})
        logger.log_scalars({f"val/{metric}": val[metric], f"val/{metric}_step0": val["per_step"][0]}, iteration)
        log.info(f"iteration {iteration}: val {metric} {val[metric]:.4f} ± {val['ci95']:.4f}")
        if not math.isfinite(val[metric]):
            log.warning(f"iteration {iteration}: the validation {metric} is {val[metric]} (the adaptation "
                        f"diverged); this checkpoint cannot become the best one")
        if math.isfinite(val[metric]) and (best is None or not math.isfinite(best[metric])
                                           or better(val[metric], best[metric])):
            best = {**val, "iteration": iteration}
            checkpoint("best.pt")
        checkpoint("last.pt")
        logger.flush()
        world.barrier()  # the checkpoints are on disk before any rank reads them (the test's best.pt)
        search.report(iteration, metric, history)  # in an Optuna search: raises search.Pruned if the pruner says so

    def validation_due() -> bool:
        scheduled = iteration > 0 and (iteration % cfg.train.val_every == 0 or iteration == total)
        return scheduled and not (history and history[-1]["iteration"] == iteration)

    if world.leader:
        print_config_tree(cfg, save_to=run_dir / "config_tree.txt")
    # The first training meta-batch's path, decided now (on a copy of the task stream: the run is unchanged).
    if algo.batching == "auto":
        first = world.sample(data, "train", cfg.train.meta_batch_size, torch.Generator().set_state(tasks_rng.get_state())) \
            if world.leader else None
        decide = execution.agree if world.active else execution.path  # under torchrun rank 0 decides for all
        execution.current = algo.tuned_batching = decide(algo, "train", first, iteration)
    log.info(f"run directory: {run_dir}  device: {device}  batching: {algo.path(device)} ({algo.batching})  "
             + (f"world size: {world.size}  " if world.active else "")
             + "  ".join(f"{k}: {v}" for k, v in data.summary().items()))
    # Hide what a stopped attempt logged after its checkpoint; what it logged up to it stays.
    logger = TensorBoardLogger(tb_dir, purge_step=iteration + 1 if iteration else None) if world.leader else MetricLogger()
    progress_bars = progress_bar if world.leader else distributed.quiet_progress
    tic = None  # when the current stretch of training iterations started (None: not training)
    try:
        with progress_bars() as progress:
            if validation_due():  # an attempt stopped during this validation: do it now, as the whole run did
                validate(progress)
            bar = progress.add_task("meta-train", total=total, completed=iteration, stats="")
            tic, tic_iteration = time.perf_counter(), iteration
            while iteration < total:
                rng_at_iteration = rng_state(tasks_rng, device)
                episode = world.sample(data, "train", cfg.train.meta_batch_size, tasks_rng)  # this rank's share
                optimizer.zero_grad(set_to_none=True)
                loss, metrics = execution.meta_gradient(algo, episode, iteration)  # into .grad, in chunks if asked
                loss, metrics = world.reduce_meta_gradient(algo, loss, metrics, episode.num_tasks,
                                                           cfg.train.meta_batch_size)  # the mean over every rank's tasks
                grad_norm = torch.nn.utils.clip_grad_norm_(algo.parameters(), float("inf"))
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    kept = ("checkpoints/last.pt keeps the last good state" if (ckpt_dir / "last.pt").exists()
                            else "no checkpoint had been written yet")
                    raise MetarunError(
                        f"the meta-loss became {loss.item():.4g} (gradient norm {grad_norm.item():.4g}) at iteration "
                        f"{iteration + 1}: training stopped, {kept}; lower train.meta_lr or algo.inner_lr"
                    )
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                world.sync_buffers(algo)
                iteration += 1
                rng_at_iteration = rng_state(tasks_rng, device)

                speed = (iteration - tic_iteration) / max(time.perf_counter() - tic, 1e-9)
                stats = f"loss {metrics['loss']:.4f}  {metric} {metrics[metric]:.3f}  {speed:.2f} it/s"
                progress.update(bar, advance=1, stats=stats)
                if not progress.console.is_terminal and iteration % max(1, total // 20) == 0:
                    log.info(f"iteration {iteration}/{total}: {stats}")  # logs, no live bar
                if iteration % cfg.train.log_every == 0 or iteration == total:
                    logger.log_scalars({"train/loss": metrics["loss"].item(), f"train/{metric}": metrics[metric].item(),
                                        "train/grad_norm": grad_norm.item(), "train/meta_lr": lr}, iteration)

                if validation_due():
                    seconds, tic = seconds + time.perf_counter() - tic, None
                    validate(progress)
                    tic, tic_iteration = time.perf_counter(), iteration
                world.check_stop()  # under torchrun every rank stops at the same iteration
            seconds, tic = seconds + time.perf_counter() - tic, None

        # Meta-test the chosen checkpoint on the fixed test tasks.
        if cfg.test.checkpoint == "best" and best is None:
            raise MetarunError(f"no validation of this run was finite, so there is no best checkpoint to test: "
                               f"lower train.meta_lr or algo.inner_lr, or set test.checkpoint=last")
        chosen = load_checkpoint(ckpt_dir / f"{cfg.test.checkpoint}.pt")
        load_state(algo, chosen["algo"], ckpt_dir / f"{cfg.test.checkpoint}.pt", "algorithm")
        log.info(f"meta-testing the {cfg.test.checkpoint} checkpoint (iteration {chosen['iteration']}) "
                 f"on {cfg.test.episodes} test tasks")
        with progress_bars() as progress:
            test = meta_test(algo, data, "test", cfg.test.episodes, cfg.train.meta_batch_size,
                             algo.eval_inner_steps, cfg.test.eval_seed, progress, world=world)
        test["checkpoint"] = f"{cfg.test.checkpoint} (iteration {chosen['iteration']})"
        logger.log_scalars({f"test/{metric}": test[metric], f"test/{metric}_ci95": test["ci95"]}, iteration)
        for step, value in enumerate(test["per_step"]):
            logger.log_scalars({f"test/{metric}_by_inner_step": value}, step)
        logger.log_hparams(
            {**{k: v for k, v in flat_config(cfg).items() if not k.startswith(("data.root", "data.cache_dir", "data.url"))},
             **{f"protocol.{k}": v for k, v in protocol(cfg, algo).items() if v is not None}},
            {f"hparams/test_{metric}": test[metric],
             f"hparams/val_{metric}": best[metric] if best is not None else float("nan")},
        )
    except stop.StopRequested:
        # Keep what is consistent: the state after the last completed iteration (a meta-batch cut
        # short changed no weight; its random draws are rewound).
        if tic is not None:
            seconds += time.perf_counter() - tic
        if saved_at != iteration:
            checkpoint("last.pt", rng=rng_at_iteration)
        if (ckpt_dir / "last.pt").exists() and world.leader:
            log.warning(f"stopped at iteration {iteration}; resume with: metarun train hydra.run.dir={run_dir}")
        else:
            log.warning("stopped before the first iteration; nothing to resume")
        raise stop.StopRequested("reported") from None
    finally:
        logger.close()

    attempt_seconds = time.perf_counter() - started
    if execution.tuning_seconds:
        log.info(f"execution: tuning took {execution.tuning_seconds:.1f} s in this run "
                 f"({100 * execution.tuning_seconds / max(attempt_seconds, 1e-9):.1f}% of its {attempt_seconds:.0f} s)")
    results = {
        "task": algo.problem, "metric": metric,  # "task": the key predates the name "problem"; metrics.json keeps it
        "test": test, "val": {**(best or {}), "history": history},
        "iterations": iteration,
        "training_seconds": round(seconds, 3),  # the meta-training iterations alone, every attempt
        "wall_clock_seconds": round(wall_seconds + time.perf_counter() - started, 3),  # the whole run, every attempt
        "batching": {"setting": algo.batching, "path": execution.current or algo.path(device),
                     "task_chunk": cfg.train.get("task_chunk"),
                     "tuning_seconds": round(execution.tuning_seconds, 3),  # this attempt's
                     "decisions": {k: v["path"] for k, v in execution.decisions.items()}},
        "protocol": protocol(cfg, algo),
        "world_size": world.size,  # processes that trained it (torchrun --nproc_per_node)
    }
    if world.leader:
        write_json(run_dir / "metrics.json", results)
        show_results(results_table(f"{run_title(cfg)}: {run_dir}", metric, test, best))
    return best[metric] if best is not None else float("nan")


def rng_state(tasks_rng: torch.Generator, device: torch.device) -> dict:
    return {"tasks": tasks_rng.get_state(), "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def restore_rng(saved: dict, tasks_rng: torch.Generator, device: torch.device, path: Path) -> None:
    try:
        tasks_rng.set_state(saved["tasks"])
        torch.set_rng_state(saved["torch"])
        if device.type == "cuda" and "cuda" in saved:
            torch.cuda.set_rng_state(saved["cuda"], device)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise MetarunError(f"{path} is damaged: its random-number states do not load ({' '.join(str(e).split())[:120]}); "
                           f"use another checkpoint or a new run directory") from None


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """Returns the best validation metric, so sweepers (Optuna) can optimise it."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    world = distributed.start(cfg.device.name)  # size 1 outside torchrun
    if not world.active:
        return run_command(search.prunable(train), cfg, output_dir, "train")
    try:
        if not world.leader:
            logging.getLogger("metarun").setLevel(logging.WARNING)  # rank 0 tells the story
        def agreed(cfg: DictConfig, run_dir: Path) -> float:
            with world.signals():  # inside run_command's handlers: a signal waits for every rank to agree
                return train(cfg, run_dir, world)

        # Rank 0 holds the run directory; the others hold their scratch one and get rank 0's in train().
        return run_command(agreed, cfg, output_dir, "train")
    finally:
        world.close()


def main() -> float:
    """``metarun train``; under torchrun a rank other than 0 runs Hydra in a scratch directory (``metarun.distributed``)."""
    sys.argv, scratch = distributed.scratch_argv(sys.argv)
    try:
        return hydra_main()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
