"""MAML++: numerical truth of every switch against an independent reference, and a real run.

The reference below is written from scratch (F.conv2d, native F.batch_norm(training=True), plain
dicts and ``torch.autograd.grad``, one task at a time); it shares nothing with metarun's inner
loop or batch norm. It reads the learned quantities from the documented attributes ``inner_lrs``
and ``step_norms``, all of which are randomised first, so a rate or a batch-norm copy used at the
wrong step shows up as a relative error.
"""

import io
import math
import re

import pytest
import torch
import torch.nn.functional as F

from metarun.algos.maml import MAML
from metarun.algos.mamlpp import MAMLpp, msl_weights
from metarun.errors import MetarunError
from metarun.models import Conv4
from metarun.experiment import build_experiment
from metarun.train import train
from metarun.utils.checkpoint import load_checkpoint
from metarun.utils.runtime import build
from support import random_image_episode, TINY_OMNIGLOT, TINY_SINUSOID, compose_config, omniglot_location, read_metrics

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 3


def is_norm(name):
    """Conv4's batch norms are features.<i>.1 (``-`` for ``.`` in the algorithm's dict keys)."""
    return re.fullmatch(r"features[.-]\d[.-]1[.-](weight|bias)", name) is not None


def image_episode(seed=0):
    return random_image_episode(TASKS, WAYS, SHOTS, QUERIES, seed)


def make(variant="stride", steps=3, seed=0, **kwargs):
    """A MAML++ on a float64 Conv4 whose rates and every batch-norm copy are distinct random numbers."""
    torch.manual_seed(seed)
    model = Conv4(out_features=WAYS, hidden=8, variant=variant).double()
    algo = MAMLpp(model, "classification", **{"inner_lr": 0.3, "inner_steps": steps, **kwargs})
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(algo.step_norms.items()):
            if is_norm(name):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
        for rates in algo.inner_lrs.values():
            rates.uniform_(0.1, 0.5)
    return algo


# -- the independent reference ------------------------------------------------------------------
def reference_forward(p, norms, x, copy, variant):
    """Conv4 with conv/head weights ``p`` and the batch-norm weights and biases of copy ``copy``."""
    h = x
    for i in range(4):
        h = F.conv2d(h, p[f"features.{i}.0.weight"], p[f"features.{i}.0.bias"], stride=2 if variant == "stride" else 1, padding=1)
        h = F.batch_norm(h, None, None, norms[f"features.{i}.1.weight"][copy], norms[f"features.{i}.1.bias"][copy], training=True)
        h = F.relu(h)
        if variant == "maxpool":
            h = F.max_pool2d(h, 2)
    features = h.mean(dim=(2, 3)) if variant == "stride" else h.flatten(1)
    return F.linear(features, p["head.weight"], p["head.bias"])


def reference_tables(algo):
    """Adapted parameters, batch-norm copies 0..N per name, and per-step rates, as plain dicts."""
    params = dict(algo.model.named_parameters())
    adapted = {k: v for k, v in params.items() if not is_norm(k)}
    norms = {k: [v] + list(algo.step_norms[k.replace(".", "-")].unbind(0)) for k, v in params.items() if is_norm(k)}
    rates = {k: algo.inner_lrs[k.replace(".", "-")] for k in adapted}
    return adapted, norms, rates


def reference_weights(steps, iteration, msl_iterations):
    """The reference code's get_per_step_loss_importance_vector with iterations for epochs."""
    if iteration >= msl_iterations:
        return None
    weights = [1.0 / steps] * steps
    decay = 1.0 / steps / msl_iterations
    floor = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - iteration * decay, floor)
    weights[-1] = min(weights[-1] + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


def reference_meta_loss(algo, episode, steps, weights, first_order, variant):
    adapted, norms, rates = reference_tables(algo)
    total = 0.0
    for t in range(episode.num_tasks):
        fast, losses = dict(adapted), []
        for s in range(steps):
            loss = F.cross_entropy(reference_forward(fast, norms, episode.support_x[t], s, variant), episode.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - rates[k][s] * g for (k, v), g in zip(fast.items(), grads)}
            losses.append(F.cross_entropy(reference_forward(fast, norms, episode.query_x[t], s + 1, variant), episode.query_y[t]))
        total = total + (sum(w * l for w, l in zip(weights, losses)) if weights else losses[-1])
    return total / episode.num_tasks


def groups(algo):
    """The three kinds of meta-learned tensors, so none hides behind a larger one's norm."""
    return {"network": list(algo.model.parameters()), "rates": list(algo.inner_lrs.values()),
            "norm copies": list(algo.step_norms.values())}


def relative_errors(got_loss, want_loss, algo):
    out = {}
    # A first-order meta-loss does not reach copies used only in support passes: those are zeros.
    def grad(loss, params):
        return torch.cat([g.flatten() for g in torch.autograd.grad(
            loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)])

    for name, params in groups(algo).items():
        got, want = grad(got_loss, params), grad(want_loss, params)
        assert want.norm() > 0, name
        out[name] = ((got - want).norm() / want.norm()).item()
    return out


# -- 1. every switch on, against the reference --------------------------------------------------
@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("variant", ["stride", "maxpool"])
def test_meta_gradient_matches_reference_in_the_msl_and_second_order_phase(batching, variant):
    algo = make(variant, steps=3, msl_iterations=10, first_order_iterations=2, batching=batching)
    episode, iteration = image_episode(), 4
    weights = reference_weights(3, iteration, 10)
    assert weights == pytest.approx([0.2, 0.2, 0.6])  # non-trivial: every step's query loss counts
    loss, metrics = algo.meta_loss(episode, iteration)
    want = reference_meta_loss(algo, episode, 3, weights, first_order=False, variant=variant)
    assert torch.allclose(loss, want, rtol=1e-12, atol=0)
    assert all(err < 1e-9 for err in relative_errors(loss, want, algo).values()), relative_errors(loss, want, algo)
    assert set(metrics) == {"loss", "accuracy"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_cuda_meta_gradient_matches_cpu_reference(batching):
    algo = make(steps=2, msl_iterations=10, batching=batching)
    episode, params = image_episode(), list(algo.parameters())
    want = torch.autograd.grad(reference_meta_loss(algo, episode, 2, reference_weights(2, 3, 10), False, "stride"), params)
    loss, _ = algo.cuda().meta_loss(episode.to("cuda"), 3)
    got = [g.cpu() for g in torch.autograd.grad(loss, params)]
    got, want = torch.cat([g.flatten() for g in got]), torch.cat([w.flatten() for w in want])
    assert ((got - want).norm() / want.norm()).item() < 1e-9


# -- 2. every switch off is MAML -----------------------------------------------------------------
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_all_switches_off_is_maml_exactly(batching):
    torch.manual_seed(0)
    model = Conv4(out_features=WAYS, hidden=8).double()
    maml = MAML(model, "classification", inner_lr=0.4, inner_steps=2, eval_inner_steps=3, batching=batching)
    plain = MAMLpp(model, "classification", inner_lr=0.4, inner_steps=2, eval_inner_steps=3, lslr=False, msl=False,
                   msl_iterations=10, per_step_bn=False, first_order_iterations=0, batching=batching)
    assert len(list(plain.parameters())) == len(list(maml.parameters()))  # no rates, no norm copies
    assert all(p is q for p, q in zip(plain.parameters(), maml.parameters()))
    episode = image_episode()
    (a, _), (b, _) = maml.meta_loss(episode, 3), plain.meta_loss(episode, 3)
    assert torch.equal(a, b)
    params = list(model.parameters())
    assert all(torch.equal(g, h) for g, h in zip(torch.autograd.grad(a, params), torch.autograd.grad(b, params)))
    assert torch.equal(maml.evaluate(episode, 3), plain.evaluate(episode, 3))


# -- 3. the multi-step loss schedule ------------------------------------------------------------
def test_msl_weights_follow_the_reference_schedule():
    # N = 5, over 100 iterations: decay 1/(5*100) per iteration, floor 0.006, final ceiling 0.976.
    assert msl_weights(5, 0, 100) == pytest.approx([0.2] * 5)
    assert msl_weights(5, 50, 100) == pytest.approx([0.1] * 4 + [0.6])
    assert msl_weights(5, 99, 100) == pytest.approx([0.006] * 4 + [0.976])  # clamped: 0.2 - 0.198 < floor
    assert msl_weights(5, 100, 100) is None and msl_weights(5, 10**6, 100) is None
    for iteration in range(0, 100, 7):
        weights = msl_weights(5, iteration, 100)
        assert weights == pytest.approx(reference_weights(5, iteration, 100))
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)


def test_after_msl_iterations_only_the_final_query_loss_counts():
    algo = make(steps=3, msl_iterations=10, batching="loop")
    episode = image_episode()
    weights = algo.step_loss_weights(9)
    assert weights.dtype == torch.float64 and weights.tolist() == pytest.approx(reference_weights(3, 9, 10))
    assert algo.step_loss_weights(10) is None
    msl_last, _ = algo.meta_loss(episode, 9)
    msl_over, _ = algo.meta_loss(episode, 10)
    algo.msl = False
    final_only, _ = algo.meta_loss(episode, 9)
    assert torch.equal(msl_over, final_only)
    assert not torch.allclose(msl_last, final_only)  # guards the check above


# -- 4. derivative-order annealing -------------------------------------------------------------
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_first_order_before_first_order_iterations_then_second_order(batching):
    algo = make(steps=2, msl=False, first_order_iterations=3, batching=batching)
    episode = image_episode()
    first = reference_meta_loss(algo, episode, 2, None, first_order=True, variant="stride")
    second = reference_meta_loss(algo, episode, 2, None, first_order=False, variant="stride")
    assert relative_errors(first, second, algo)["network"] > 1e-3  # the two must differ, or this proves nothing
    early, _ = algo.meta_loss(episode, 2)
    late, _ = algo.meta_loss(episode, 3)
    assert max(relative_errors(early, first, algo).values()) < 1e-9
    assert max(relative_errors(late, second, algo).values()) < 1e-9
    algo.first_order = True  # first_order wins over the schedule
    forced, _ = algo.meta_loss(episode, 3)
    assert max(relative_errors(forced, first, algo).values()) < 1e-9


# -- evaluation beyond the trained steps, and saved state ---------------------------------------
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_evaluation_beyond_inner_steps_reuses_the_last_rate_and_norm_copy(batching):
    algo = make(steps=2, eval_inner_steps=4, batching=batching)
    episode = image_episode()
    episode.query_x, episode.query_y = episode.support_x, episode.support_y
    got = algo.evaluate(episode, steps=4)
    adapted, norms, rates = reference_tables(algo)
    want = torch.zeros(TASKS, 5, dtype=torch.float64)
    for t in range(TASKS):
        fast = {k: v.detach().requires_grad_() for k, v in adapted.items()}
        for s in range(5):
            if s:
                loss = F.cross_entropy(reference_forward(fast, norms, episode.support_x[t], min(s - 1, 2), "stride"),
                                       episode.support_y[t])
                grads = torch.autograd.grad(loss, list(fast.values()))
                fast = {k: (v - rates[k][min(s - 1, 1)] * g).detach().requires_grad_() for (k, v), g in zip(fast.items(), grads)}
            out = reference_forward(fast, norms, episode.query_x[t], min(s, 2), "stride")
            want[t, s] = (out.argmax(-1) == episode.query_y[t]).double().mean()
    assert torch.equal(got, want)
    assert want[:, -1].mean() > want[:, 0].mean()  # adaptation on the queries' own images must help
    # Accuracies are coarse; the hooks themselves must pick the last rate and the last copy.
    assert all(torch.equal(algo.inner_lr_of(k, s), rates[k][1])
               for k in rates for s in (1, 2, 5))
    params, x = dict(algo.model.named_parameters()), episode.support_x[0]
    assert torch.equal(algo.forward(params, x, 5), algo.forward(params, x, 2))
    assert not torch.allclose(algo.forward(params, x, 2), algo.forward(params, x, 1))


def test_state_dict_round_trips_rates_and_norm_copies():
    algo, fresh = make(seed=0), make(seed=1)
    state = algo.state_dict()
    assert {"inner_lrs.features-0-0-weight", "inner_lrs.head-bias", "step_norms.features-3-1-bias"} <= set(state)
    assert state["step_norms.features-0-1-weight"].shape == (3, 8) and state["inner_lrs.head-weight"].shape == (3,)
    assert not any(is_norm(k.removeprefix("inner_lrs.")) for k in state if k.startswith("inner_lrs."))  # batch norm has no rates: it does not adapt
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    episode = image_episode()
    assert torch.equal(fresh.meta_loss(episode, 1)[0], algo.meta_loss(episode, 1)[0])


# -- 5. config and a real run -------------------------------------------------------------------
def test_config_composes_with_the_omniglot_values():
    cfg = compose_config(["algo=mamlpp"])
    algo = build(cfg.algo, model=Conv4(out_features=5, hidden=8), problem="classification")
    assert isinstance(algo, MAMLpp) and (algo.inner_lr, algo.inner_steps, algo.eval_inner_steps) == (0.1, 5, 5)
    assert algo.lslr and algo.msl and algo.per_step_bn and not algo.first_order
    assert (algo.msl_iterations, algo.first_order_iterations) == (5000, 0) and algo.transductive
    assert len(algo.inner_lrs) == 10 and all(torch.equal(r, torch.full((5,), 0.1)) for r in algo.inner_lrs.values())
    assert len(algo.step_norms) == 8 and all(c.shape == (5, 8) for c in algo.step_norms.values())


def test_bad_settings_are_clear_errors():
    with pytest.raises(MetarunError, match=r"algo.per_step_bn=true needs a network with batch norm"):
        build_experiment(compose_config(TINY_SINUSOID + ["algo=mamlpp"]))
    with pytest.raises(ValueError, match=r"msl_iterations and first_order_iterations must be at least 0"):
        make(msl_iterations=-1)
    cfg = compose_config(["algo=mamlpp", "algo.msl_iterations=-1"])
    with pytest.raises(MetarunError, match=r"algo.msl_iterations and algo.first_order_iterations must be at least 0"):
        build(cfg.algo, model=Conv4(out_features=5, hidden=8), problem="classification")


def test_tiny_run_learns_rates_and_writes_finite_metrics(tmp_path, shared_data_root, omniglot_cache_dir):
    overrides = TINY_OMNIGLOT + omniglot_location(shared_data_root, omniglot_cache_dir) + [
        "algo=mamlpp", "algo.inner_steps=2", "algo.eval_inner_steps=2", "algo.msl_iterations=2",
        "algo.first_order_iterations=2", "scheduler=cosine"]
    train(compose_config(overrides), tmp_path)
    test = read_metrics(tmp_path)["test"]
    assert len(test["per_step"]) == 3 and all(math.isfinite(v) for v in test["per_step"] + [test["accuracy"], test["ci95"]])
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["algo"]
    rates = [v for k, v in state.items() if k.startswith("inner_lrs.")]
    assert rates and all(torch.isfinite(r).all() for r in rates)
    assert any(not torch.allclose(r, torch.full_like(r, 0.1)) for r in rates)  # the meta-optimiser moved them
    assert state["step_norms.features-0-1-weight"].shape == (2, 8)
