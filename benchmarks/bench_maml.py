"""Speed of a MAML meta-iteration and of episode sampling, as ratios against references run alongside.

Setting: Omniglot 5-way 1-shot, 15 queries per class, meta-batch 32, 1 inner step, second order,
MAML's Conv4 (64 filters, stride 2). Every variant gets the same real episodes; the timings of all
variants are interleaved round by round so that machine noise hits them alike, and the median
round is reported.

    METARUN_DATA_DIR=../shared/data python benchmarks/bench_maml.py [--device auto] [--rounds 5]

References: ``reference`` is the textbook per-task loop (``torch.autograd.grad(create_graph=True)``
and one backward per task) on the same network; ``higher`` (Grefenstette et al.) runs when it is
installed. metarun's ``loop``, ``vmap`` and ``threads`` (CPU) or ``graphs`` (CUDA) paths and ``auto``
(which races them) run through ``metarun.execution`` as a training run does. Episode
sampling is compared with decoding PNGs with PIL per image, as the peers' datasets do.
"""

import io
import random
import statistics
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import benchmark_parser  # noqa: E402
from metarun.algos.base import synchronize  # noqa: E402
from metarun.algos.maml import MAML  # noqa: E402
from metarun.execution import Execution  # noqa: E402
from metarun.data.omniglot import OmniglotTasks  # noqa: E402
from metarun.models import Conv4  # noqa: E402
from metarun.utils.runtime import resolve_device  # noqa: E402

WAYS, SHOTS, QUERIES, TASKS, INNER_LR = 5, 1, 15, 32, 0.4


def metarun_step(batching):
    """metarun's meta-gradient through its execution module, as ``metarun train`` takes it: ``auto`` races
    the paths at its first (warm-up) call and keeps the fastest; ``threads`` splits the tasks over the cores."""
    execution = Execution(batching, None, None)  # no disk cache: every run of the benchmark tunes afresh
    algos = {}

    def step(model, optimizer, episode):
        algo = algos.setdefault(id(model), MAML(model, "classification", inner_lr=INNER_LR, inner_steps=1,
                                                batching=batching))
        optimizer.zero_grad()
        execution.meta_gradient(algo, episode)
        step.path = execution.current
        optimizer.step()

    step.path = None
    return step


def reference_step(model, optimizer, episode):
    """The per-task loop every MAML tutorial writes: adapt, query loss, backward, task by task."""
    optimizer.zero_grad()
    params = dict(model.named_parameters())
    for t in range(episode.num_tasks):
        loss = F.cross_entropy(functional_call(model, params, (episode.support_x[t],)), episode.support_y[t])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {k: p - INNER_LR * g for (k, p), g in zip(params.items(), grads)}
        query = F.cross_entropy(functional_call(model, fast, (episode.query_x[t],)), episode.query_y[t])
        (query / episode.num_tasks).backward()
    optimizer.step()


def higher_step():
    try:
        import higher
    except ImportError:
        return None

    def step(model, optimizer, episode):
        optimizer.zero_grad()
        inner = torch.optim.SGD(model.parameters(), lr=INNER_LR)
        for t in range(episode.num_tasks):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                diffopt.step(F.cross_entropy(fmodel(episode.support_x[t]), episode.support_y[t]))
                (F.cross_entropy(fmodel(episode.query_x[t]), episode.query_y[t]) / episode.num_tasks).backward()
        optimizer.step()

    return step


def time_rounds(variants, episodes, device, rounds):
    """Median seconds per meta-iteration of each variant, timed in interleaved rounds."""
    models = {name: Conv4(WAYS).to(device) for name in variants}
    for m in models.values():
        m.load_state_dict(next(iter(models.values())).state_dict())
    optimizers = {name: torch.optim.Adam(models[name].parameters(), 1e-3) for name in variants}
    times = {name: [] for name in variants}
    for r in range(rounds + 1):  # round 0 warms up
        for name, step in variants.items():
            synchronize(device)
            tic = time.perf_counter()
            step(models[name], optimizers[name], episodes[r % len(episodes)])
            synchronize(device)
            if r:
                times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def pil_episode(archives, files_by_character, rng):
    """Baseline sampler: decode each PNG from the zip with PIL, resize, rotate, stack."""
    images = []
    for character in rng.sample(sorted(files_by_character), WAYS):
        turns = rng.randrange(4)
        for archive, member in rng.sample(files_by_character[character], SHOTS + QUERIES):
            with Image.open(io.BytesIO(archives[archive].read(member))) as im:
                im = Image.eval(im.convert("L"), lambda v: 255 - v).resize((28, 28), Image.LANCZOS)
            images.append(torch.from_numpy(np.array(im)).rot90(turns).float() / 255)
    return torch.stack(images)


def sampling_throughput(root, data, rounds):
    """Tasks per second: metarun's tensor sampler against PIL decoding per image."""
    archives = {name: zipfile.ZipFile(Path(root) / "omniglot" / f"{name}.zip") for name in ("images_background", "images_evaluation")}
    files_by_character = {}
    for name, zf in archives.items():
        for member in zf.namelist():
            if member.endswith(".png"):
                files_by_character.setdefault(member.rsplit("/", 1)[0], []).append((name, member))
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    ours, pil = [], []
    for _ in range(rounds):
        tic = time.perf_counter()
        data.sample("train", TASKS, generator)
        synchronize(data.device)
        ours.append(TASKS / (time.perf_counter() - tic))
        tic = time.perf_counter()
        for _ in range(TASKS):
            pil_episode(archives, files_by_character, rng)
        pil.append(TASKS / (time.perf_counter() - tic))
    return statistics.median(ours), statistics.median(pil)


def main():
    parser = benchmark_parser(__doc__)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    data = OmniglotTasks(WAYS, SHOTS, QUERIES, "maml", args.root, cache_dir=args.cache_dir).to(device)
    episodes = [data.sample("train", TASKS, torch.Generator().manual_seed(i)) for i in range(3)]

    variants = {"reference": reference_step, "loop": metarun_step("loop"), "vmap": metarun_step("vmap"),
                "threads": metarun_step("threads"), "auto": metarun_step("auto")}
    if device.type == "cuda":  # threads runs as the loop there; graphs replays a captured CUDA graph
        variants = {**{k: v for k, v in variants.items() if k != "threads"}, "graphs": metarun_step("graphs")}
    if higher_step() is not None:
        variants["higher"] = higher_step()
    seconds = time_rounds(variants, episodes, device, args.rounds)

    console = Console()
    auto = variants["auto"].path
    table = Table(title=f"MAML meta-iteration, Omniglot {WAYS}-way {SHOTS}-shot, {QUERIES} queries, "
                        f"meta-batch {TASKS}, 1 inner step, {device} ({torch.get_num_threads()} threads)")
    for column in ("variant", "ms / iteration", "iterations / s", "speed vs reference"):
        table.add_column(column, justify="right")
    for name, s in seconds.items():
        label = f"auto (= {auto})" if name == "auto" else name
        table.add_row(label, f"{1000 * s:.0f}", f"{1 / s:.2f}", f"{seconds['reference'] / s:.2f}x")
    console.print(table)

    ours, pil = sampling_throughput(args.root, data, args.rounds)
    table = Table(title=f"Episode sampling ({WAYS}-way, {SHOTS + QUERIES} images per class, rotations)")
    for column in ("sampler", "tasks / s", "speed vs PIL"):
        table.add_column(column, justify="right")
    table.add_row("metarun (uint8 tensor, indexing)", f"{ours:.0f}", f"{ours / pil:.0f}x")
    table.add_row("PIL per image (baseline)", f"{pil:.1f}", "1x")
    console.print(table)


if __name__ == "__main__":
    main()
