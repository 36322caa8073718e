"""Numerical truth for ANIL and Meta-SGD against independent per-task references (float64).

The references reuse the from-scratch Conv4/MLP forwards of test_maml_gradients (native
F.batch_norm, plain dicts, ``torch.autograd.grad``) and write each algorithm's inner update out
by hand, so they share nothing with metarun's engine.
"""

import pytest
import torch
import torch.nn.functional as F

from metarun.algos.anil import ANIL
from metarun.algos.maml import MAML
from metarun.algos.metasgd import MetaSGD
from metarun.models import MLP, Conv4
from support import TINY_OMNIGLOT, compose_config, omniglot_location, read_metrics
from test_maml_gradients import (WAYS, conv4_reference_forward, image_episode, mlp_reference_forward,
                                 regression_episode, relative_error)


def reference(params, forward, loss_fn, episode, steps, update, create_graph=True):
    """Mean query loss over tasks after ``steps`` updates ``update(name, value, grad)`` of the
    parameters ``update`` touches (it returns None for the ones it leaves alone)."""
    total = 0.0
    for t in range(episode.num_tasks):
        fast = dict(params)
        for _ in range(steps):
            names = [k for k in fast if update(k, fast[k], fast[k]) is not None]
            loss = loss_fn(forward(fast, episode.support_x[t]), episode.support_y[t])
            grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=create_graph)
            fast = {**fast, **{k: update(k, fast[k], g) for k, g in zip(names, grads)}}
        total = total + loss_fn(forward(fast, episode.query_x[t]), episode.query_y[t])
    return total / episode.num_tasks


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
def test_anil_meta_gradient_matches_reference(batching, steps, first_order):
    torch.manual_seed(0)
    model = Conv4(out_features=WAYS, hidden=4).double()
    algo = ANIL(model, "classification", inner_lr=0.4, inner_steps=steps, first_order=first_order, batching=batching)
    episode = image_episode()
    params = dict(model.named_parameters())
    head_only = lambda k, v, g: v - 0.4 * g if k.startswith("head.") else None  # noqa: E731
    want = torch.autograd.grad(reference(params, conv4_reference_forward, F.cross_entropy, episode, steps, head_only,
                                         create_graph=not first_order), list(params.values()))
    got = torch.autograd.grad(algo.meta_loss(episode)[0], list(params.values()))
    assert relative_error(got, want) < 1e-9
    # The body is meta-learned (through the query loss) but not adapted: its meta-gradient differs from MAML's.
    maml = MAML(model, "classification", inner_lr=0.4, inner_steps=steps, first_order=first_order)
    maml = torch.autograd.grad(maml.meta_loss(episode)[0], list(params.values()))
    assert relative_error(got[:-2], maml[:-2]) > 1e-3


def test_anil_pattern_is_checked():
    with pytest.raises(ValueError, match="matches none"):
        ANIL(Conv4(out_features=WAYS, hidden=4), "classification", adapt="^classifier")
    with pytest.raises(ValueError, match="not a regular expression"):
        ANIL(Conv4(out_features=WAYS, hidden=4), "classification", adapt="(")


def metasgd_reference_grad(algo, forward, loss_fn, episode, steps, first_order=False):
    """First order: the inner gradients are constants, but the rates still get a meta-gradient
    through the query loss (d fast / d rate = -grad)."""
    params = dict(algo.model.named_parameters())
    rates = dict(zip(params, algo.lrs))
    loss = reference(params, forward, loss_fn, episode, steps, lambda k, v, g: v - rates[k] * g,
                     create_graph=not first_order)
    return torch.autograd.grad(loss, list(params.values()) + list(algo.lrs))


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_meta_gradient_matches_reference_conv4(batching, first_order):
    torch.manual_seed(0)
    algo = MetaSGD(Conv4(out_features=WAYS, hidden=4).double(), "classification", inner_steps=2,
                   first_order=first_order, batching=batching)
    episode = image_episode()
    want = metasgd_reference_grad(algo, conv4_reference_forward, F.cross_entropy, episode, 2, first_order)
    got = torch.autograd.grad(algo.meta_loss(episode)[0], list(algo.model.parameters()) + list(algo.lrs))
    assert relative_error(got, want) < 1e-9
    assert all(g.abs().sum() > 0 for g in got[len(got) // 2:])  # the learning rates are meta-learned


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_metasgd_meta_gradient_matches_reference_mlp(batching):
    torch.manual_seed(0)
    algo = MetaSGD(MLP().double(), "regression", inner_steps=1, batching=batching)
    episode = regression_episode()
    want = metasgd_reference_grad(algo, mlp_reference_forward, F.mse_loss, episode, 1)
    got = torch.autograd.grad(algo.meta_loss(episode)[0], list(algo.model.parameters()) + list(algo.lrs))
    assert relative_error(got, want) < 1e-9


def test_metasgd_rates_start_uniform_in_lr_init():
    torch.manual_seed(0)
    algo = MetaSGD(MLP(), "regression", lr_init=(0.005, 0.1))
    rates = torch.cat([r.flatten() for r in algo.lrs])
    assert rates.numel() == sum(p.numel() for p in algo.model.parameters())
    assert 0.005 <= rates.min() and rates.max() <= 0.1 and rates.std() > 0.02  # spread over the range
    assert set(algo.state_dict()) >= {f"lrs.{i}" for i in range(len(algo.lrs))}


@pytest.mark.parametrize("algo", ["anil", "metasgd"])
def test_train_runs_from_the_config(tmp_path, shared_data_root, omniglot_cache_dir, algo):
    from metarun.train import train

    cfg = compose_config([f"algo={algo}", *TINY_OMNIGLOT, *omniglot_location(shared_data_root, omniglot_cache_dir)])
    train(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    assert 0 <= metrics["test"]["accuracy"] <= 1 and len(metrics["test"]["per_step"]) == 3
