"""benchmarks/bench_snail.py, the README's SNAIL-vs-ProtoNets speed figures, still runs and reports both
comparisons. A smoke test (one round, two tasks in the same-episode setting): the speed itself is
measured by the benchmark, never asserted."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RATE = r"([\d.]+) it/s"


def test_bench_snail_reports_both_settings_and_the_ratio_of_what_it_timed(shared_data_root, omniglot_cache_dir):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_snail.py"), "--rounds", "1",
                             "--meta-batch", "2", "--queries", "2", "--root", str(shared_data_root),
                             "--cache-dir", str(omniglot_cache_dir)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if ":" in line}
    paper, same = lines["paper protocol"], lines["same episodes"]
    # Each paper protocol is its own experiment config's training episodes.
    assert "snail_omniglot_5w1s: 32 x 5-way 1-shot, 1 query/class" in paper, paper
    assert "protonet_omniglot_5w1s: 1 x 60-way 1-shot, 5 queries/class" in paper, paper
    # The same-episode comparison takes the command line's meta-batch and queries, once for both.
    assert "Omniglot 2 x 5-way 1-shot, 2 queries/class, conv4_embedding" in same, same
    for line in (paper, same):
        snail, proto = (float(v) for v in re.search(rf"snail {RATE} .*protonet {RATE}", line).groups())
        ratio = float(re.search(r"snail/protonet ([\d.]+)x", line).group(1))
        assert snail > 0 and proto > 0
        # The ratio of the rates it printed (4 significant digits each, the ratio to 3 decimals).
        assert abs(ratio - snail / proto) <= 0.002 * ratio + 0.0006, line
        assert re.search(r"path (loop|vmap|threads)\).*path (loop|vmap|threads)\)", line), line
