"""Peak memory of one second-order MAML meta-iteration, per setting and execution path (issue 15, point 3).

Settings (``../shared/PROTOCOLS.md``), random tensors of the data's shape (memory does not depend on
the pixel values):

- ``omniglot``: 5-way 1-shot, 1 query per class (MAML's protocol), meta-batch 32, strided Conv4 with
  64 filters on 28x28x1, inner lr 0.4, 1 step; ``omniglot-q15``: the same with 15 queries per class;
- ``mini``: miniImageNet-sized 5-way 1-shot, 15 queries per class, meta-batch 4, max-pool Conv4 with
  32 filters on 84x84x3, inner lr 0.01, 5 steps.

Paths: metarun's ``loop`` and ``vmap`` (every task's graph alive until the one backward pass), the
per-task reference (one backward per task: a chunk of 1 task), and vmap over chunks of tasks with the
meta-gradient accumulated (what ``train.task_chunk`` would run).

Each measurement runs in a fresh child process. On CPU it is host memory: the peak resident set
(VmHWM) is reset just before the step (``/proc/self/clear_refs``), and the increase of the peak over
the resident set before the step is reported. On CUDA it is ``torch.cuda.max_memory_allocated`` over
what was allocated before the step.

    python benchmarks/bench_memory.py [--device cpu|cuda] [--settings omniglot,omniglot-q15,mini]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_paths import metarun_path, reference  # noqa: E402
from metarun.algos.maml import MAML  # noqa: E402
from metarun.data.episode import Episode  # noqa: E402
from metarun.models import Conv4  # noqa: E402

SETTINGS = {  # ways, shots, queries, meta-batch, channels, image size, filters, variant, inner lr, steps
    "omniglot": dict(ways=5, shots=1, queries=1, tasks=32, channels=1, size=28, hidden=64, variant="stride",
                     inner_lr=0.4, steps=1),
    "omniglot-q15": dict(ways=5, shots=1, queries=15, tasks=32, channels=1, size=28, hidden=64, variant="stride",
                         inner_lr=0.4, steps=1),
    "mini": dict(ways=5, shots=1, queries=15, tasks=4, channels=3, size=84, hidden=32, variant="maxpool",
                 inner_lr=0.01, steps=5),
}
PATHS = ("loop", "vmap", "per-task backward", "vmap chunks of 8", "vmap chunks of 2")


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure(name: str, path: str, device: str) -> dict:
    """In this (fresh) process: peak memory of one meta-iteration of ``name`` on ``path``, in MB."""
    s = SETTINGS[name]
    torch.manual_seed(0)
    model = Conv4(s["ways"], in_channels=s["channels"], hidden=s["hidden"], variant=s["variant"], image_size=s["size"])
    algo = MAML(model, "classification", inner_lr=s["inner_lr"], inner_steps=s["steps"], batching="loop").to(device)
    shape = (s["tasks"], s["channels"], s["size"], s["size"])
    labels = lambda n: torch.arange(s["ways"]).repeat_interleave(n).expand(s["tasks"], -1).contiguous()  # noqa: E731
    episode = Episode(torch.rand(shape[0], s["ways"] * s["shots"], *shape[1:]), labels(s["shots"]),
                      torch.rand(shape[0], s["ways"] * s["queries"], *shape[1:]), labels(s["queries"]),
                      s["ways"], s["shots"], s["queries"]).to(device)
    for p in algo.parameters():  # the .grad buffers exist before the step, as in training after iteration 0
        p.grad = torch.zeros_like(p)
    if path == "per-task backward":
        run = reference(algo, [episode])
    elif path.startswith("vmap chunks of "):
        run = metarun_path(algo, [episode], "vmap", chunk=int(path.rsplit(" ", 1)[1]))
    else:
        run = metarun_path(algo, [episode], path)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(0)
        torch.cuda.synchronize()
        return {"before_mb": before / 2**20, "peak_increase_mb": (torch.cuda.max_memory_allocated() - before) / 2**20}
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kb("VmRSS")
    run(0)
    return {"before_mb": before / 1024, "peak_increase_mb": (status_kb("VmHWM") - before) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.device)))
        return
    what = "CUDA max allocated" if args.device == "cuda" else "host peak RSS (VmHWM)"
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"Peak memory of one second-order MAML meta-iteration ({what} over the level before the step, MB), "
          f"{name}, torch {torch.__version__}; one fresh process per figure")
    print(f"{'setting':14} {'tasks':>5} {'path':20} {'before MB':>10} {'step peak +MB':>14}")
    for setting in args.settings.split(","):
        for path in args.paths.split(","):
            done = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", setting, path],
                                  capture_output=True, text=True)
            if done.returncode:
                tail = (done.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{setting:14} {SETTINGS[setting]['tasks']:5} {path:20} {'-':>10} {'FAILED':>14}  {tail[:100]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{setting:14} {SETTINGS[setting]['tasks']:5} {path:20} {r['before_mb']:10.0f} "
                  f"{r['peak_increase_mb']:14.0f}")


if __name__ == "__main__":
    main()
