"""Helpers shared by the test modules: compose the real configs, tiny settings, file readers."""

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from metarun.config import conf_dir

TINY_OMNIGLOT = [
    "data.ways=3", "model.hidden=8", "train.meta_batch_size=2", "train.iterations=4", "train.val_every=2",
    "train.val_episodes=4", "test.episodes=6", "algo.eval_inner_steps=2",
]
TINY_SINUSOID = [
    "data=sinusoid", "model=mlp", "algo.inner_lr=0.01", "train.meta_batch_size=4", "train.iterations=6",
    "train.val_every=3", "train.val_episodes=8", "test.episodes=10", "algo.eval_inner_steps=3",
]


def compose_config(overrides=(), name="train"):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name=name):
        return compose(config_name=name, overrides=list(overrides))


def omniglot_location(root: Path, cache: Path) -> list[str]:
    return [f"data.root={root}", f"data.cache_dir={cache}", "data.download=false"]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())
