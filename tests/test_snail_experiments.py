"""conf/experiment/snail_*: the paper's architecture at every setting, and the protocol each file states.

Composes the real configs and builds the real network (no data read): fast. test_experiments.py runs
them on data and ties them to docs/protocols.md's published numbers."""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from metarun.algos.snail import DenseBlock, dilations
from metarun.config import conf_dir
from metarun.utils.runtime import build
from support import compose_config, group_options

SNAIL_EXPERIMENTS = [name for name in group_options("experiment") if name.startswith("snail_")]


def test_every_published_setting_has_its_config():
    # Mishra et al. 2018's tables: Omniglot 5/20-way 1/5-shot, miniImageNet 5-way 1/5-shot.
    assert SNAIL_EXPERIMENTS == ["snail_miniimagenet_5w1s", "snail_miniimagenet_5w5s", "snail_omniglot_20w1s",
                                 "snail_omniglot_20w5s", "snail_omniglot_5w1s", "snail_omniglot_5w5s"]


@pytest.mark.parametrize("name", SNAIL_EXPERIMENTS)
def test_snail_experiment_builds_the_papers_network_for_its_setting(name):
    cfg = compose_config([f"experiment={name}"])
    ways, shots = (int(v) for v in re.search(r"_(\d+)w(\d+)s$", name).groups())
    omniglot = "_omniglot_" in name
    expected = {"data.ways": ways, "data.shots": shots, "data.train_ways": None, "data.train_shots": None,
                "data.train_queries": 1,  # each training sequence ends in one query, as the paper's
                "data.queries": 5 if omniglot else 15, "test.episodes": 1000 if omniglot else 600,
                "algo.attention_keys": [64, 256, 512], "algo.attention_values": [32, 128, 256],
                "algo.tc_filters": [128, 128], "algo.transductive": False,
                "train.meta_batch_size": 8 if not omniglot else 32 if ways == 5 else 16}
    assert {k: OmegaConf.select(cfg, k) for k in expected} == expected
    model = build(cfg.model)
    # Omniglot: Vinyals et al.'s 64-d Conv4 with max-pooling; miniImageNet: the ResNet-12 (the deviation).
    assert (type(model).__name__, model.out_dim) == (("Conv4", 64) if omniglot else ("ResNet12", 640))
    algo = build(cfg.algo, model=model, problem="classification")
    length = ways * shots + 1  # T = N*K + 1
    assert algo.net.length == length and algo.net.out.out_channels == ways
    # Two TC blocks of dilations 2, 4, ..., 2^ceil(log2 T), each dense block adding 128 channels.
    blocks = [b for b in algo.net.blocks if isinstance(b, DenseBlock)]
    assert [b.dilation for b in blocks] == 2 * dilations(length) and max(dilations(length)) >= length
    assert algo.net.out.in_channels == model.out_dim + ways + 32 + 128 + 256 + 2 * 128 * len(dilations(length))


@pytest.mark.parametrize("name", SNAIL_EXPERIMENTS)
def test_snail_experiment_states_its_protocol_and_deviations(name):
    header = Path(conf_dir(), "experiment", f"{name}.yaml").read_text(encoding="utf-8").split("\ndefaults:")[0]
    assert "(Mishra et al. 2018)" in header and "# Protocol:" in header
    assert f"# Run: metarun train experiment={name}\n" in header + "\n"
    assert "Deviation: the paper does not state its optimiser settings" in header  # our training choices, said
    if "miniimagenet" in name:
        assert "384-d" in header and "ResNet-12" in header  # the embedding is not the paper's
