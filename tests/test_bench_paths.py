"""benchmarks/bench_paths.py: every candidate execution path computes MAML's meta-gradient, and the script reports them all.

Speed is measured by the benchmark itself, never asserted here. Both tests use random tensors of
Omniglot's shape, so they need no archives.
"""

import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_paths  # noqa: E402

# At one intra-op thread (--threads 1), with the same at two threads alongside.
CANDIDATES = ["reference", "reference @2 threads", "reference, elementary batch norm", "metarun loop",
              "metarun loop @2 threads", "metarun vmap", "metarun vmap @2 threads", "vmap chunks of 2",
              "channels_last reference", "channels_last metarun loop", "metarun threads",
              "torch.func loop (functional=True)", "torch.func grad loop"]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_candidate_gives_the_reference_meta_gradient_in_float64(tmp_path, restore_threads):
    # Three tasks: the two worker threads get unequal halves and the chunks of 2 a remainder of 1.
    args = Namespace(root=str(tmp_path), queries=2, meta_batch=3, cache_dir=None, random_data=True, chunks=[2],
                     skip={"compile", "processes"})
    _, algo, episodes, source = bench_paths.setting(args)
    assert source.startswith("random tensors")
    algo.double()
    episodes = [e.to(dtype=torch.float64) for e in episodes]
    # One intra-op thread as the base: on a loaded 2-core machine OpenMP's two threads spin and take seconds.
    table = bench_paths.variants(algo, episodes, args, threads=1)
    assert list(table) == CANDIDATES
    torch.set_num_threads(1)
    ref = [g.clone() for g in table["reference"][0](1)]
    assert all(r.dtype == torch.float64 for r in ref) and max(r.abs().max() for r in ref) > 1e-3
    for name, (run, threads, _) in table.items():
        if threads != 1:
            continue  # the same functions as their one-thread twins (and seconds each on a loaded 2-core machine)
        grads = [g.clone() for g in run(1)]
        assert len(grads) == len(ref), name
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)
    table["metarun threads"][0].close()


def test_bench_paths_reports_every_candidate_with_its_speed_and_gradient_check(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_paths.py"), "--rounds", "1",
                             "--meta-batch", "2", "--queries", "2", "--chunks", "1", "--random-data",
                             "--skip", "compile", "--threads", "1", "--root", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"load average before [\d.]+ [\d.]+ [\d.]+", out), out
    for name in [c.replace("chunks of 2", "chunks of 1") for c in CANDIDATES] + ["2 processes x 1 intra-op"]:
        line = re.search(rf"^{re.escape(name)} +(\d+) +([\d.]+)x +(yes|NO) +([\d.e+-]+)", out, re.M)
        assert line, f"{name} missing:\n{out}"
        assert float(line.group(4)) < 1e-3, line.group(0)  # float32: the same meta-gradient to rounding
    assert re.search(r"^reference +\d+ +1\.00x +yes +0\.0e\+00", out, re.M), out
    assert "fastest within 1e-3" in out


def test_bench_memory_reports_the_peak_of_a_step_and_chunks_lower_it(tmp_path):
    # Every task's graph lives until the loop's one backward pass; one task's at a time with a backward per task.
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_memory.py"), "--settings",
                             "omniglot-q15", "--paths", "loop,per-task backward"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    peaks = dict(re.findall(r"^omniglot-q15 +32 +(loop|per-task backward) +\d+ +(\d+)$", result.stdout, re.M))
    assert set(peaks) == {"loop", "per-task backward"}, result.stdout
    assert 0 < int(peaks["per-task backward"]) < int(peaks["loop"]) / 4, result.stdout
