"""Tier 1: every config option composes and builds; bad values are rejected at composition."""

import pytest
import torch
from hydra.errors import ConfigCompositionException

from metarun.algos.maml import MAML
from metarun.experiment import build_experiment
from support import TINY_OMNIGLOT, compose_config, omniglot_location

PAIRS = [("omniglot", "conv4"), ("sinusoid", "mlp")]


@pytest.mark.parametrize("data,model", PAIRS)
@pytest.mark.parametrize("algo", ["maml", "fomaml"])
@pytest.mark.parametrize("device", ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_every_option_composes_and_builds(data, model, algo, device, shared_data_root, omniglot_cache_dir):
    overrides = [f"data={data}", f"model={model}", f"algo={algo}", f"device={device}"]
    if data == "omniglot":
        overrides += omniglot_location(shared_data_root, omniglot_cache_dir)
    cfg = compose_config(overrides)
    dev, source, built = build_experiment(cfg)
    assert isinstance(built, MAML) and built.first_order == (algo == "fomaml")
    assert dev.type == ("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    episode = source.sample("train", 2, torch.Generator().manual_seed(0))
    out = built.model(episode.support_x[0])
    assert out.shape[-1] == (cfg.data.ways if data == "omniglot" else 1)


def test_user_contract_keys_exist():
    cfg = compose_config()
    for key in ["data.ways", "data.shots", "data.queries", "data.root", "data.split", "algo.inner_lr",
                "algo.inner_steps", "algo.eval_inner_steps", "algo.first_order", "algo.batching",
                "train.meta_batch_size", "train.iterations", "train.meta_lr", "train.val_every",
                "train.val_episodes", "test.episodes", "seed"]:
        node, *path = key.split(".")
        value = cfg[node]
        for part in path:
            value = value[part]
        assert value is not None, key
    assert cfg.test.episodes == 600 and cfg.algo.batching == "auto"


def test_data_root_defaults_to_env_then_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("METARUN_DATA_DIR", str(tmp_path))
    assert compose_config().data.root == str(tmp_path)
    monkeypatch.delenv("METARUN_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert compose_config().data.root == str(tmp_path / "cache" / "metarun" / "data")


@pytest.mark.parametrize("override", ["data.shots=abc", "algo.inner_lr=fast", "data.shot=1", "train.iteration=5"])
def test_wrong_type_or_unknown_key_is_rejected(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def test_fomaml_only_changes_first_order():
    maml, fomaml = compose_config(["algo=maml"]), compose_config(["algo=fomaml"])
    assert fomaml.algo.first_order and not maml.algo.first_order
    fomaml.algo.first_order = False
    assert fomaml == maml


def test_maxpool_variant_builds_from_config(shared_data_root, omniglot_cache_dir):
    cfg = compose_config(["model.variant=maxpool"] + omniglot_location(shared_data_root, omniglot_cache_dir))
    _, source, algo = build_experiment(cfg)
    episode = source.sample("train", 1, torch.Generator().manual_seed(0))
    assert algo.model(episode.support_x[0]).shape == (5, 5) and algo.model.head.in_features == 64


def test_tiny_settings_compose(shared_data_root, omniglot_cache_dir):
    cfg = compose_config(TINY_OMNIGLOT + omniglot_location(shared_data_root, omniglot_cache_dir))
    assert cfg.model.out_features == 3  # interpolated from data.ways
