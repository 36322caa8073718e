"""Every user-facing key is checked when the config is composed; task streams never coincide;
messages name keys the chosen data has. Mostly fast: composed configs and the validator alone."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from metarun.algos.maml import MAML
from metarun.algos.protonet import ProtoNet
from metarun.config import conf_dir
from metarun.data.episode import Episode
from metarun.data.omniglot import OmniglotTasks
from metarun.data.sinusoid import SinusoidTasks
from metarun.data.tasks import task_generator
from metarun.errors import DataError, MetarunError
from metarun.experiment import check_algorithm_fits
from metarun.models import MLP, Conv4
from metarun.utils.display import results_table
from metarun.utils.files import write_json
from metarun.utils.runtime import build, resolve_device
from metarun.utils.stats import mean_ci95
from metarun.validation import EVAL_RULES, MAX_SEED, TRAIN_RULES, validate_eval, validate_train
from support import TINY_SINUSOID, compose_config

CONF = Path(conf_dir())
SINUSOID = ["data=sinusoid", "model=mlp"]
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("algo", "optimizer", "scheduler", "device")}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def shipped_configs():
    """One composed config per option of every group (and both data sources), and every experiment."""
    overrides = [[], SINUSOID, ["model=conv4_embedding", "algo=protonet"]]
    overrides += [[f"{group}={option}"] for group, options in GROUPS.items() for option in options]
    overrides += [[f"experiment={name}"] for name in EXPERIMENTS]
    return [compose_config(o) for o in overrides]


def leaf_keys(cfg, prefix=""):
    for key, value in OmegaConf.to_container(cfg, resolve=False).items():
        if isinstance(value, dict):
            yield from leaf_keys(cfg[key], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# Keys no range applies to: the schema's type is the whole check (booleans), or they name files.
UNRANGED = re.compile(r"(^|\.)(_target_|_partial_)$|^data\.(root|cache_dir|url|download)$|^ckpt$")


def test_shipped_options_and_experiments_pass(shipped_configs):
    for cfg in shipped_configs:
        validate_train(cfg)
    validate_eval(compose_config(["ckpt=x.pt"], name="eval"))
    validate_eval(compose_config(["ckpt=x.pt", "test.episodes=600", "test.eval_seed=3", "algo.eval_inner_steps=0",
                                  "algo.batching=vmap", "device=cpu"], name="eval"))


def test_every_user_facing_key_has_a_rule(shipped_configs):
    # A key added to a config group without a rule here fails this test, not a user's run.
    missing = set()
    for cfg in shipped_configs:
        for key, value in leaf_keys(cfg):
            if not (UNRANGED.search(key) or isinstance(value, bool) or key in TRAIN_RULES):
                missing.add(key)
    for key, value in leaf_keys(compose_config(["ckpt=x.pt"], name="eval")):
        if not (UNRANGED.search(key) or isinstance(value, bool) or key in EVAL_RULES):
            missing.add(key)
    assert not missing, f"keys without a validation rule: {sorted(missing)}"


# (overrides, the key the message must name, the bad value as shown, words of the allowed range)
BAD_TRAIN = [
    # meta-optimiser and its schedule
    (["train.meta_lr=-0.001"], "train.meta_lr", "-0.001", "> 0"),
    (["train.meta_lr=0"], "train.meta_lr", "0.0", "> 0"),
    (["train.meta_lr=nan"], "train.meta_lr", "nan", "> 0"),
    (["optimizer.lr=-1"], "optimizer.lr", "-1.0", "> 0"),
    (["optimizer=sgd", "optimizer.momentum=-0.9"], "optimizer.momentum", "-0.9", "[0, 1)"),
    (["optimizer=sgd", "optimizer.momentum=1.0"], "optimizer.momentum", "1.0", "[0, 1)"),
    (["optimizer.betas=[0.9,1.0]"], "optimizer.betas", "[0.9, 1.0]", "[0, 1)"),
    (["optimizer.betas=[0.9]"], "optimizer.betas", "[0.9]", "2 values"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", "-0.1", ">= 0"),
    (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size", "0", ">= 1"),
    (["scheduler=step", "scheduler.gamma=-0.5"], "scheduler.gamma", "-0.5", "> 0"),
    (["scheduler=cosine", "scheduler.T_max=0"], "scheduler.T_max", "0", ">= 1"),
    (["scheduler=cosine", "scheduler.eta_min=-1"], "scheduler.eta_min", "-1.0", ">= 0"),
    (["scheduler=linear", "scheduler.start_factor=0"], "scheduler.start_factor", "0.0", "(0, 1]"),
    (["scheduler=linear", "scheduler.end_factor=1.5"], "scheduler.end_factor", "1.5", "[0, 1]"),
    (["scheduler=constant", "scheduler.factor=2"], "scheduler.factor", "2.0", "[0, 1]"),
    # seeds: torch aliases -1 with 2**64-1, and rejects what lies beyond
    (["seed=-1"], "seed", "-1", "2**63-1"),
    ([f"seed={MAX_SEED + 1}"], "seed", str(MAX_SEED + 1), "2**63-1"),
    ([f"seed={2**64 - 1}"], "seed", str(2**64 - 1), "2**63-1"),
    (["test.eval_seed=-2"], "test.eval_seed", "-2", "2**63-1"),
    # devices
    (["device.name=gpu"], "device.name", "gpu", "cuda:N"),
    (["device.name=cuda:x"], "device.name", "cuda:x", "cuda:N"),
    (["device.name=cuda:-1"], "device.name", "cuda:-1", "cuda:N"),
    (["device.name=meta"], "device.name", "meta", "cuda:N"),
    (["device.name="], "device.name", "''", "cuda:N"),
    # data: sinusoid (no ways) and omniglot
    (SINUSOID + ["data.shots=0"], "data.shots", "0", ">= 1"),
    (SINUSOID + ["data.shots=-5"], "data.shots", "-5", ">= 1"),
    (SINUSOID + ["data.queries=0"], "data.queries", "0", ">= 1"),
    (SINUSOID + ["data.amplitude=[5.0,0.1]"], "data.amplitude", "[5.0, 0.1]", "low <= high"),
    (SINUSOID + ["data.phase=[0.0]"], "data.phase", "[0.0]", "two numbers"),
    (SINUSOID + ["data.x_range=[1.0,1.0]"], "data.x_range", "[1.0, 1.0]", "low < high"),
    (SINUSOID + ["data.x_range=[-5.0,0.0,5.0]"], "data.x_range", "[-5.0, 0.0, 5.0]", "two numbers"),
    (SINUSOID + ["model.hidden=[40,0]"], "model.hidden", "[40, 0]", ">= 1"),
    (["data.ways=1"], "data.ways", "1", ">= 2"),
    (["data.ways=0"], "data.ways", "0", ">= 2"),
    (["data.shots=0"], "data.shots", "0", ">= 1"),
    (["data.queries=0"], "data.queries", "0", ">= 1"),
    (["data.train_ways=1"], "data.train_ways", "1", ">= 2"),
    (["data.train_shots=0"], "data.train_shots", "0", ">= 1"),
    (["data.train_queries=-1"], "data.train_queries", "-1", ">= 0"),
    (["data.split=vinyals"], "data.split", "vinyals", "maml, mamlpp, snell, nichol, lake"),
    (["data.image_size=32"], "data.image_size", "32", "28"),
    (["data.channels=3"], "data.channels", "3", "1"),
    (["model.hidden=0"], "model.hidden", "0", ">= 1"),
    (["model.variant=wide"], "model.variant", "wide", "stride, maxpool"),
    # algorithms
    (["algo.inner_lr=-0.4"], "algo.inner_lr", "-0.4", "> 0"),
    (["algo.inner_steps=0"], "algo.inner_steps", "0", ">= 1"),
    (["algo.eval_inner_steps=-1"], "algo.eval_inner_steps", "-1", ">= 0"),
    (["algo.batching=fast"], "algo.batching", "fast", "auto, loop, vmap"),
    (["algo=metasgd", "algo.lr_init=[0.1,0.01]"], "algo.lr_init", "[0.1, 0.01]", "low <= high"),
    (["algo=metasgd", "algo.lr_init=[-0.1,0.1]"], "algo.lr_init", "[-0.1, 0.1]", "[0, inf)"),
    (["algo=mamlpp", "algo.msl_iterations=-1"], "algo.msl_iterations", "-1", ">= 0"),
    (["algo=mamlpp", "algo.first_order_iterations=-1"], "algo.first_order_iterations", "-1", ">= 0"),
    (["algo=anil", "algo.adapt='(head'"], "algo.adapt", "(head", "regular expression"),
    (["algo=reptile", "algo.inner_lr=0"], "algo.inner_lr", "0.0", "> 0"),
    (["algo=reptile", "algo.inner_betas=[0.0,1.0]"], "algo.inner_betas", "[0.0, 1.0]", "[0, 1)"),
    (["algo=reptile", "algo.inner_optimizer=rmsprop"], "algo.inner_optimizer", "rmsprop", "sgd, adam"),
    (["algo=reptile", "algo.inner_batch_size=0"], "algo.inner_batch_size", "0", ">= 1"),
    (["algo=reptile", "algo.eval_inner_batch_size=0"], "algo.eval_inner_batch_size", "0", ">= 1"),
    (["algo=reptile", "algo.inner_iterations=0"], "algo.inner_iterations", "0", ">= 1"),
    (["algo=protonet", "algo.distance=manhattan"], "algo.distance", "manhattan", "euclidean, cosine"),
    (["algo=protonet", "algo.cosine_scale=0"], "algo.cosine_scale", "0.0", "> 0"),
    (["algo=matchingnet", "algo.fce_steps=0"], "algo.fce_steps", "0", ">= 1"),
    (["algo=snail", "model=conv4_embedding", "algo.attention_keys=[64,0,512]"], "algo.attention_keys", "[64, 0, 512]",
     "one per attention block"),
    (["algo=snail", "model=conv4_embedding", "algo.attention_values=[]"], "algo.attention_values", "[]",
     "non-empty list"),
    (["algo=snail", "model=conv4_embedding", "algo.tc_filters=[128,-1]"], "algo.tc_filters", "[128, -1]",
     "one per TC block"),
    (["algo=snail", "model=conv4_embedding", "data.shots=0"], "data.shots", "0", ">= 1"),
    # the run's counts
    (["train.meta_batch_size=0"], "train.meta_batch_size", "0", ">= 1"),
    (["train.iterations=-3"], "train.iterations", "-3", ">= 1"),
    (["train.val_every=0"], "train.val_every", "0", ">= 1"),
    (["train.log_every=0"], "train.log_every", "0", ">= 1"),
    (["train.val_episodes=1"], "train.val_episodes", "1", "at least two tasks"),
    (["test.episodes=1"], "test.episodes", "1", "at least two tasks"),
    (["test.episodes=0"], "test.episodes", "0", ">= 2"),
    (["test.checkpoint=worst"], "test.checkpoint", "worst", "best, last"),
]


@pytest.mark.parametrize("overrides,key,shown,allowed", BAD_TRAIN, ids=[" ".join(c[0]) for c in BAD_TRAIN])
def test_bad_value_is_one_line_naming_key_value_and_range(overrides, key, shown, allowed):
    with pytest.raises(MetarunError) as e:
        validate_train(compose_config(overrides))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{key}={shown} is not allowed: {key} takes "), message
    assert allowed in message, message


@pytest.mark.parametrize("overrides", [
    ["seed=0"], [f"seed={MAX_SEED}"], [f"test.eval_seed={MAX_SEED}"], ["algo.eval_inner_steps=0"],
    ["optimizer=sgd", "optimizer.momentum=0"], ["scheduler=cosine", "scheduler.eta_min=0"],
    ["scheduler=linear", "scheduler.end_factor=0"], ["data.ways=2"], ["data.shots=10", "data.queries=10"],
    ["data.train_queries=0"], ["data.train_ways=60", "data.train_shots=19", "data.train_queries=1"],
    ["test.episodes=2", "train.val_episodes=2"], ["device.name=cuda:1"], ["device.name=cpu"],
    SINUSOID + ["data.shots=1", "data.queries=1", "data.amplitude=[1.0,1.0]", "model.hidden=[]"],
])
def test_edge_values_are_allowed(overrides):
    validate_train(compose_config(overrides))


@pytest.mark.parametrize("overrides,message", [
    (["data.shots=15", "data.queries=6"], "data.shots + data.queries = 21 exceeds the 20 images per Omniglot class"),
    (["data.train_shots=10", "data.train_queries=11"], "data.train_shots + data.train_queries = 21 exceeds the 20"),
    (["data.train_shots=19", "data.queries=2"], "lower data.train_shots or data.queries"),
])
def test_omniglot_images_per_class_checked_before_any_data_is_read(overrides, message):
    with pytest.raises(MetarunError, match=re.escape(message)):
        validate_train(compose_config(overrides + ["data.root=/nonexistent", "data.download=false"]))


@pytest.mark.parametrize("overrides,key", [
    (["batch_size=0"], "batch_size"), (["test.episodes=1"], "test.episodes"), (["test.eval_seed=-1"], "test.eval_seed"),
    (["algo.eval_inner_steps=-1"], "algo.eval_inner_steps"), (["algo.batching=fast"], "algo.batching"),
    (["device.name=gpu"], "device.name"), (["test.checkpoint=worst"], "test.checkpoint"),
])
def test_eval_keys_are_checked(overrides, key):
    with pytest.raises(MetarunError, match=rf"^{re.escape(key)}=.* is not allowed: {re.escape(key)} takes"):
        validate_eval(compose_config(["ckpt=x.pt", *overrides], name="eval"))


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "meta", "cpu:x"]
                         + ([] if torch.backends.mps.is_available() else ["mps"]))
def test_unusable_devices_are_one_line(name):
    with pytest.raises(MetarunError) as e:
        resolve_device(name)
    assert "\n" not in str(e.value) and ("device=cpu" in str(e.value))


def test_constructor_value_error_reaches_the_user_as_one_line():
    # Algorithms raise ValueError naming their algo.* key; build() turns it into one user-facing line.
    cfg = compose_config(["algo=anil", "algo.adapt='^nowhere'"])
    with pytest.raises(MetarunError) as e:
        build(cfg.algo, model=Conv4(out_features=5), problem="classification")
    assert "\n" not in str(e.value) and "algo.adapt='^nowhere' matches none" in str(e.value)


def test_a_data_argument_error_names_the_data_key():
    # OmniglotTasks names its argument (split); the user reads the key, before any archive is read.
    cfg = compose_config(["data.download=false"])
    cfg.data.split = "vinyals"  # past composition and validation: the class itself refuses it
    with pytest.raises(MetarunError, match=r"data.split must be one of .* got 'vinyals'") as e:
        build(cfg.data)
    assert "\n" not in str(e.value)


# -- independent task streams -----------------------------------------------------------------
def first_draws(generator: torch.Generator) -> tuple:
    return tuple(torch.rand(4, generator=generator).tolist())


def test_training_stream_never_replays_validation_or_test_tasks():
    fixed = {first_draws(task_generator(purpose, s)) for purpose in ("val", "test") for s in range(100)}
    assert len(fixed) == 200
    for seed in range(500):
        assert first_draws(task_generator("train", seed)) not in fixed, seed
    # The reported collision: seed=2 trained on the sinusoid test tasks of eval_seed=0.
    source = SinusoidTasks(shots=5, queries=5, amplitude=[0.1, 5.0], phase=[0.0, math.pi], x_range=[-5.0, 5.0])
    train = source.sample("train", 4, task_generator("train", 2))
    test = next(source.fixed_episodes("test", 4, 4, 0))
    assert not torch.equal(train.support_x, test.support_x)
    assert not torch.equal(next(source.fixed_episodes("val", 4, 4, 0)).support_x, test.support_x)


def test_task_streams_are_pinned():
    # Everyone's validation and test tasks depend on this derivation: a change must fail here.
    assert task_generator("train", 0).initial_seed() == 7311004642459800080
    assert task_generator("test", 0).initial_seed() == 8133494465784914131
    assert task_generator("val", MAX_SEED).initial_seed() == 727725419575693862
    assert torch.rand(2, generator=task_generator("test", 0)).tolist() == pytest.approx([0.8558175, 0.3049237])
    with pytest.raises(ValueError):
        task_generator("training", 0)


# -- one task has no confidence interval --------------------------------------------------------
def test_one_task_has_no_interval(tmp_path):
    mean, ci = mean_ci95(torch.tensor([[0.8]]).squeeze(1))
    assert mean == pytest.approx(0.8) and math.isnan(ci)
    assert mean_ci95(torch.tensor([0.5, 0.7]))[1] > 0
    test = {"accuracy": mean, "ci95": ci, "episodes": 1, "per_step": [mean]}
    write_json(tmp_path / "metrics.json", {"test": test})
    assert json.loads((tmp_path / "metrics.json").read_text())["test"]["ci95"] is None
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(results_table("t", "accuracy", test, None))
    text = console.export_text()
    assert "n/a" in text and "± 0.0000" not in text
    console.print(results_table("t", "accuracy", {**test, "ci95": 0.0123, "episodes": 2}, None))
    assert "± 0.0123" in console.export_text()


# -- messages name keys the chosen data has ---------------------------------------------------
def data_keys(message: str) -> list[str]:
    return re.findall(r"data\.\w+", message)


def assert_keys_exist(message: str, cfg) -> None:
    keys = data_keys(message)
    assert keys, message
    for key in keys:
        assert OmegaConf.select(cfg, key, default="absent") != "absent", f"{key} is not a key of this data: {message}"


def no_query_episode(ways: int, problem: str) -> Episode:
    shape = (2, 5, 1) if problem == "regression" else (2, ways, 1, 28, 28)
    support_y = torch.zeros(2, 5, 1) if problem == "regression" else torch.arange(ways).expand(2, -1)
    empty_x = torch.zeros(2, 0, *shape[2:])
    empty_y = torch.zeros(2, 0, 1) if problem == "regression" else torch.zeros(2, 0, dtype=torch.long)
    return Episode(torch.zeros(shape), support_y, empty_x, empty_y, ways=ways, shots=1, queries=0)


def test_no_query_messages_name_keys_of_the_chosen_data():
    # The config's words come from the experiment assembly, before any data is read...
    for cfg in (compose_config(SINUSOID), compose_config(SINUSOID + ["algo=metasgd"])):
        OmegaConf.update(cfg, "data.queries", 0)
        with pytest.raises(MetarunError) as e:
            check_algorithm_fits(cfg)
        assert_keys_exist(str(e.value), cfg)
    for algo in (["algo=maml"], ["algo=protonet", "model=conv4_embedding"]):
        cfg = compose_config(algo + ["data.train_queries=0"])
        with pytest.raises(MetarunError) as e:
            check_algorithm_fits(cfg)
        assert_keys_exist(str(e.value), cfg)
    # ...and the algorithms, a library, say it in their own terms: no config key at all.
    for make, episode in [
        (lambda: MAML(MLP(1, [8], 1), problem="regression"), no_query_episode(1, "regression")),
        (lambda: MAML(Conv4(out_features=3, hidden=4), problem="classification"), no_query_episode(3, "classification")),
        (lambda: ProtoNet(Conv4(out_features=None, hidden=4, variant="maxpool"), problem="classification"),
         no_query_episode(3, "classification")),
    ]:
        with pytest.raises(ValueError) as e:
            make().meta_loss(episode)
        message = str(e.value)
        assert not data_keys(message) and ("have no queries" in message or "have none" in message), message


def test_validator_messages_name_keys_of_the_chosen_data():
    for overrides in (["data.shots=0"], ["data.queries=0"], ["data.x_range=[0.0,0.0]"]):
        cfg = compose_config(SINUSOID + overrides)
        with pytest.raises(MetarunError) as e:
            validate_train(cfg)
        assert_keys_exist(str(e.value), cfg)


@pytest.fixture(scope="module")
def omniglot_tasks(shared_data_root, omniglot_cache_dir):
    def make(split="maml", **settings):
        settings = {"ways": 5, "shots": 1, "queries": 1, **settings}
        return OmniglotTasks(split=split, root=str(shared_data_root), cache_dir=str(omniglot_cache_dir),
                             download=False, **settings)
    return make


@pytest.mark.parametrize("split,settings,expected", [
    # data.ways sets every split here: the train split's 1100 is named, and the real limit with its reason.
    ("maml", {"ways": 2000}, "data.ways=2000 exceeds the 1100 classes of the 'maml' train split: use at most 100 "
                             "ways (data.ways also sets the val tasks, and the val split has 100 classes)"),
    ("maml", {"ways": 200}, "data.ways=200 exceeds the 100 classes of the 'maml' val split: use at most 100 ways"),
    # data.train_ways sets only the training tasks: its limit is the train split alone.
    ("maml", {"train_ways": 2000}, "data.train_ways=2000 exceeds the 1100 classes of the 'maml' train split: "
                                   "use at most 1100 ways"),
    ("snell", {"train_ways": 5000}, "data.train_ways=5000 exceeds the 4112 classes of the 'snell' train split: "
                                    "use at most 4112 ways"),
    # with train_ways set, data.ways is limited by val and test only
    ("snell", {"ways": 700, "train_ways": 60}, "data.ways=700 exceeds the 688 classes of the 'snell' val split: "
                                               "use at most 688 ways"),
])
def test_omniglot_ways_limit_names_the_right_split(omniglot_tasks, split, settings, expected):
    with pytest.raises(DataError) as e:
        omniglot_tasks(split, **settings)
    assert str(e.value) == expected


@pytest.mark.slow
def test_cli_bad_values_are_one_line_and_start_no_run(tmp_path):
    from test_cli import assert_one_line_error, metarun

    run_dir = tmp_path / "run"
    for overrides, words in [
        (["train.meta_lr=-0.1"], ["train.meta_lr=-0.1", "> 0"]),
        (["scheduler=step", "scheduler.step_size=0"], ["scheduler.step_size=0", ">= 1"]),
        (["seed=-1"], ["seed=-1", "2**63-1"]),
        (["device.name=gpu"], ["device.name=gpu", "cuda:N"]),
        (["data.shots=0"], ["data.shots=0", ">= 1"]),
    ]:
        result = metarun("train", *TINY_SINUSOID, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert_one_line_error(result, *words)
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists(), overrides
    result = metarun("eval", f"ckpt={tmp_path / 'missing.pt'}", "batch_size=0", f"hydra.run.dir={tmp_path / 'eval'}",
                     cwd=tmp_path)
    assert_one_line_error(result, "batch_size=0", ">= 1")


@pytest.mark.parametrize("override,words", [("algo.ways=7", "algo.ways=7, but the tasks have data.ways=5"),
                                            ("algo.shots=3", "algo.shots=3, but the tasks have data.shots=1")])
def test_snail_refuses_a_network_size_that_parts_from_the_tasks(override, words):
    # SNAIL's network is sized by algo.ways/algo.shots (which follow data.ways/data.shots): an override that
    # parts them would fail on the first task, mid-run; it is refused before anything is built.
    cfg = compose_config(["experiment=snail_omniglot_5w1s", override])
    validate_train(cfg)
    with pytest.raises(MetarunError, match=f"{words}: leave out {override.split('=')[0]}"):
        check_algorithm_fits(cfg)
    check_algorithm_fits(compose_config(["experiment=snail_omniglot_5w1s", "data.ways=7", "data.shots=3"]))
