"""Tier 1: every config option composes and builds; bad values are rejected at composition."""

import inspect
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf

from metarun.algos.maml import MAML
from metarun.algos.mamlpp import MAMLpp
from metarun.config import PASSED_BY_TRAINER, TARGETS, TORCH_KEYS, conf_dir
from metarun.experiment import build_experiment
from support import TINY_OMNIGLOT, compose_config, group_options, omniglot_location

PAIRS = [("omniglot", "conv4"), ("sinusoid", "mlp")]


@pytest.mark.parametrize("data,model", PAIRS)
@pytest.mark.parametrize("algo", ["maml", "fomaml"])
@pytest.mark.parametrize("device", [d for d in group_options("device") if d != "cuda" or torch.cuda.is_available()])
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


@pytest.mark.parametrize("group,option", [(g, o) for g in ("algo", "data", "model", "optimizer", "scheduler", "device")
                                          for o in group_options(g)])
def test_every_group_option_composes(group, option):
    # Every file in conf/<group>/, present and future: a new option is composed against its schema here.
    from omegaconf import OmegaConf

    from metarun.config import conf_dir

    own = OmegaConf.to_container(OmegaConf.load(f"{conf_dir()}/{group}/{option}.yaml"))
    composed = OmegaConf.to_container(compose_config([f"{group}={option}"])[group])
    assert composed and all(composed[key] == value for key, value in own.items() if key != "defaults")


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


@pytest.mark.parametrize("override", ["data.shots=abc", "algo.inner_lr=fast", "data.shot=1", "train.iteration=5",
                                      "optimizer.lr=abc", "model.out_features=abc", "data.train_ways=abc",
                                      "model.hiden=8", "optimizer.foreach=true"])
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


OPTIONS = [(group, name) for group, options in TARGETS.items() for name in options]


def constructor_default(cls, key):
    """The default of ``key`` in the first ``__init__`` along the class's MRO that takes it."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and key in inspect.signature(klass.__init__).parameters:
            return inspect.signature(klass.__init__).parameters[key].default
    raise AssertionError(f"{cls.__name__} takes no argument {key!r}")


@pytest.mark.parametrize("group,name", OPTIONS)
def test_each_default_is_stated_once_in_the_constructor(group, name):
    """A group option's keys are its class's arguments; the YAML values only those that differ from the
    constructor's default, and every other key composes to that default."""
    cls = get_class(TARGETS[group][name])
    stated = OmegaConf.to_container(OmegaConf.load(Path(conf_dir(), group, f"{name}.yaml")))
    stated.pop("defaults")
    extra = {"mlp": ["data=sinusoid"], "sinusoid": ["model=mlp"]}.get(name, [])
    node = OmegaConf.to_container(compose_config([f"{group}={name}", *extra])[group], resolve=False)
    keys = set(node) - {"_target_", "_partial_"}
    if group in ("optimizer", "scheduler"):
        assert keys == set(TORCH_KEYS[name])
    else:
        own = inspect.signature(cls.__init__).parameters.values()
        assert {p.name for p in own if p.kind is p.POSITIONAL_OR_KEYWORD} - {"self", *PASSED_BY_TRAINER} <= keys
    for key in keys:
        default = constructor_default(cls, key)
        default = list(default) if isinstance(default, tuple) else default
        if key in stated:
            assert stated[key] != default, f"conf/{group}/{name}.yaml restates {key}'s default"
        else:
            assert default is not inspect.Parameter.empty and node[key] == default, key


def test_an_algorithm_default_is_its_constructor_default():
    """MAML++ states its own inner_lr in its signature; MAML's is the engine's: no YAML repeats them."""
    assert compose_config(["algo=mamlpp"]).algo.inner_lr == inspect.signature(MAMLpp).parameters["inner_lr"].default
    assert compose_config(["algo=maml"]).algo.inner_lr == inspect.signature(MAML).parameters["inner_lr"].default
    assert "inner_lr" not in compose_config(["algo=metasgd"]).algo  # Meta-SGD learns its rates
