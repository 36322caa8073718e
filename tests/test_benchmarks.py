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
    assert re.search(r"reference \d+ ms +loop \d+ ms +vmap \d+ ms +threads \d+ ms +auto \d+ ms +\(auto took (loop|vmap)\)",
                     line), line  # Reptile's training cannot take threads


def test_bench_maml_compares_with_the_per_task_loop_and_the_sampler_with_pil(shared_data_root, omniglot_cache_dir):
    out = bench("bench_maml.py", root=shared_data_root, cache=omniglot_cache_dir)
    for label in ("reference", "loop", "vmap", "auto (= ", "speed vs PIL"):
        assert label in out


def test_bench_data_compares_both_residencies_with_a_jpeg_pipeline_and_reports_tiered_memory(tmp_path):
    # Generated data only (no archives): the small size, one round.
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_data.py"), "--size", "small",
                             "--rounds", "1", "--batches", "2", "--tiered-batches", "5", "--workers", "1",
                             "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ("device store", "memmap store"):
        assert re.search(rf"{label} +\d+ episodes/s +[\d.]+x the JPEG pipeline", out), out
    assert re.search(r"JPEG folder \+ DataLoader +\d+ episodes/s", out), out
    peak = re.search(r"peak host memory ([\d.]+) GB", out)
    assert peak and 0 < float(peak.group(1)) < 2, out
