"""What the benchmark scripts share: their command line."""

import argparse

from metarun.config import default_data_root


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """--device, --rounds, --root and --cache-dir, described by the first line of the script's ``doc``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
    parser.add_argument("--root", default=default_data_root(), help="data root with omniglot/*.zip")
    parser.add_argument("--cache-dir", default=None, help="decoded-data cache (default: data.cache_dir's)")
    return parser
