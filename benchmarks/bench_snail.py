"""SNAIL's meta-iterations per second against ProtoNets', both timed in this run.

Two comparisons, timed in interleaved rounds (machine noise hits all four alike; the median round is
reported):

- ``paper protocol``: each algorithm's own Omniglot 5-way 1-shot experiment config, as
  ``metarun train experiment=...`` would train it: ``snail_omniglot_5w1s`` (32 tasks of 5-way 1-shot,
  one query per class) against ``protonet_omniglot_5w1s`` (one 60-way 1-shot episode with 5 queries
  per class). One iteration is one meta-update of each; the work in it differs by design.
- ``same episodes``: both algorithms on the very same episodes, Omniglot 5-way 1-shot with
  ``--meta-batch`` tasks and ``--queries`` queries per class (by default SNAIL's protocol: 32 and 1),
  with the same embedding network (``conv4_embedding``, Conv4 with max-pooling). What is left is the
  cost of SNAIL's sequence model (and of embedding each query with the support set) over ProtoNets'
  distances.

A meta-iteration is what a training run does per iteration: the meta-gradient through
``metarun.execution`` on the path the algorithm's ``batching`` setting picks (``auto`` races the paths
in the warm-up round, which is not counted), then the config's optimiser step. Episodes are sampled
before timing.

    METARUN_DATA_DIR=../shared/data python benchmarks/bench_snail.py [--device auto] [--rounds 5] [--meta-batch 32] [--queries 1]
"""

import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import benchmark_parser  # noqa: E402
from metarun.algos.base import synchronize  # noqa: E402
from metarun.config import conf_dir  # noqa: E402
from metarun.execution import Execution  # noqa: E402
from metarun.experiment import build_experiment  # noqa: E402
from metarun.utils.runtime import build  # noqa: E402

PAPER = {"snail": "snail_omniglot_5w1s", "protonet": "protonet_omniglot_5w1s"}
EPISODES = 3  # distinct episodes per variant, cycled over the rounds


def compose_experiment(name, args, *overrides):
    cache = [f"data.cache_dir={args.cache_dir}"] if args.cache_dir else []
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name="bench"):
        return compose("train", [f"experiment={name}", f"data.root={args.root}", "data.download=false",
                                 f"device={args.device}", *cache, *overrides])


def describe(cfg) -> str:
    """The training episodes a config meta-learns from: tasks, ways, shots, queries per class."""
    d = cfg.data
    ways, queries = d.get("train_ways") or d.ways, d.get("train_queries")
    queries = d.queries if queries is None else queries
    shots = d.get("train_shots") or d.shots
    per_class = f"{queries} query/class" if queries == 1 else f"{queries} queries/class"
    return f"{cfg.train.meta_batch_size} x {ways}-way {shots}-shot, {per_class}"


def variant(cfg, episodes=None):
    """A training iteration of ``cfg``'s algorithm, its episodes (sampled from its own data unless given) and
    its execution (for the path it took)."""
    device, data, algo = build_experiment(cfg)
    if episodes is None:
        episodes = [data.sample("train", cfg.train.meta_batch_size, torch.Generator().manual_seed(i))
                    for i in range(EPISODES)]
    optimizer = build(cfg.optimizer)(algo.parameters())
    execution = algo.execution = Execution(cfg.algo.batching, cfg.train.get("task_chunk"), None)  # tunes in this run

    def step(episode):
        optimizer.zero_grad(set_to_none=True)
        execution.meta_gradient(algo, episode, 0)
        optimizer.step()

    return device, step, episodes, execution, data


def time_rounds(variants: dict, rounds: int) -> dict[str, float]:
    """Median seconds per meta-iteration of each variant, the variants taking turns in every round."""
    times = {name: [] for name in variants}
    for r in range(rounds + 1):  # round 0 warms up (and lets auto race the paths)
        for name, (device, step, episodes, _, _) in variants.items():
            synchronize(device)
            tic = time.perf_counter()
            step(episodes[r % len(episodes)])
            synchronize(device)
            if r:
                times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-batch, same-episode comparison")
    parser.add_argument("--queries", type=int, default=1, help="queries per class of the same-episode comparison")
    args = parser.parse_args()
    torch.manual_seed(0)
    paper = {algo: compose_experiment(name, args) for algo, name in PAPER.items()}
    # The same episodes: SNAIL's 5-way 1-shot data settings for both, ProtoNets without its 60-way training.
    same_data = [f"train.meta_batch_size={args.meta_batch}", f"data.train_queries={args.queries}"]
    same = {"snail": compose_experiment(PAPER["snail"], args, *same_data),
            "protonet": compose_experiment(PAPER["protonet"], args, *same_data, "data.train_ways=null")}
    variants = {f"paper {algo}": variant(cfg) for algo, cfg in paper.items()}
    variants["same snail"] = variant(same["snail"])
    variants["same protonet"] = variant(same["protonet"], episodes=variants["same snail"][2])
    assert describe(same["snail"]) == describe(same["protonet"])  # one setting, stated once below
    seconds = time_rounds(variants, args.rounds)
    path = {name: v[3].current for name, v in variants.items()}
    print(f"{torch.get_num_threads()} threads, device {args.device}, median of {args.rounds} rounds after a warm-up")
    for label, cfgs, prefix in (("paper protocol", paper, "paper"), ("same episodes", same, "same")):
        snail, proto = 1 / seconds[f"{prefix} snail"], 1 / seconds[f"{prefix} protonet"]
        if prefix == "paper":
            print(f"{label}: snail {snail:.4g} it/s ({PAPER['snail']}: {describe(cfgs['snail'])}; "
                  f"path {path['paper snail']})  protonet {proto:.4g} it/s ({PAPER['protonet']}: "
                  f"{describe(cfgs['protonet'])}; path {path['paper protonet']})  snail/protonet {snail / proto:.3f}x")
        else:
            print(f"{label}: Omniglot {describe(cfgs['snail'])}, conv4_embedding: snail {snail:.4g} it/s "
                  f"(path {path['same snail']})  protonet {proto:.4g} it/s (path {path['same protonet']})  "
                  f"snail/protonet {snail / proto:.3f}x")


if __name__ == "__main__":
    main()
