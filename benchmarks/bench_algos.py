"""Speed of one meta-iteration of every algorithm, as ratios against a per-task reference run alongside.

Each algorithm runs its paper's Omniglot experiment config (``conf/experiment/<algo>_omniglot_*``:
its network, ways, shots, queries, meta-batch and inner loop) on real episodes. Variants:

- ``reference``: the plain per-task loop, one task's meta-loss and one backward pass after another
  (what a per-task implementation costs; MAML's reference is the textbook loop, see bench_maml.py);
- ``loop`` / ``vmap`` / ``threads``: metarun's execution paths through ``metarun.execution``, as a
  training run takes them (``threads`` on a CPU with 2+ threads; Reptile's training runs it as the loop);
- ``auto``: the default; like ``metarun train``, its first call (the warm-up round, not counted)
  races the paths on the first episode and keeps the fastest.

Variants are timed in interleaved rounds (so machine noise hits them alike) and the median round is
reported, with the ratio ``reference / variant`` (above 1 is faster than the reference).

    METARUN_DATA_DIR=../shared/data python benchmarks/bench_algos.py [--device auto] [--rounds 5] [--algos maml,reptile]
"""

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import benchmark_parser  # noqa: E402
from metarun.algos.base import synchronize  # noqa: E402
from metarun.config import conf_dir  # noqa: E402
from metarun.execution import Execution  # noqa: E402
from metarun.experiment import build_experiment  # noqa: E402

EXPERIMENTS = {
    "maml": "maml_omniglot_5w1s", "fomaml": "fomaml_omniglot_5w1s", "mamlpp": "mamlpp_omniglot_5w1s",
    "anil": "anil_omniglot_20w1s", "metasgd": "metasgd_omniglot_5w1s", "reptile": "reptile_omniglot_5w1s",
    "protonet": "protonet_omniglot_5w1s", "matchingnet": "matchingnet_omniglot_5w1s",
}


def compose_experiment(name, root, device, cache_dir=None):
    cache = [f"data.cache_dir={cache_dir}"] if cache_dir else []
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name="bench"):
        return compose("train", [f"experiment={name}", f"data.root={root}", "data.download=false", f"device={device}",
                                 *cache])


def meta_iteration(algo, optimizer, execution):
    def step(episode, iteration):
        optimizer.zero_grad(set_to_none=True)
        execution.meta_gradient(algo, episode, iteration)
        optimizer.step()

    return step


def reference_iteration(algo, optimizer):
    """One task at a time: its own graph and backward pass, gradients summed over the meta-batch."""
    algo.batching = "loop"

    def step(episode, iteration):
        optimizer.zero_grad(set_to_none=True)
        for t in range(episode.num_tasks):
            loss, _ = algo.meta_loss(episode.tasks(t, t + 1), iteration)
            (loss / episode.num_tasks).backward()
        optimizer.step()

    return step


def time_algorithm(cfg, rounds, iteration):
    """Median seconds per meta-iteration of each variant, and the path ``auto`` takes."""
    device, data, algo = build_experiment(cfg)
    episodes = [data.sample("train", cfg.train.meta_batch_size, torch.Generator().manual_seed(i)) for i in range(3)]
    variants, executions = {}, {}
    for name in ("reference", "loop", "vmap", "threads", "auto"):
        clone = copy.deepcopy(algo)
        clone.batching = "loop" if name == "reference" else name
        optimizer = torch.optim.SGD(clone.parameters(), lr=1e-6)  # the optimiser step is not what is measured
        if name == "reference":
            variants[name] = reference_iteration(clone, optimizer)
        else:
            executions[name] = Execution(name, None, None)  # no disk cache: auto tunes in this run
            variants[name] = meta_iteration(clone, optimizer, executions[name])
    times = {name: [] for name in variants}
    for r in range(rounds + 1):  # round 0 warms up
        for name, step in variants.items():
            synchronize(device)
            tic = time.perf_counter()
            step(episodes[r % len(episodes)], iteration)
            synchronize(device)
            if r:
                times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}, executions["auto"].current


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--algos", default=",".join(EXPERIMENTS), help="comma-separated subset of " + ",".join(EXPERIMENTS))
    parser.add_argument("--iteration", type=int, default=10**9,
                        help="meta-iteration passed to the algorithms (late: MAML++'s annealing is over)")
    args = parser.parse_args()
    console = Console()
    table = Table(title=f"One meta-iteration per algorithm ({args.device}, {torch.get_num_threads()} threads): "
                        "ms, and speed vs the per-task reference")
    for column in ("algorithm", "experiment", "meta-batch", "reference", "loop", "vmap", "threads", "auto (path)",
                   "auto it/s"):
        table.add_column(column, justify="right")
    for name in args.algos.split(","):
        torch.manual_seed(0)
        cfg = compose_experiment(EXPERIMENTS[name], args.root, args.device, args.cache_dir)
        seconds, auto_path = time_algorithm(cfg, args.rounds, args.iteration)
        ref = seconds["reference"]
        cell = lambda v: f"{1000 * seconds[v]:.0f} ({ref / seconds[v]:.2f}x)"  # noqa: E731
        table.add_row(name, EXPERIMENTS[name], str(cfg.train.meta_batch_size), f"{1000 * ref:.0f}", cell("loop"),
                      cell("vmap"), cell("threads"), f"{cell('auto')} {auto_path}", f"{1 / seconds['auto']:.2f}")
        console.print(f"{name}: " + "  ".join(f"{k} {1000 * v:.0f} ms" for k, v in seconds.items())
                      + f"  (auto took {auto_path})")
    console.print(table)


if __name__ == "__main__":
    main()
