"""Tier 1 for conf/experiment/: every paper protocol composes, builds what it says, and is recorded."""

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metarun.config import conf_dir
from metarun.errors import MetarunError
from metarun.experiment import build_experiment
from metarun.train import train
from metarun.utils.runtime import build
from support import compose_config, group_options, omniglot_location, read_metrics

EXPERIMENTS = group_options("experiment")
IMAGE_DATA = ("miniimagenet", "tieredimagenet", "cifarfs")  # tests/conftest.py generates their files


def parse(name: str) -> tuple[str, str, str]:
    """An experiment's name, ``<algo option>[_<variant>]_<data option>_<setting>`` (maml_fc_omniglot_5w1s):
    its algo and data options, read against the groups' own options, and its setting (5w1s, k10)."""
    [data] = [d for d in group_options("data") if f"_{d}_" in name]  # exactly one data option
    prefix, setting = name.split(f"_{data}_")
    algo = max((a for a in group_options("algo") if prefix == a or prefix.startswith(f"{a}_")), key=len)
    return algo, data, setting


# docs/protocols.md's method names (its table rows, parentheses dropped) -> config name prefixes.
METHODS = {"MAML, Conv4": "maml", "MAML, fully connected": "maml_fc", "first-order MAML + transduction": "fomaml",
           "Reptile": "reptile", "Reptile + transduction": "reptile_transductive", "Meta-SGD": "metasgd",
           "MAML++": "mamlpp", "Prototypical Networks": "protonet", "Matching Networks": "matchingnet", "ANIL": "anil",
           "SNAIL": "snail", "SNAIL, its own ResNet": "snail",
           "MAML": "maml",  # the sinusoid table's column
           # miniImageNet, and the Conv4 baselines on tieredImageNet and CIFAR-FS
           "MAML, Conv4 with 32 filters": "maml", "first-order MAML": "fomaml",
           "ProtoNets, trained 30-way / 20-way": "protonet", "ProtoNets, trained 5-way": "protonet_train5w",
           "ProtoNets, Conv4 with 64 filters": "protonet",
           "Matching Networks with FCE, as re-run by Ravi & Larochelle": "matchingnet"}
DATA_SETS = {"miniImageNet": "miniimagenet", "tieredImageNet": "tieredimagenet", "CIFAR-FS": "cifarfs"}
COLUMNS = {"1-shot": "5w1s", "5-shot": "5w5s"}  # the 5-way tables' columns; Omniglot's are named 5w1s, 20w5s
PROTOCOLS = Path(__file__).resolve().parents[1] / "docs" / "protocols.md"  # in the repository: a clone has it


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_settings(table: str, data: str | None = None) -> list[str]:
    """``<method>_<data>_<setting>`` for every cell of ``table`` (a section of docs/protocols.md) holding a
    published number; the data set is ``data``, or the row's "data set" cell."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    names = []
    for row in rows[1:]:
        cells = dict(zip(rows[0], row))
        where = data or DATA_SETS[cells.pop("data set")]
        prefix = METHODS[re.sub(r"\s*\(.*?\)", "", cells.pop("method"))]  # a new method in the doc fails here
        names += [f"{prefix}_{where}_{COLUMNS.get(column, column)}" for column, cell in cells.items()
                  if re.search(r"\d", cell)]
    return names


def protocol_settings(text: str) -> dict[str, list[str]]:
    """The config names docs/protocols.md calls for, by section: every Omniglot, miniImageNet and Conv4
    baseline table cell with a published number, and MAML and Meta-SGD at every K of the sinusoid comparison."""
    sinusoid = section(text, "Sinusoid")
    columns = next(line for line in sinusoid.splitlines() if line.startswith("| K |")).strip().strip("|").split("|")[1:]
    return {
        "Omniglot": table_settings(section(text, "Omniglot"), "omniglot"),
        "Sinusoid": [f"{METHODS[c.strip()]}_sinusoid_k{k}" for c in columns
                     for k in sorted(set(re.findall(r"K=(\d+)", sinusoid)))],
        "miniImageNet": table_settings(section(text, "miniImageNet"), "miniimagenet"),
        "Conv4 baselines on tieredImageNet and CIFAR-FS": table_settings(
            section(text, "Conv4 baselines on tieredImageNet and CIFAR-FS")),
    }


def test_every_setting_of_protocols_md_has_a_config():
    by_section = protocol_settings(PROTOCOLS.read_text(encoding="utf-8"))
    # The parser found every table: 40 Omniglot cells, MAML and Meta-SGD at three K, 11 methods x 2
    # settings on miniImageNet, 2 methods x 2 settings x 2 data sets of Conv4 baselines.
    assert {title: len(names) for title, names in by_section.items()} == {
        "Omniglot": 40, "Sinusoid": 6, "miniImageNet": 22, "Conv4 baselines on tieredImageNet and CIFAR-FS": 8}
    wanted = [name for names in by_section.values() for name in names]
    assert len(set(wanted)) == len(wanted), "two cells of docs/protocols.md map to one config name"
    assert sorted(wanted) == EXPERIMENTS  # no config without its cell, no cell without its config


@pytest.mark.parametrize("name, expected", [
    ("protonet_train5w_miniimagenet_5w1s", ("protonet", "miniimagenet", "5w1s")),  # a variant, not an algo option
    ("reptile_transductive_omniglot_20w5s", ("reptile", "omniglot", "20w5s")),
    ("maml_fc_omniglot_5w1s", ("maml", "omniglot", "5w1s")),
    ("mamlpp_miniimagenet_5w5s", ("mamlpp", "miniimagenet", "5w5s")),  # an algo option, not maml's variant
    ("maml_tieredimagenet_5w1s", ("maml", "tieredimagenet", "5w1s")),
    ("metasgd_sinusoid_k20", ("metasgd", "sinusoid", "k20")),
])
def test_experiment_names_are_parsed_into_their_options(name, expected):
    assert parse(name) == expected


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_is_named_after_the_options_it_chooses(name):
    algo, data, _ = parse(name)
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name="train"):
        choices = compose(config_name="train", overrides=[f"experiment={name}"], return_hydra_config=True).hydra.runtime.choices
    assert (choices.algo, choices.data) == (algo, data)


def data_location(data: str, request: pytest.FixtureRequest) -> list[str]:
    """Where an experiment's data option finds its files: Omniglot needs the real archives (the test skips
    without them); the image datasets read small generated files in their real formats, so their
    experiments run in a fresh clone; the sinusoid needs no files."""
    if data == "omniglot":
        return omniglot_location(request.getfixturevalue("shared_data_root"), request.getfixturevalue("omniglot_cache_dir"))
    if data in IMAGE_DATA:
        return [f"data.root={request.getfixturevalue('image_data_root')}", "data.download=false"]
    return []


def tasks_per_batch(data: str) -> int:
    # Two tasks check the batching; one 84x84 task (or 32x32 with 15 queries a class) is cost enough.
    return 1 if data in IMAGE_DATA else 2


def narrow(name: str) -> list[str]:
    """A ResNet-12 of 8 channels a block: the same network at 84x84 costs minutes on a CPU, and its width is
    not what these tests check. SNAIL embeds the whole support set again with every query (20-way 5-shot: 101
    images a query), so its test tasks keep one query a class: the network and its sequence length are the same."""
    cfg = compose_config([f"experiment={name}"])
    small = ["model.widths=[8,8,8,8]"] if "widths" in cfg.model else []
    return small + (["data.queries=1"] if cfg.algo._target_.endswith(".SNAIL") else [])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name, request):
    algo_name, data_name, setting = parse(name)
    cfg = compose_config([f"experiment={name}", *narrow(name), *data_location(data_name, request)])
    device, data, algo = build_experiment(cfg)
    # The class its name's algo option builds (maml_fc and fomaml: MAML; reptile_transductive: Reptile).
    assert type(algo).__name__ == compose_config([f"algo={algo_name}"]).algo._target_.rsplit(".", 1)[1]
    optimizer = build(cfg.optimizer)(algo.parameters())
    build(cfg.scheduler)(optimizer)
    assert optimizer.param_groups[0]["lr"] == cfg.train.meta_lr
    episode = data.sample("test", tasks_per_batch(data_name), torch.Generator().manual_seed(0))
    if ways_shots := re.fullmatch(r"(\d+)w(\d+)s", setting):  # classification: 5w1s
        ways, shots = (int(v) for v in ways_shots.groups())
        assert (cfg.data.ways, cfg.data.shots) == (ways, shots) == (episode.ways, episode.shots)
    else:  # regression: k10, K support points
        assert cfg.data.shots == int(setting.removeprefix("k")) == episode.support_x.shape[1]
    result = algo.evaluate(episode, 1 if algo.eval_inner_steps else 0)  # the network runs on the test tasks
    assert torch.isfinite(result).all()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_takes_a_meta_training_step(name, request):
    # The training tasks can differ from the test tasks (train_ways, train_shots, train_queries):
    # one real meta-iteration on them, with a narrow network to keep it cheap.
    data_name = parse(name)[1]
    chosen = compose_config([f"experiment={name}"])
    small = ["model.hidden=8"] if isinstance(chosen.model.get("hidden"), int) else narrow(name)
    if data_name in IMAGE_DATA and (chosen.data.train_queries is None or chosen.data.train_queries > 2):
        small.append("data.train_queries=2")  # 84x84 images: 15 queries a class cost seconds, test the same path
    cfg = compose_config([f"experiment={name}", *small, *data_location(data_name, request)])
    _, data, algo = build_experiment(cfg)
    optimizer = build(cfg.optimizer)(algo.parameters())
    scheduler = build(cfg.scheduler)(optimizer)
    before = [p.detach().clone() for p in algo.parameters()]
    loss, metrics = algo.meta_loss(data.sample("train", tasks_per_batch(data_name), torch.Generator().manual_seed(0)), 0)
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.parameters()))


@pytest.mark.parametrize("setting", ["5w1s", "5w5s", "20w1s", "20w5s"])
def test_reptile_transduction_changes_only_the_batch_norm_mode(setting):
    plain = OmegaConf.to_container(compose_config([f"experiment=reptile_omniglot_{setting}"]))
    transductive = OmegaConf.to_container(compose_config([f"experiment=reptile_transductive_omniglot_{setting}"]))
    assert (plain["algo"].pop("transductive"), transductive["algo"].pop("transductive")) == (False, True)
    assert plain == transductive


@pytest.mark.parametrize("name,expected", [
    ("maml_omniglot_5w1s", {"algo.inner_lr": 0.4, "algo.inner_steps": 1, "train.meta_batch_size": 32,
                            "data.queries": 1, "model.variant": "stride", "test.episodes": 600, "data.split": "maml"}),
    ("maml_omniglot_20w5s", {"algo.inner_lr": 0.1, "algo.inner_steps": 5, "train.meta_batch_size": 16,
                             "data.queries": 5}),
    ("reptile_omniglot_5w1s", {"optimizer._target_": "torch.optim.SGD", "train.meta_lr": 1.0,
                               "scheduler._target_": "torch.optim.lr_scheduler.LinearLR", "scheduler.end_factor": 0.0,
                               "data.train_shots": 10, "algo.inner_betas": [0.0, 0.999], "algo.transductive": False,
                               "model.final_map": "flatten",
                               "test.episodes": 10000, "data.split": "nichol", "train.meta_batch_size": 5}),
    ("protonet_omniglot_5w1s", {"data.train_ways": 60, "data.train_queries": 5, "model.out_features": None,
                                "model.variant": "maxpool", "scheduler.step_size": 2000, "scheduler.gamma": 0.5,
                                "test.episodes": 1000, "data.split": "snell"}),
    ("mamlpp_omniglot_5w1s", {"scheduler._target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                              "scheduler.eta_min": 1e-5, "train.meta_batch_size": 8, "data.queries": 1,
                              "data.split": "mamlpp", "algo.lslr": True}),
    ("maml_sinusoid_k10", {"algo.inner_lr": 0.01, "train.meta_batch_size": 25, "train.iterations": 70000,
                           "data.shots": 10, "model.hidden": [40, 40]}),
    # miniImageNet (docs/protocols.md, "What each paper did"): MAML's 32-filter max-pooling Conv4, inner lr
    # 0.01, 5 steps in training and 10 at test, 4 tasks (1-shot) or 2 (5-shot), 15 queries, Ravi's split.
    ("maml_miniimagenet_5w1s", {"model.hidden": 32, "model.variant": "maxpool", "algo.inner_lr": 0.01,
                                "algo.inner_steps": 5, "algo.eval_inner_steps": 10, "train.meta_batch_size": 4,
                                "data.queries": 15, "data.image_size": 84, "data.split": "ravi",
                                "test.episodes": 600, "train.iterations": 60000}),
    ("maml_miniimagenet_5w5s", {"train.meta_batch_size": 2, "data.shots": 5, "model.hidden": 32}),
    # ProtoNets: 1600-d embedding of the 64-filter Conv4, trained 30-way (1-shot) / 20-way (5-shot), or 5-way.
    ("protonet_miniimagenet_5w1s", {"data.train_ways": 30, "data.queries": 15, "data.train_queries": None,
                                    "model.hidden": 64, "model.out_features": None, "scheduler.step_size": 2000,
                                    "test.episodes": 600}),
    ("protonet_miniimagenet_5w5s", {"data.train_ways": 20, "data.shots": 5}),
    ("protonet_train5w_miniimagenet_5w1s", {"data.train_ways": None, "data.ways": 5, "model.hidden": 64}),
    # Reptile: 15 training shots, inner batch 10, 8 inner iterations; 50 at test, 10,000 tasks, one query.
    ("reptile_miniimagenet_5w1s", {"algo.inner_iterations": 8, "data.train_shots": 15, "data.queries": 1,
                                   "data.train_queries": 0, "algo.inner_batch_size": 10, "algo.eval_inner_steps": 50,
                                   "algo.inner_betas": [0.0, 0.999], "test.episodes": 10000,
                                   "train.meta_batch_size": 5, "train.meta_lr": 1.0, "model.hidden": 32}),
    # MAML++: 48 filters, 2 tasks, inner lr 0.01, cosine meta lr down to 1e-5.
    ("mamlpp_miniimagenet_5w1s", {"model.hidden": 48, "train.meta_batch_size": 2, "algo.inner_lr": 0.01,
                                  "algo.lslr": True, "scheduler.eta_min": 1e-5}),
    # The Conv4 baselines: MAML's and Snell et al.'s miniImageNet settings at each data set's image size.
    ("maml_tieredimagenet_5w1s", {"model.hidden": 32, "algo.inner_lr": 0.01, "data.image_size": 84}),
    ("protonet_cifarfs_5w5s", {"data.train_ways": 20, "data.image_size": 32, "data.queries": 15}),
])
def test_experiment_holds_the_papers_values(name, expected):
    cfg = compose_config([f"experiment={name}"])
    assert {k: OmegaConf.select(cfg, k) for k in expected} == expected


def test_command_line_overrides_win_over_the_experiment():
    cfg = compose_config(["experiment=maml_omniglot_5w1s", "algo.inner_lr=0.2", "train.iterations=700"])
    assert cfg.algo.inner_lr == 0.2 and cfg.train.iterations == 700 and cfg.train.meta_batch_size == 32


def test_protocol_is_recorded_in_metrics_and_hparams(tmp_path, shared_data_root, omniglot_cache_dir):
    cfg = compose_config(["experiment=reptile_omniglot_5w1s", "model.hidden=8", "data.train_shots=2",
                          "algo.inner_batch_size=4", "algo.inner_iterations=2", "algo.eval_inner_steps=2",
                          "train.meta_batch_size=2", "train.iterations=2", "train.val_every=2", "train.val_episodes=4",
                          "test.episodes=4", *omniglot_location(shared_data_root, omniglot_cache_dir)])
    train(cfg, tmp_path)
    protocol = read_metrics(tmp_path)["protocol"]
    assert protocol == {
        "split": "nichol", "ways": 5, "shots": 1, "queries": 1, "train_ways": 5, "train_shots": 2, "train_queries": 0,
        "test_episodes": 4, "eval_inner_steps": 2, "checkpoint": "best", "eval_seed": 0,
        "batch_norm": "batch statistics; each query normalised with the support set alone (non-transductive)",
    }
    hparams = EventAccumulator(str(tmp_path / "tb")).Reload().PluginTagToContent("hparams")
    start = hparams["_hparams_/session_start_info"]
    assert b"protocol.batch_norm" in start and b"non-transductive" in start and b"protocol.train_shots" in start


def test_settings_that_cannot_train_are_one_line_errors(shared_data_root, omniglot_cache_dir):
    where = omniglot_location(shared_data_root, omniglot_cache_dir)
    with pytest.raises(MetarunError, match="data.train_ways=10 differs from data.ways=5"):
        build_experiment(compose_config(["algo=maml", "data.train_ways=10", *where]))
    with pytest.raises(MetarunError, match="set data.train_queries to at least 1"):  # before any data is read
        build_experiment(compose_config(["algo=maml", "model.hidden=8", "data.train_queries=0", *where]))
    # The library says it in its own terms: an episode without queries.
    _, data, algo = build_experiment(compose_config(["algo=maml", "model.hidden=8", *where]))
    episode = data.sample("train", 1, torch.Generator().manual_seed(0))
    episode.query_x, episode.query_y = episode.query_x[:, :0], episode.query_y[:, :0]
    with pytest.raises(ValueError, match="the episode's tasks have no queries"):
        algo.meta_loss(episode)


def test_reptile_warns_when_the_meta_optimiser_is_not_its_outer_step(caplog):
    cfg = compose_config(["algo=reptile", "data=sinusoid", "model=mlp"])
    algo = build(cfg.algo, model=build(cfg.model), problem="regression")
    with caplog.at_level("WARNING", logger="metarun"):
        algo.check_optimizer(torch.optim.SGD(algo.parameters(), lr=1.0))
        assert not caplog.records
        algo.check_optimizer(torch.optim.Adam(algo.parameters(), lr=1e-3))
    assert "optimizer=sgd train.meta_lr=1.0 scheduler=linear" in caplog.text
