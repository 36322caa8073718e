"""The benchmarks the README's speed figures come from still run and report every variant.

Smoke tests only (one round, one cheap algorithm): speed is measured by the benchmarks themselves,
never asserted in a timed test.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def bench(script, *args, root, cache):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), "--rounds", "1", "--root", str(root),
                             "--cache-dir", str(cache), *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bench_algos_times_the_reference_both_paths_and_the_tuned_default(shared_data_root, omniglot_cache_dir):
    out = bench("bench_algos.py", "--algos", "reptile", root=shared_data_root, cache=omniglot_cache_dir)
    line = next(line for line in out.splitlines() if line.startswith("reptile:"))
    assert re.search(r"reference \d+ ms +loop \d+ ms +vmap \d+ ms +auto \d+ ms +\(auto took (loop|vmap)\)", line), line


def test_bench_maml_compares_with_the_per_task_loop_and_the_sampler_with_pil(shared_data_root, omniglot_cache_dir):
    out = bench("bench_maml.py", root=shared_data_root, cache=omniglot_cache_dir)
    for label in ("reference", "loop", "vmap", "auto (= ", "speed vs PIL"):
        assert label in out
