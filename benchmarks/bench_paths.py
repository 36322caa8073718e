"""Candidate execution paths of a second-order MAML meta-iteration on CPU, against the per-task reference.

Setting (issue 15, point 4): ``conf/experiment/maml_omniglot_5w1s`` with ``data.queries=15``: Omniglot
5-way 1-shot, 15 queries per class, meta-batch 32, MAML's strided Conv4 (64 filters, 28x28), inner lr
0.4, one inner step, second order. What is timed is one meta-gradient (meta-loss and backward pass into
the parameters); the optimiser step is the same for every path and left out.

Variants (each checked to give the reference's meta-gradient, float32 ``allclose``):

- ``reference``: the textbook per-task loop (``torch.autograd.grad(create_graph=True)``, one backward
  per task) on the same network, as bench_maml.py; ``metarun loop`` / ``vmap`` / ``threads``:
  metarun's paths (``threads`` through ``metarun.execution.meta_gradient``, as a run takes it);
- ``reference, elementary batch norm``: the reference with metarun's batch norm forced to its
  elementary-op form, which every path ran before the loop took the fused kernel (the gain of that);
- ``@1 thread``: the same with ``torch.set_num_threads(1)`` instead of the machine's default;
- ``vmap chunks of C``: metarun's vmap path over C tasks at a time, meta-gradient accumulated;
- ``channels_last``: network weights and images in channels-last memory format;
- ``metarun threads``: the tasks split in blocks over one Python thread per intra-op thread, each
  worker with one intra-op thread, the blocks' meta-gradients summed (``metarun.task_threads``);
- ``2 processes x 1``: the same over two spawned processes sharing the parameters and episodes;
- ``torch.compile``: ``torch.compile(torch.func.grad(per-task meta-loss))``, called task by task, in a
  child process with a time limit (``--compile-timeout``), timed there against its own reference;
  compile time (first call) is reported apart from the steady state, a failure or time-out as such;
- ``torch.func loop``: metarun's per-task function with ``functional=True`` (inner ``torch.func.grad``)
  in a plain Python loop, then one backward; ``torch.func grad loop``: the whole per-task
  meta-gradient from ``torch.func.grad``, summed (the ``functional`` flag question).

Variants are timed in interleaved rounds (the order rotates each round, so machine noise and cache
effects hit them alike) after one warm-up round; the median round is reported with ``reference /
variant`` (above 1 is faster). The machine's load average is printed before and after.

    METARUN_DATA_DIR=../shared/data python benchmarks/bench_paths.py [--rounds 7] [--meta-batch 32]

Without the Omniglot archives (or with ``--random-data``) episodes are random tensors of the same shape.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.func import functional_call, grad

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import benchmark_parser  # noqa: E402
from metarun.config import conf_dir  # noqa: E402
from metarun import execution, task_threads  # noqa: E402
from metarun.data.episode import Episode  # noqa: E402
from metarun.models.batchnorm import BatchStatNorm  # noqa: E402
from metarun.utils.runtime import build  # noqa: E402

EXPERIMENT = "maml_omniglot_5w1s"
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}  # float32 allclose, on meta-gradients of order 1e-2..1


# -- setting ------------------------------------------------------------------------------------
def compose_setting(root, queries, meta_batch, cache_dir=None):
    cache = [f"data.cache_dir={cache_dir}"] if cache_dir else []
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name="bench_paths"):
        return compose("train", [f"experiment={EXPERIMENT}", f"data.root={root}", "data.download=false",
                                 "device=cpu", f"data.queries={queries}", f"train.meta_batch_size={meta_batch}",
                                 "algo.batching=loop", *cache])


def has_omniglot(root) -> bool:
    return all((Path(root) / "omniglot" / f"images_{s}.zip").is_file() for s in ("background", "evaluation"))


def random_episode(cfg, tasks, generator) -> Episode:
    d = cfg.data
    shape = (d.channels, d.image_size, d.image_size)
    labels = lambda n: torch.arange(d.ways).repeat_interleave(n).expand(tasks, -1).contiguous()  # noqa: E731
    return Episode(torch.rand(tasks, d.ways * d.shots, *shape, generator=generator), labels(d.shots),
                   torch.rand(tasks, d.ways * d.queries, *shape, generator=generator), labels(d.queries),
                   d.ways, d.shots, d.queries)


def setting(args):
    """The algorithm (MAML from the experiment config) and a few episodes, real or random."""
    cfg = compose_setting(args.root, args.queries, args.meta_batch, args.cache_dir)
    torch.manual_seed(cfg.seed)
    real = not args.random_data and has_omniglot(args.root)
    if real:
        data = build(cfg.data)
        episodes = [data.sample("train", args.meta_batch, torch.Generator().manual_seed(i)) for i in range(3)]
    else:
        episodes = [random_episode(cfg, args.meta_batch, torch.Generator().manual_seed(i)) for i in range(3)]
    torch.manual_seed(cfg.seed)
    algo = build(cfg.algo, model=build(cfg.model), problem="classification")
    return cfg, algo, episodes, "Omniglot episodes" if real else "random tensors of Omniglot's shape"


def params_of(algo):
    return [p for p in algo.parameters() if p.requires_grad]


# -- the reference and metarun's paths ----------------------------------------------------------
def textbook_task_loss(model, params, sx, sy, qx, qy, inner_lr, steps):
    """One task, second order: adapt with autograd.grad(create_graph=True), query loss of the adapted net."""
    fast = params
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, fast, (sx,)), sy)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {k: p - inner_lr * g for (k, p), g in zip(fast.items(), grads)}
    return F.cross_entropy(functional_call(model, fast, (qx,)), qy)


def reference(algo, episodes, to_input=lambda x: x):
    model = algo.model

    def run(i):
        ep = episodes[i]
        for p in params_of(algo):
            p.grad = None
        params = dict(model.named_parameters())
        for t in range(ep.num_tasks):
            loss = textbook_task_loss(model, params, to_input(ep.support_x[t]), ep.support_y[t],
                                      to_input(ep.query_x[t]), ep.query_y[t], algo.inner_lr, algo.inner_steps)
            (loss / ep.num_tasks).backward()
        return [p.grad for p in params_of(algo)]

    return run


def metarun_path(algo, episodes, batching, chunk=None):
    """metarun's ``meta_loss`` on one path; with ``chunk``, C tasks at a time with the meta-gradient accumulated."""
    algo = copy.copy(algo)  # shares the network and its parameters; only the batching differs
    algo.batching = batching

    def run(i):
        ep = episodes[i]
        for p in params_of(algo):
            p.grad = None
        size = chunk or ep.num_tasks
        for a in range(0, ep.num_tasks, size):
            part = ep.tasks(a, min(a + size, ep.num_tasks))
            loss, _ = algo.meta_loss(part)
            (loss * (part.num_tasks / ep.num_tasks)).backward()
        return [p.grad for p in params_of(algo)]

    return run


def channels_last(algo, episodes, batching=None):
    """The reference (``batching=None``) or a metarun path on a channels-last copy of the network and images."""
    clone = copy.deepcopy(algo)
    clone.model.to(memory_format=torch.channels_last)
    to_cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    if batching is None:
        return reference(clone, episodes, to_cl)
    cl_episodes = [Episode(to_cl(e.support_x.flatten(0, 1)).unflatten(0, e.support_x.shape[:2]), e.support_y,
                           to_cl(e.query_x.flatten(0, 1)).unflatten(0, e.query_x.shape[:2]), e.query_y,
                           e.ways, e.shots, e.queries) for e in episodes]
    return metarun_path(clone, cl_episodes, batching)


# -- concurrency over the cores -----------------------------------------------------------------
def half_meta_grad(algo, ep, a, b, total):
    """The meta-gradient share of tasks a:b (metarun's loop path), scaled as in the mean over ``total`` tasks."""
    loss, _ = algo.meta_loss(ep.tasks(a, b))
    return torch.autograd.grad(loss * ((b - a) / total), params_of(algo))


def metarun_threads(algo, episodes):
    """metarun's ``threads`` path as a training run takes it (``metarun.execution.meta_gradient``)."""
    pool = task_threads.TaskThreads()

    def run(i):
        for p in params_of(algo):
            p.grad = None
        execution.meta_gradient(algo, episodes[i], 0, threads=pool)
        return [p.grad for p in params_of(algo)]

    run.close = pool.close
    return run


def elementary_batch_norm(run):
    """``run`` with BatchStatNorm in its elementary-op form everywhere (the network as it was before the fused kernel)."""
    def elementary(i):
        fused, BatchStatNorm.forward = BatchStatNorm.forward, BatchStatNorm.elementary
        try:
            return run(i)
        finally:
            BatchStatNorm.forward = fused

    return elementary


def _process_worker(algo, episodes, jobs, results):
    torch.set_num_threads(1)
    while (job := jobs.get()) is not None:
        i, a, b = job
        results.put([g.clone() for g in half_meta_grad(algo, episodes[i], a, b, episodes[i].num_tasks)])


def process_workers(algo, episodes, workers=2):
    """Spawned processes that share the parameters and the episodes (shared memory); jobs are index ranges."""
    algo = copy.copy(algo)
    algo.batching = "loop"
    algo.share_memory()
    for e in episodes:
        for t in (e.support_x, e.support_y, e.query_x, e.query_y):
            t.share_memory_()
    ctx = mp.get_context("spawn")
    queues = [(ctx.Queue(), ctx.Queue()) for _ in range(workers)]
    procs = [ctx.Process(target=_process_worker, args=(algo, episodes, jq, rq), daemon=True) for jq, rq in queues]
    for p in procs:
        p.start()

    def run(i):
        n = episodes[i].num_tasks
        for w, (jq, _) in enumerate(queues):
            jq.put((i, n * w // workers, n * (w + 1) // workers))
        parts = [rq.get(timeout=600) for _, rq in queues]
        return [sum(gs) for gs in zip(*parts)]

    def close():
        for jq, _ in queues:
            jq.put(None)
        for p in procs:
            p.join(timeout=10)

    run.close = close
    return run


# -- torch.func ----------------------------------------------------------------------------------
def func_task_loss(model, inner_lr, steps):
    """Per-task second-order meta-loss written with torch.func only (self-contained, no metarun hooks)."""
    def task_loss(params, sx, sy, qx, qy):
        support_loss = lambda p: F.cross_entropy(functional_call(model, p, (sx,)), sy)  # noqa: E731
        fast = params
        for _ in range(steps):
            g = grad(support_loss)(fast)
            fast = {k: p - inner_lr * g[k] for k, p in fast.items()}
        return F.cross_entropy(functional_call(model, fast, (qx,)), qy)

    return task_loss


def func_grad_loop(algo, episodes, task_grad=None):
    """Per-task meta-gradients from ``torch.func.grad`` (or a compiled ``task_grad``), summed over tasks."""
    task_grad = task_grad or grad(func_task_loss(algo.model, algo.inner_lr, algo.inner_steps))
    names = [k for k, p in algo.model.named_parameters() if p.requires_grad]

    def run(i):
        ep = episodes[i]
        params = {k: p.detach() for k, p in algo.model.named_parameters()}
        total = None
        for t in range(ep.num_tasks):
            g = task_grad(params, ep.support_x[t], ep.support_y[t], ep.query_x[t], ep.query_y[t])
            total = g if total is None else {k: total[k] + g[k] for k in names}
        return [total[k] / ep.num_tasks for k in names]

    return run


def functional_loop(algo, episodes):
    """metarun's per-task function with ``functional=True`` (torch.func inside) in a Python loop, one backward."""
    def run(i):
        ep = episodes[i]
        for p in params_of(algo):
            p.grad = None
        params = dict(algo.model.named_parameters())
        losses = [algo._task_meta_loss(params, *task, None, False, functional=True)[0]
                  for task in zip(ep.support_x, ep.support_y, ep.query_x, ep.query_y)]
        torch.stack(losses).mean().backward()
        return [p.grad for p in params_of(algo)]

    return run


def compiled(algo, episodes):
    """``torch.compile`` of the per-task torch.func meta-gradient: (run, compile seconds) or (None, error)."""
    task_grad = torch.compile(grad(func_task_loss(algo.model, algo.inner_lr, algo.inner_steps)), dynamic=False)
    run = func_grad_loop(algo, episodes, task_grad)
    tic = time.perf_counter()
    try:
        run(0)
    except Exception as e:  # noqa: BLE001 - a failure to compile is a result to report
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return run, time.perf_counter() - tic


def compile_in_child(args, timeout):
    """The torch.compile candidate in a fresh process with a time limit (inductor on CPU can compile for many
    minutes, and a compile cannot be interrupted in-process): a dict of its figures, or of why there are none.
    The child times the compiled loop against its own reference in interleaved rounds."""
    command = [sys.executable, __file__, "--compile-child", "--rounds", str(args.rounds), "--meta-batch",
               str(args.meta_batch), "--queries", str(args.queries), "--root", str(args.root)]
    command += ["--threads", str(args.threads)] + (["--random-data"] if args.random_data else [])
    command += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    tic = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not compiled within {timeout} s (--compile-timeout)"}
    if done.returncode:
        return {"error": f"child failed after {time.perf_counter() - tic:.0f} s: "
                         f"{(done.stderr.strip().splitlines() or ['?'])[-1][:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_child(args):
    torch.set_num_threads(args.threads)
    _, algo, episodes, _ = setting(args)
    ref_run = reference(algo, episodes)
    ref = [g.clone() for g in ref_run(0)]
    run, result = compiled(algo, episodes)
    if run is None:
        print(json.dumps({"error": result}))
        return
    check = same_gradient([g.clone() for g in run(0)], ref)
    seconds = time_rounds({"reference": (ref_run, torch.get_num_threads(), ""),
                           "compiled": (run, torch.get_num_threads(), "")}, episodes, args.rounds)
    print(json.dumps({"compile_s": result, "ms": 1000 * seconds["compiled"], "ref_ms": 1000 * seconds["reference"],
                      "allclose": check[0], "diff": check[1]}))


# -- timing ---------------------------------------------------------------------------------------
def variants(algo, episodes, args, threads):
    """name -> (run, intra-op threads of the calling thread, note)."""
    other = 2 if threads == 1 else 1
    at_other = f"@{other} thread{'s' if other > 1 else ''}"
    out = {
        "reference": (reference(algo, episodes), threads, "textbook per-task loop"),
        f"reference {at_other}": (reference(algo, episodes), other, ""),
        "reference, elementary batch norm": (elementary_batch_norm(reference(algo, episodes)), threads,
                                             "the network's batch norm as before the fused kernel"),
        "metarun loop": (metarun_path(algo, episodes, "loop"), threads, ""),
        f"metarun loop {at_other}": (metarun_path(algo, episodes, "loop"), other, ""),
        "metarun vmap": (metarun_path(algo, episodes, "vmap"), threads, ""),
        f"metarun vmap {at_other}": (metarun_path(algo, episodes, "vmap"), other, ""),
    }
    for c in args.chunks:
        if c < args.meta_batch:
            out[f"vmap chunks of {c}"] = (metarun_path(algo, episodes, "vmap", chunk=c), threads, "")
    out["channels_last reference"] = (channels_last(algo, episodes), threads, "")
    out["channels_last metarun loop"] = (channels_last(algo, episodes, "loop"), threads, "")
    out["metarun threads"] = (metarun_threads(algo, episodes), threads,
                              f"{task_threads.workers_for(torch.device('cpu'), args.meta_batch)} workers x 1 intra-op thread")
    if "processes" not in args.skip:
        out["2 processes x 1 intra-op"] = (process_workers(algo, episodes), threads, "metarun loop per half, spawn")
    out["torch.func loop (functional=True)"] = (functional_loop(algo, episodes), threads, "outer backward")
    out["torch.func grad loop"] = (func_grad_loop(algo, episodes), threads, "no outer autograd")
    return out


def same_gradient(grads, ref):
    """(allclose to the reference within TOLERANCE, largest |difference| / largest |reference| over all tensors:
    the conv biases before batch norm have meta-gradients near 0, so a per-tensor ratio would be noise)."""
    ok = all(torch.allclose(g.float(), r, **TOLERANCE) for g, r in zip(grads, ref))
    scale = max(r.abs().max().item() for r in ref)
    return ok, max((g.float() - r).abs().max().item() for g, r in zip(grads, ref)) / scale


def time_rounds(table, episodes, rounds, progress=False):
    names = [n for n, (run, _, _) in table.items() if run is not None]
    times = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0 warms up
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            run, threads, _ = table[n]
            torch.set_num_threads(threads)
            tic = time.perf_counter()
            run(r % len(episodes))
            if r:
                times[n].append(time.perf_counter() - tic)
        if progress:
            print(f"round {r}{' (warm-up)' if not r else ''} done, load {os.getloadavg()[0]:.2f}", flush=True)
    return {n: statistics.median(t) for n, t in times.items()}


def main():
    parser = benchmark_parser(__doc__)
    parser.set_defaults(device="cpu")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--chunks", default="4,8,16", help="comma-separated task chunk sizes for chunked vmap")
    parser.add_argument("--skip", default="", help="comma-separated: compile, processes")
    parser.add_argument("--random-data", action="store_true", help="random tensors instead of Omniglot episodes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads of every variant but the '@N threads' ones (default: torch's)")
    parser.add_argument("--compile-timeout", type=int, default=300, help="seconds the torch.compile candidate may take")
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error("bench_paths.py measures CPU paths: --device cpu")
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    args.skip = set(args.skip.split(","))
    if args.compile_child:
        return compile_child(args)
    threads = args.threads
    torch.set_num_threads(threads)
    cfg, algo, episodes, source = setting(args)
    load_before = os.getloadavg()
    print(f"MAML second order, Omniglot {cfg.data.ways}-way {cfg.data.shots}-shot, {cfg.data.queries} queries, "
          f"meta-batch {args.meta_batch}, {algo.inner_steps} inner step(s) at lr {algo.inner_lr}, "
          f"Conv4 {cfg.model.variant} {cfg.model.hidden} filters; {source}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, intra-op threads {threads}, "
          f"inter-op threads {torch.get_num_interop_threads()} (unused by eager autograd); "
          f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    compile_figures = None
    if "compile" not in args.skip:  # first, alone: it loads the machine while it compiles
        compile_figures = compile_in_child(args, args.compile_timeout)
        print(f"torch.compile candidate: {compile_figures}", flush=True)
    table = variants(algo, episodes, args, threads)
    torch.set_num_threads(threads)
    ref = [g.clone() for g in table["reference"][0](0)]
    checks = {}
    for name, (run, t, _) in table.items():
        if run is not None:
            torch.set_num_threads(t)
            checks[name] = same_gradient([g.clone() for g in run(0)], ref)
    seconds = time_rounds(table, episodes, args.rounds, progress=True)
    load_after = os.getloadavg()
    for run, _, _ in table.values():
        if run is not None and hasattr(run, "close"):
            run.close()

    print(f"{'variant':38} {'ms/iter':>8} {'vs ref':>7}  {'allclose':>9} {'diff/scale':>12}  note")
    print(f"(allclose: rtol {TOLERANCE['rtol']:g}, atol {TOLERANCE['atol']:g} per tensor; diff/scale: largest "
          "|difference| over the largest |reference| meta-gradient entry)")
    base = seconds["reference"]
    for name, (run, t, note) in table.items():
        if run is None:
            print(f"{name:38} {'-':>8} {'-':>7}  {'-':>9} {'-':>12}  {note}")
            continue
        ok, rel = checks[name]
        print(f"{name:38} {1000 * seconds[name]:8.0f} {base / seconds[name]:6.2f}x  {'yes' if ok else 'NO':>9} "
              f"{rel:12.1e}  {note}")
    if compile_figures is not None:
        name, c = "torch.compile(func grad) loop", compile_figures
        if "error" in c:
            print(f"{name:38} {'-':>8} {'-':>7}  {'-':>9} {'-':>12}  FAILED: {c['error']}")
        else:
            print(f"{name:38} {c['ms']:8.0f} {c['ref_ms'] / c['ms']:6.2f}x  {'yes' if c['allclose'] else 'NO':>9} "
                  f"{c['diff']:12.1e}  compile {c['compile_s']:.0f} s; in its own process, vs its own reference "
                  f"{c['ref_ms']:.0f} ms")
    best = max((n for n in seconds if checks[n][1] < 1e-3), key=lambda n: base / seconds[n])
    print(f"fastest within 1e-3 of the reference's meta-gradient scale: {best} ({base / seconds[best]:.2f}x); "
          f"medians of {args.rounds} interleaved rounds; load average after "
          f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")


if __name__ == "__main__":
    main()
