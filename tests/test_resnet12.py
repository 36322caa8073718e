"""The miniImageNet backbones: ResNet-12 and Conv4 at 84x84x3, under every algorithm and both paths.

Numerical truth in float64, as for Conv4 (test_maml_gradients, test_gradient_algos, test_mamlpp,
test_reptile): the references below run a from-scratch ResNet-12 (F.conv2d, native
F.batch_norm(training=True), F.leaky_relu, a plain loop over tasks and ``torch.autograd.grad``) and
write each algorithm's inner update out by hand, so a wrong meta-gradient on the loop or the vmap
path shows up as a relative error. The network is ResNet-12 at width 4 on 16x16x3 images (the
smallest input its four poolings take), so the tests stay fast.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import get_class

from metarun.algos.anil import ANIL
from metarun.algos.maml import MAML
from metarun.algos.mamlpp import MAMLpp
from metarun.algos.matchingnet import MatchingNet
from metarun.algos.metasgd import MetaSGD
from metarun.algos.protonet import ProtoNet
from metarun.algos.reptile import Reptile, minibatch_indices
from metarun.data.episode import Episode
from metarun.errors import MetarunError
from metarun.experiment import build_experiment
from metarun.models import Conv4, ResNet12
from metarun.utils.runtime import build
from metarun.validation import validate_train
from support import compose_config, group_options, omniglot_location, read_metrics
from test_gradient_algos import metasgd_reference_grad, reference
from test_maml_gradients import conv4_reference_forward, reference_meta_grad, relative_error
from test_mamlpp import reference_weights
from test_reptile import assert_same_weights, trained_copy

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 3
SIZE, CHANNELS, WIDTHS = 16, 3, (4, 4, 4, 4)
NORM = re.compile(r"blocks[.-]\d+[.-](bn\d|shortcut[.-]1)[.-](weight|bias)")


def color_episode(size=SIZE, seed=0, tasks=TASKS, queries=QUERIES, channels=CHANNELS, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)
    return Episode(
        support_x=torch.randn(tasks, WAYS * SHOTS, channels, size, size, generator=g, dtype=dtype),
        support_y=labels.repeat_interleave(SHOTS).expand(tasks, -1).clone(),
        query_x=torch.randn(tasks, WAYS * queries, channels, size, size, generator=g, dtype=dtype),
        query_y=labels.repeat_interleave(queries).expand(tasks, -1).clone(),
        ways=WAYS, shots=SHOTS, queries=queries,
    )


def resnet(out_features=WAYS, seed=0):
    """A float64 ResNet-12 at width 4 whose batch-norm weights and biases are random (not 1 and 0), so the
    meta-gradient of every one of them is exercised."""
    torch.manual_seed(seed)
    model = ResNet12(out_features=out_features, in_channels=CHANNELS, widths=WIDTHS).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if NORM.fullmatch(name):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
    return model


def resnet12_reference_forward(p, x, slope=0.1):
    """ResNet-12 from its parameter dict: MetaOptNet's BasicBlock written out with functional ops."""
    def conv_bn(h, block, conv, norm, padding=1):
        h = F.conv2d(h, p[f"{block}.{conv}.weight"], padding=padding)
        return F.batch_norm(h, None, None, p[f"{block}.{norm}.weight"], p[f"{block}.{norm}.bias"], training=True)

    h = x
    for i in range(len(WIDTHS)):
        b = f"blocks.{i}"
        out = F.leaky_relu(conv_bn(h, b, "conv1", "bn1"), slope)
        out = F.leaky_relu(conv_bn(out, b, "conv2", "bn2"), slope)
        out = conv_bn(out, b, "conv3", "bn3") + conv_bn(h, b, "shortcut.0", "shortcut.1", padding=0)
        h = F.max_pool2d(F.leaky_relu(out, slope), 2)
    z = h.mean(dim=(2, 3))
    return F.linear(z, p["head.weight"], p["head.bias"]) if "head.weight" in p else z


def meta_grad(loss, params):
    return torch.autograd.grad(loss, list(params))


# -- 1. the network ----------------------------------------------------------------------------------
def test_resnet12_is_the_few_shot_network_and_matches_the_reference():
    torch.manual_seed(0)
    full = ResNet12(out_features=None)
    # MetaOptNet's ResNet-12 (widths 64-160-320-640, bias-free convolutions): 12.4M parameters, 640-d features.
    assert sum(p.numel() for p in full.parameters()) == 12_424_320
    with torch.no_grad():
        assert full(torch.randn(2, 3, 84, 84)).shape == (2, 640)  # 84 -> 42 -> 21 -> 10 -> 5, averaged
    assert full.out_dim == 640 and ResNet12(out_features=5).out_dim == 5

    model, x = resnet(), color_episode().support_x[0]
    torch.testing.assert_close(model(x), resnet12_reference_forward(dict(model.named_parameters()), x),
                               rtol=1e-12, atol=1e-12)
    # The residual path matters: without the shortcut the output differs.
    without = {k: (torch.zeros_like(v) if ".shortcut.1." in k else v) for k, v in model.named_parameters()}
    assert not torch.allclose(model(x), resnet12_reference_forward(without, x))


def test_resnet12_settings_and_small_images_are_clear_errors():
    with pytest.raises(ValueError, match="needs images of at least 16x16, got \\(12, 12\\)"):
        resnet()(torch.zeros(2, CHANNELS, 12, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="widths must be a non-empty list"):
        ResNet12(out_features=5, widths=())
    with pytest.raises(ValueError, match="negative_slope must be in"):
        ResNet12(out_features=5, negative_slope=1.5)


# -- 2. every gradient-based algorithm, both paths, against the per-task reference ------------------
@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True])  # maml and fomaml
def test_maml_meta_gradient_matches_reference(batching, first_order):
    model, episode = resnet(), color_episode()
    algo = MAML(model, "classification", inner_lr=0.4, inner_steps=2, first_order=first_order, batching=batching)
    params = dict(model.named_parameters())
    want = reference_meta_grad(params, resnet12_reference_forward, F.cross_entropy, episode, 0.4, 2, first_order)
    assert relative_error(meta_grad(algo.meta_loss(episode)[0], params.values()), want) < 1e-9


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_anil_meta_gradient_matches_reference(batching):
    model, episode = resnet(), color_episode()
    algo = ANIL(model, "classification", inner_lr=0.4, inner_steps=2, batching=batching)
    params = dict(model.named_parameters())
    head_only = lambda k, v, g: v - 0.4 * g if k.startswith("head.") else None  # noqa: E731
    want = meta_grad(reference(params, resnet12_reference_forward, F.cross_entropy, episode, 2, head_only),
                     params.values())
    assert relative_error(meta_grad(algo.meta_loss(episode)[0], params.values()), want) < 1e-9


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_metasgd_meta_gradient_matches_reference(batching):
    algo = MetaSGD(resnet(), "classification", inner_steps=2, batching=batching)
    episode = color_episode()
    want = metasgd_reference_grad(algo, resnet12_reference_forward, F.cross_entropy, episode, 2)
    got = meta_grad(algo.meta_loss(episode)[0], list(algo.model.parameters()) + list(algo.lrs))
    assert relative_error(got, want) < 1e-9


def mamlpp_reference_loss(algo, episode, steps, weights):
    """MAML++ with per-step rates and batch-norm copies, written out per task (copy k after k updates)."""
    params = dict(algo.model.named_parameters())
    adapted = {k: v for k, v in params.items() if not NORM.fullmatch(k)}
    norms = {k: [v, *algo.step_norms[k.replace(".", "-")].unbind(0)] for k, v in params.items() if NORM.fullmatch(k)}
    rates = {k: algo.inner_lrs[k.replace(".", "-")] for k in adapted}

    def forward(fast, x, copy):
        return resnet12_reference_forward({**fast, **{k: v[copy] for k, v in norms.items()}}, x)

    total = 0.0
    for t in range(episode.num_tasks):
        fast, losses = dict(adapted), []
        for s in range(steps):
            loss = F.cross_entropy(forward(fast, episode.support_x[t], s), episode.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: v - rates[k][s] * g for (k, v), g in zip(fast.items(), grads)}
            losses.append(F.cross_entropy(forward(fast, episode.query_x[t], s + 1), episode.query_y[t]))
        total = total + sum(w * l for w, l in zip(weights, losses))
    return total / episode.num_tasks


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_mamlpp_meta_gradient_matches_reference_with_per_step_norms_of_every_block(batching):
    torch.manual_seed(0)
    algo = MAMLpp(resnet(), "classification", inner_lr=0.3, inner_steps=2, msl_iterations=10,
                  first_order_iterations=0, batching=batching)
    # Per-step batch norm finds all 4 norms of every residual block, the shortcut's included.
    assert len(algo.norm_names) == 2 * 4 * len(WIDTHS)
    assert all(NORM.fullmatch(n) for n in algo.norm_names)
    with torch.no_grad():
        for copies in algo.step_norms.values():
            copies.add_(0.3 * torch.randn_like(copies))
        for rates in algo.inner_lrs.values():
            rates.uniform_(0.1, 0.5)
    episode, iteration = color_episode(), 4
    weights = reference_weights(2, iteration, 10)
    loss, _ = algo.meta_loss(episode, iteration)
    want = mamlpp_reference_loss(algo, episode, 2, weights)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    params = [*algo.model.parameters(), *algo.inner_lrs.values(), *algo.step_norms.values()]
    assert relative_error(meta_grad(loss, params), meta_grad(want, params)) < 1e-9


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_reptile_outer_step_matches_per_task_torch_optim_training(batching):
    # Reptile's meta-gradient is theta - mean(phi): with an outer SGD step of 1, theta becomes the mean of the
    # networks trained per task by torch.optim.Adam on the same mini-batches.
    model, episode = resnet(), color_episode()
    algo = Reptile(model, "classification", inner_optimizer="adam", inner_lr=0.01, inner_iterations=3,
                   inner_batch_size=4, batching=batching)
    torch.manual_seed(3)
    order = minibatch_indices(TASKS, WAYS * SHOTS, 3, 4)
    nets = [trained_copy(model, episode.support_x[t], episode.support_y[t], order[t], "adam", 0.01, (0.0, 0.999))
            for t in range(TASKS)]
    want = {k: torch.stack([dict(n.named_parameters())[k] for n in nets]).mean(0) for k, _ in model.named_parameters()}
    torch.manual_seed(3)  # the same global-RNG draw inside meta_loss
    loss, _ = algo.meta_loss(episode)
    loss.backward()
    torch.optim.SGD(algo.parameters(), lr=1.0).step()
    assert_same_weights(dict(model.named_parameters()), want)


# -- 3. the metric-based algorithms on the ResNet-12 embedding --------------------------------------
@pytest.mark.parametrize("transductive", [True, False])
@pytest.mark.parametrize("name", ["protonet", "matchingnet"])
def test_metric_algorithms_embed_with_resnet12_on_both_paths(name, transductive):
    model, episode = resnet(out_features=None), color_episode()
    torch.manual_seed(1)
    algo = (ProtoNet(model, "classification", transductive=transductive) if name == "protonet" else
            MatchingNet(model, "classification", fce=True, fce_steps=2, transductive=transductive).double())
    results = {}
    for batching in ("loop", "vmap"):
        algo.batching = batching
        loss, metrics = algo.meta_loss(episode)
        results[batching] = (loss, metrics["accuracy"], meta_grad(loss, algo.parameters()), algo.evaluate(episode))
    (loss, accuracy, grads, evaluated), (v_loss, v_accuracy, v_grads, v_evaluated) = results["loop"], results["vmap"]
    assert torch.isfinite(loss) and evaluated.shape == (TASKS, 1)
    torch.testing.assert_close(v_loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(v_accuracy, accuracy)
    torch.testing.assert_close(v_evaluated, evaluated)
    assert relative_error(v_grads, grads) < 1e-9
    assert all(g.abs().sum() > 0 for g, (n, _) in zip(grads, algo.named_parameters()) if n.startswith("model."))
    if name == "protonet" and transductive:  # by hand: squared distances to the class means of the support
        z = resnet12_reference_forward(dict(model.named_parameters()),
                                       torch.cat([episode.support_x[0], episode.query_x[0]]))
        prototypes = z[: WAYS * SHOTS].view(WAYS, SHOTS, -1).mean(1)
        logits = -torch.cdist(z[WAYS * SHOTS:], prototypes).pow(2)
        losses = algo._over_tasks(episode)[0]
        torch.testing.assert_close(losses[0], F.cross_entropy(logits, episode.query_y[0]), rtol=1e-10, atol=0)


# -- 4. Conv4 at 84x84x3: MAML's miniImageNet network ----------------------------------------------
@pytest.mark.parametrize("hidden, features", [(32, 800), (64, 1600)])
def test_conv4_at_84_has_the_published_feature_sizes(hidden, features):
    # MAML's miniImageNet network: 4 x [conv, BN, ReLU, 2x2 max-pool], 84 -> 42 -> 21 -> 10 -> 5; 5*5*hidden flattened.
    cfg = compose_config(["model=conv4", "model.variant=maxpool", f"model.hidden={hidden}", "data.channels=3",
                          "data.image_size=84", "data.ways=5"])
    model = build(cfg.model)
    assert isinstance(model, Conv4) and model.head.in_features == features and model.head.out_features == 5
    with torch.no_grad():
        assert model(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    embedding = build(compose_config(["model=conv4_embedding", f"model.hidden={hidden}", "data.channels=3",
                                      "data.image_size=84"]).model)
    assert embedding.out_dim == features


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_conv4_at_84x84x3_meta_gradient_matches_reference(batching):
    torch.manual_seed(0)
    model = Conv4(out_features=WAYS, in_channels=3, hidden=4, variant="maxpool", image_size=84).double()
    assert model.head.in_features == 4 * 5 * 5
    episode = color_episode(size=84, tasks=2)
    algo = MAML(model, "classification", inner_lr=0.4, inner_steps=1, batching=batching)
    params = dict(model.named_parameters())
    want = reference_meta_grad(params, lambda p, x: conv4_reference_forward(p, x, "maxpool"), F.cross_entropy,
                               episode, 0.4, 1, False)
    assert relative_error(meta_grad(algo.meta_loss(episode)[0], params.values()), want) < 1e-9


# -- 5. the configs ---------------------------------------------------------------------------------
def resnet_option(algo: str) -> str:
    """model=resnet12 for the gradient-based algorithms, its headless variant for the metric-based ones."""
    cls = get_class(compose_config([f"algo={algo}"]).algo._target_)
    return "resnet12_embedding" if getattr(cls, "embeds", False) else "resnet12"


@pytest.mark.parametrize("algo", group_options("algo"))
def test_every_algorithm_composes_and_builds_with_resnet12(algo):
    model_option = resnet_option(algo)
    # The episode below is WAYS-way SHOTS-shot: the config says so (SNAIL is sized for the configured task shape).
    cfg = compose_config([f"algo={algo}", f"model={model_option}", "model.widths=[4,4,4,4]", f"data.ways={WAYS}",
                          f"data.shots={SHOTS}"])
    validate_train(cfg)
    # Its input and head follow the data (Omniglot by default: 1 channel, data.ways outputs).
    assert list(cfg.model.widths) == [4, 4, 4, 4] and cfg.model.in_channels == cfg.data.channels
    assert cfg.model.out_features == (None if model_option == "resnet12_embedding" else cfg.data.ways)
    torch.manual_seed(0)
    model = build(cfg.model)
    assert isinstance(model, ResNet12)
    built = build(cfg.algo, model=model, problem="classification")
    episode = color_episode(channels=cfg.data.channels, dtype=torch.float32)
    if model_option == "resnet12":
        assert model(episode.support_x[0]).shape == (WAYS * SHOTS, cfg.data.ways)
    loss, _ = built.meta_loss(episode)
    assert torch.isfinite(loss)


def test_resnet12_defaults_are_the_papers_and_bad_values_are_named():
    cfg = compose_config(["model=resnet12"])
    assert list(cfg.model.widths) == [64, 160, 320, 640] and cfg.model.negative_slope == 0.1
    assert cfg.model.in_channels == cfg.data.channels and cfg.model.out_features == cfg.data.ways
    for override, words in (("model.widths=[]", "model.widths takes a non-empty list"),
                            ("model.widths=[64,0]", "model.widths takes a non-empty list"),
                            ("model.negative_slope=1.0", "model.negative_slope takes a number in \\[0, 1\\)")):
        with pytest.raises(MetarunError, match=words):
            validate_train(compose_config(["model=resnet12", override]))


def test_tiny_maml_run_on_omniglot_with_resnet12(tmp_path, shared_data_root, omniglot_cache_dir):
    # The whole path: Omniglot's 28x28x1 images (28 -> 14 -> 7 -> 3 -> 1) through training, checkpoint and test.
    from metarun.train import train

    overrides = ["model=resnet12", "model.widths=[4,4,4,4]", "data.ways=3", "train.meta_batch_size=2",
                 "train.iterations=2", "train.val_every=2", "train.val_episodes=2", "test.episodes=2",
                 "algo.inner_steps=1", "algo.eval_inner_steps=1", *omniglot_location(shared_data_root,
                                                                                      omniglot_cache_dir)]
    cfg = compose_config(overrides)
    _, _, algo = build_experiment(cfg)
    assert isinstance(algo.model, ResNet12)
    train(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    assert 0 <= metrics["test"]["accuracy"] <= 1
    assert metrics["protocol"]["batch_norm"].startswith("batch statistics")


def test_a_metric_algorithm_on_the_headed_resnet12_names_its_embedding_option():
    with pytest.raises(MetarunError, match="use model=resnet12_embedding") as error:
        build_experiment(compose_config(["algo=protonet", "model=resnet12", "data.download=false"]))
    assert "\n" not in str(error.value)
