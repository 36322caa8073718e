"""Numerical truth for MAML: both execution paths against an independent per-task reference.

The reference is written from scratch (F.conv2d, native F.batch_norm, a plain loop over tasks and
``torch.autograd.grad(create_graph=True)``); it shares nothing with metarun's inner loop or its
batch norm, so a wrong meta-gradient on either path (the vmap + native BatchNorm trap, a
detached inner gradient, a mixed-up task) shows up as a relative error.
"""

import pytest
import torch
import torch.nn.functional as F

from metarun.algos.maml import MAML
from metarun.data.episode import Episode
from metarun.models import MLP, Conv4
from support import random_image_episode

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 3


def conv4_reference_forward(p, x, variant="stride"):
    h = x
    for i in range(4):
        h = F.conv2d(h, p[f"features.{i}.0.weight"], p[f"features.{i}.0.bias"], stride=2 if variant == "stride" else 1, padding=1)
        h = F.batch_norm(h, None, None, p[f"features.{i}.1.weight"], p[f"features.{i}.1.bias"], training=True)
        h = F.relu(h)
        if variant == "maxpool":
            h = F.max_pool2d(h, 2)
    features = h.mean(dim=(2, 3)) if variant == "stride" else h.flatten(1)
    return F.linear(features, p["head.weight"], p["head.bias"])


def mlp_reference_forward(p, x):
    h = F.relu(F.linear(x, p["net.0.weight"], p["net.0.bias"]))
    h = F.relu(F.linear(h, p["net.2.weight"], p["net.2.bias"]))
    return F.linear(h, p["net.4.weight"], p["net.4.bias"])


def reference_meta_grad(params, forward, loss_fn, episode, lr, steps, first_order):
    total = 0.0
    for t in range(episode.num_tasks):
        fast = dict(params)
        for _ in range(steps):
            loss = loss_fn(forward(fast, episode.support_x[t]), episode.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
        total = total + loss_fn(forward(fast, episode.query_x[t]), episode.query_y[t])
    return torch.autograd.grad(total / episode.num_tasks, list(params.values()))


def image_episode(seed=0):
    return random_image_episode(TASKS, WAYS, SHOTS, QUERIES, seed)


def regression_episode(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(TASKS, 10, 1, generator=g, dtype=torch.float64) * 10 - 5
    y = torch.sin(x) * 2
    return Episode(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:], ways=1, shots=5, queries=5)


def relative_error(got, want):
    got = torch.cat([g.flatten() for g in got])
    want = torch.cat([w.flatten() for w in want])
    return ((got - want).norm() / want.norm()).item()


def algo_meta_grad(algo, episode):
    params = list(algo.model.parameters())
    loss, _ = algo.meta_loss(episode)
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_meta_gradient_matches_reference(batching, steps, first_order):
    torch.manual_seed(0)
    model = Conv4(out_features=WAYS, hidden=4).double()
    algo = MAML(model, "classification", inner_lr=0.4, inner_steps=steps, first_order=first_order, batching=batching)
    episode = image_episode()
    want = reference_meta_grad(
        dict(model.named_parameters()), conv4_reference_forward, F.cross_entropy, episode, 0.4, steps, first_order
    )
    assert relative_error(algo_meta_grad(algo, episode), want) < 1e-9


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_meta_gradient_matches_reference(batching, first_order):
    torch.manual_seed(0)
    model = MLP().double()
    algo = MAML(model, "regression", inner_lr=0.01, inner_steps=3, first_order=first_order, batching=batching)
    episode = regression_episode()
    want = reference_meta_grad(
        dict(model.named_parameters()), mlp_reference_forward, F.mse_loss, episode, 0.01, 3, first_order
    )
    assert relative_error(algo_meta_grad(algo, episode), want) < 1e-9


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_maxpool_conv4_meta_gradient_matches_reference(batching):
    torch.manual_seed(0)
    model = Conv4(out_features=WAYS, hidden=4, variant="maxpool").double()
    assert model.head.in_features == 4  # 28 -> 14 -> 7 -> 3 -> 1, flattened
    algo = MAML(model, "classification", inner_lr=0.4, inner_steps=2, batching=batching)
    episode = image_episode()
    want = reference_meta_grad(dict(model.named_parameters()), lambda p, x: conv4_reference_forward(p, x, "maxpool"),
                               F.cross_entropy, episode, 0.4, 2, False)
    assert relative_error(algo_meta_grad(algo, episode), want) < 1e-9


def test_first_order_differs_from_second_order():
    # Guards the tests above: the two references must disagree, or first-order would be untested.
    torch.manual_seed(0)
    model = Conv4(out_features=WAYS, hidden=4).double()
    params, episode = dict(model.named_parameters()), image_episode()
    second = reference_meta_grad(params, conv4_reference_forward, F.cross_entropy, episode, 0.4, 1, False)
    first = reference_meta_grad(params, conv4_reference_forward, F.cross_entropy, episode, 0.4, 1, True)
    assert relative_error(first, second) > 1e-3


def test_evaluate_paths_agree_and_adaptation_helps():
    torch.manual_seed(0)
    model = Conv4(out_features=WAYS, hidden=4).double()
    episode = image_episode()
    # Queries equal to the support images: a few SGD steps must fit them.
    episode.query_x, episode.query_y = episode.support_x, episode.support_y
    loop = MAML(model, "classification", inner_lr=0.4, batching="loop").evaluate(episode, steps=5)
    vmapped = MAML(model, "classification", inner_lr=0.4, batching="vmap").evaluate(episode, steps=5)
    assert loop.shape == (TASKS, 6)
    torch.testing.assert_close(loop, vmapped)
    assert loop[:, -1].mean() > loop[:, 0].mean()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batching", ["loop", "vmap", "auto"])
def test_cuda_meta_gradient_matches_cpu_reference(batching):
    torch.manual_seed(0)
    model = Conv4(out_features=WAYS, hidden=4).double()
    episode = image_episode()
    want = reference_meta_grad(
        dict(model.named_parameters()), conv4_reference_forward, F.cross_entropy, episode, 0.4, 2, False
    )
    algo = MAML(model.cuda(), "classification", inner_lr=0.4, inner_steps=2, batching=batching)
    got = [g.cpu() for g in algo_meta_grad(algo, episode.to("cuda"))]
    assert relative_error(got, want) < 1e-9
