"""Reptile: the inner optimiser, the outer step, both execution paths, the batch-norm protocol, a real run.

The references train deep copies of the network with torch.optim (Adam or SGD) on the same
mini-batches, one task at a time; they share nothing with metarun's functional inner loop, so a
wrong Adam update, a mixed-up task, a wrong sign or scale of the outer step or a batch that the
two paths draw differently shows up as a numerical difference (float64, tight tolerances).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metarun.algos.reptile import Reptile, minibatch_indices, task_generators
from metarun.data.episode import Episode
from metarun.errors import MetarunError
from metarun.models import Conv4
from metarun.experiment import build_experiment
from metarun.train import train
from metarun.utils.checkpoint import load_checkpoint
from support import random_image_episode, TINY_OMNIGLOT, compose_config, omniglot_location, read_metrics

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 3
REPTILE = ["algo=reptile", "optimizer=sgd", "scheduler=linear", "train.meta_lr=1.0"]


def classification_episode(seed=0, tasks=TASKS, queries=QUERIES):
    return random_image_episode(tasks, WAYS, SHOTS, queries, seed)


def regression_episode(seed=0, tasks=TASKS, shots=5, queries=4):
    """Images with real-valued targets: the query metric (MSE) is continuous, so it shows any difference."""
    g = torch.Generator().manual_seed(seed)
    return Episode(
        support_x=torch.randn(tasks, shots, 1, 28, 28, generator=g, dtype=torch.float64),
        support_y=torch.randn(tasks, shots, 1, generator=g, dtype=torch.float64),
        query_x=torch.randn(tasks, queries, 1, 28, 28, generator=g, dtype=torch.float64),
        query_y=torch.randn(tasks, queries, 1, generator=g, dtype=torch.float64),
        ways=1, shots=shots, queries=queries,
    )


def network(out_features=WAYS):
    torch.manual_seed(0)
    return Conv4(out_features=out_features, hidden=4).double()


def trained_copy(model, x, y, order, inner_optimizer, lr, betas, loss_fn=F.cross_entropy, after_step=None):
    """φ the plain way: a deep copy trained with torch.optim on the mini-batches x[order[i]] (keeps the last loss)."""
    net = copy.deepcopy(model)
    if inner_optimizer == "adam":
        optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=betas)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for batch in order:
        optimizer.zero_grad()
        loss = loss_fn(net(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        net.last_batch_loss = loss.detach()
        if after_step is not None:
            after_step(net)
    return net


def flat(tensors):
    return torch.cat([t.detach().flatten() for t in tensors])


def assert_same_weights(got: dict, want: dict):
    """Equal to float64 rounding (the weights are of order 1). A convolution bias feeding batch norm has a true
    gradient of zero: its computed gradient is rounding noise, which Adam's g / (|g| + eps) scales up to
    about lr * 1e-8, so those get an absolute tolerance (a wrong update is off by orders of magnitude more)."""
    for name, w in want.items():
        noise_only = name.startswith("features.") and name.endswith(".0.bias")
        torch.testing.assert_close(got[name].detach(), w.detach(), rtol=0, atol=1e-9 if noise_only else 1e-12,
                                   msg=lambda m: f"{name}: {m}")


def test_minibatches_pass_over_every_example_before_reshuffling():
    # supervised-reptile's _mini_batches: permutations laid end to end, batches may straddle two of them.
    order = minibatch_indices(tasks=4, examples=5, iterations=7, batch_size=3)
    assert order.shape == (4, 7, 3)
    passes = order.flatten(1)[:, :20].reshape(4, 4, 5)
    assert (passes.sort(dim=-1).values == torch.arange(5)).all()
    assert len({tuple(p.tolist()) for p in passes.reshape(16, 5)}) > 1  # reshuffled, not one fixed order


@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.99)])
def test_inner_adam_matches_torch_optim_adam(betas):
    # One task and an outer SGD step of 1 leave θ at that task's φ; 12 steps exercise the bias corrections.
    # (The vmap path runs the same update: the path-agreement tests below.)
    model, episode = network(), classification_episode(tasks=1)
    algo = Reptile(model, "classification", inner_optimizer="adam", inner_lr=0.01, inner_betas=betas,
                   inner_iterations=12, inner_batch_size=4, batching="loop")
    torch.manual_seed(1)
    order = minibatch_indices(1, WAYS * SHOTS, 12, 4)[0]
    want = trained_copy(model, episode.support_x[0], episode.support_y[0], order, "adam", 0.01, betas)
    torch.manual_seed(1)  # the same global-RNG draw inside meta_loss
    loss, _ = algo.meta_loss(episode)
    loss.backward()
    torch.optim.SGD(algo.parameters(), lr=1.0).step()
    assert_same_weights(dict(model.named_parameters()), dict(want.named_parameters()))
    assert (flat(model.parameters()) - flat(network().parameters())).norm() > 1e-3  # the inner loop moved them


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("inner_optimizer, lr", [("sgd", 0.3), ("adam", 0.01)])
def test_outer_step_is_theta_plus_eps_times_mean_phi_minus_theta(batching, inner_optimizer, lr):
    eps, iterations, batch_size = 0.7, 3, 4  # 6 support examples: the second batch straddles a reshuffle
    model, episode = network(), classification_episode()
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    algo = Reptile(model, "classification", inner_optimizer=inner_optimizer, inner_lr=lr, inner_betas=(0.0, 0.999),
                   inner_iterations=iterations, inner_batch_size=batch_size, batching=batching)
    torch.manual_seed(3)
    order = minibatch_indices(TASKS, WAYS * SHOTS, iterations, batch_size)
    nets = [trained_copy(model, episode.support_x[t], episode.support_y[t], order[t], inner_optimizer, lr, (0.0, 0.999))
            for t in range(TASKS)]
    phis = [dict(net.named_parameters()) for net in nets]
    want = {k: p + eps * (torch.stack([phi[k] for phi in phis]).mean(0) - p) for k, p in theta.items()}
    with torch.no_grad():  # what training reports: the query loss and accuracy of the adapted networks
        outputs = [net(episode.query_x[t]) for t, net in enumerate(nets)]
        query_loss = torch.stack([F.cross_entropy(o, episode.query_y[t]) for t, o in enumerate(outputs)]).mean()
        query_accuracy = torch.stack([(o.argmax(-1) == episode.query_y[t]).double().mean()
                                      for t, o in enumerate(outputs)]).mean()

    torch.manual_seed(3)
    optimizer = torch.optim.SGD(algo.parameters(), lr=eps)
    loss, metrics = algo.meta_loss(episode)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert_same_weights(dict(model.named_parameters()), want)
    assert (flat(model.parameters()) - flat(theta.values())).norm() > 1e-3
    torch.testing.assert_close(metrics["loss"], query_loss, rtol=1e-9, atol=0)
    torch.testing.assert_close(metrics["accuracy"], query_accuracy)


def test_without_queries_training_reports_the_last_inner_batch_loss():
    # data.train_queries=0 (Reptile needs no query set): the metrics come from each task's last mini-batch.
    model, episode = network(), classification_episode(queries=0)
    algo = Reptile(model, "classification", inner_iterations=3, inner_batch_size=4)
    torch.manual_seed(4)
    order = minibatch_indices(TASKS, WAYS * SHOTS, 3, 4)
    want = torch.stack([trained_copy(model, episode.support_x[t], episode.support_y[t], order[t], "adam", 1e-3,
                                     (0.0, 0.999)).last_batch_loss for t in range(TASKS)]).mean()
    torch.manual_seed(4)
    _, metrics = algo.meta_loss(episode)
    torch.testing.assert_close(metrics["loss"], want, rtol=1e-9, atol=0)
    assert 0 <= metrics["accuracy"] <= 1


def test_meta_loss_is_not_finite_when_the_inner_loop_diverges():
    # The trainer stops on a non-finite meta-loss; a diverged φ must produce one.
    algo = Reptile(network(), "classification", inner_optimizer="sgd", inner_lr=1e300, inner_iterations=3,
                   inner_batch_size=4)
    loss, _ = algo.meta_loss(classification_episode())
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("transductive", [True, False])
@pytest.mark.parametrize("train_queries", [QUERIES, 0])
def test_loop_and_vmap_paths_agree(transductive, train_queries):
    model, episode = network(), classification_episode(queries=train_queries)
    results = {}
    for batching in ("loop", "vmap"):
        algo = Reptile(model, "classification", inner_iterations=3, inner_batch_size=4, batching=batching,
                       transductive=transductive)
        torch.manual_seed(5)
        loss, metrics = algo.meta_loss(episode)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[batching] = (dict(zip(dict(model.named_parameters()), grads)), metrics)
    assert_same_weights(results["loop"][0], results["vmap"][0])
    torch.testing.assert_close(results["loop"][1], results["vmap"][1], rtol=1e-10, atol=1e-14)

    model, episode = network(out_features=1), regression_episode()
    scores = {b: Reptile(model, "regression", eval_inner_batch_size=2, batching=b, transductive=transductive)
              .evaluate(episode, steps=4) for b in ("loop", "vmap")}
    assert scores["loop"].shape == (TASKS, 5)
    torch.testing.assert_close(scores["loop"], scores["vmap"], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("transductive", [True, False])
def test_evaluate_records_the_query_metric_after_each_adam_iteration(transductive):
    model, episode, steps = network(out_features=1), regression_episode(), 6
    algo = Reptile(model, "regression", inner_lr=0.01, eval_inner_batch_size=2, transductive=transductive)
    got = algo.evaluate(episode, steps)
    order = minibatch_indices(TASKS, 5, steps, 2, task_generators(episode))
    for t in range(TASKS):
        sx, qx, qy = episode.support_x[t], episode.query_x[t], episode.query_y[t]

        def query_mse(net):
            with torch.no_grad():
                out = net(qx) if transductive else torch.stack([net(torch.cat([sx, q[None]]))[-1] for q in qx])
            return F.mse_loss(out, qy)

        want = [query_mse(model)]
        trained_copy(model, sx, episode.support_y[t], order[t], "adam", 0.01, (0.0, 0.999), F.mse_loss,
                     after_step=lambda net: want.append(query_mse(net)))
        torch.testing.assert_close(got[t], torch.stack(want), rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())


def test_a_task_scores_the_same_in_any_batch_and_evaluation_leaves_the_training_rng_alone():
    # metarun eval (another batch size) must reproduce a run's test numbers; validation must not move training.
    algo = Reptile(network(out_features=1), "regression", eval_inner_batch_size=2)
    episode = regression_episode(tasks=4)
    before = torch.get_rng_state()
    whole = algo.evaluate(episode, steps=5)
    assert torch.equal(torch.get_rng_state(), before)
    split = torch.cat([algo.evaluate(episode.tasks(0, 1), 5), algo.evaluate(episode.tasks(1, 4), 5)])
    torch.testing.assert_close(whole, split, rtol=1e-12, atol=0)
    assert len(set(whole[:, -1].tolist())) == 4  # distinct tasks, distinct scores: the comparison is not vacuous


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_non_transductive_queries_do_not_see_each_other(batching):
    # Non-transductive: a query's prediction depends on the support set and itself only, so scoring all
    # queries together equals the mean of scoring each alone. Transductive batch norm mixes them.
    model, episode = network(out_features=1), regression_episode(queries=4)
    alone = [episode.tasks(0, TASKS) for _ in range(4)]
    for i, e in enumerate(alone):
        e.query_x, e.query_y, e.queries = episode.query_x[:, i:i + 1], episode.query_y[:, i:i + 1], 1
    for transductive in (False, True):
        algo = Reptile(model, "regression", eval_inner_batch_size=2, batching=batching, transductive=transductive)
        together = algo.evaluate(episode, steps=3)
        separately = torch.stack([algo.evaluate(e, steps=3) for e in alone]).mean(0)
        if transductive:
            assert (together - separately).abs().max() > 1e-3
        else:
            torch.testing.assert_close(together, separately, rtol=1e-10, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_vmap_matches_the_cpu_loop():
    # Mini-batch orders are drawn on the CPU, so batching=auto (vmap on CUDA) sees the CPU loop's batches.
    model, episode = network(), classification_episode()
    results = {}
    for device in ("cpu", "cuda"):
        algo = Reptile(model.to(device), "classification", inner_iterations=3, inner_batch_size=4, transductive=False)
        assert algo.path(torch.device(device)) == ("vmap" if device == "cuda" else "loop")
        torch.manual_seed(6)
        loss, _ = algo.meta_loss(episode.to(device))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[device] = ({k: g.cpu() for k, g in zip(dict(model.named_parameters()), grads)},
                           algo.evaluate(episode.to(device), steps=3).cpu())
    assert_same_weights(results["cuda"][0], results["cpu"][0])
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1])


def test_composes_with_the_papers_values():
    cfg = compose_config(REPTILE + ["data.train_shots=10"])
    assert cfg.algo.inner_optimizer == "adam" and list(cfg.algo.inner_betas) == [0.0, 0.999]
    assert (cfg.algo.inner_lr, cfg.algo.inner_iterations, cfg.algo.inner_batch_size) == (0.001, 5, 10)
    assert (cfg.algo.eval_inner_steps, cfg.algo.eval_inner_batch_size) == (50, 5)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.scheduler.end_factor == 0.0
    assert cfg.data.train_shots == 10


def test_a_bad_inner_optimizer_names_its_key():
    cfg = compose_config(REPTILE + ["data=sinusoid", "model=mlp", "algo.inner_optimizer=rmsprop"])
    with pytest.raises(MetarunError, match="algo.inner_optimizer"):
        build_experiment(cfg)


def test_tiny_run_writes_finite_metrics_and_decays_the_outer_step(tmp_path, shared_data_root, omniglot_cache_dir):
    overrides = (REPTILE + TINY_OMNIGLOT + omniglot_location(shared_data_root, omniglot_cache_dir)
                 + ["data.train_shots=3", "data.train_queries=0", "algo.inner_batch_size=4", "algo.inner_iterations=3",
                    "algo.eval_inner_batch_size=3", "train.log_every=1"])
    cfg = compose_config(overrides)
    _, _, algo = build_experiment(cfg)
    initial = flat(algo.parameters())
    train(cfg, tmp_path)

    metrics = read_metrics(tmp_path)
    test = metrics["test"]
    values = [test["accuracy"], test["ci95"], metrics["val"]["accuracy"], *test["per_step"]]
    assert all(math.isfinite(v) for v in values) and len(test["per_step"]) == 3
    assert metrics["protocol"]["train_shots"] == 3 and metrics["protocol"]["train_queries"] == 0

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()
    # ε at iterations 1..4 of a linear decay from 1 to 0 over 4 iterations.
    assert [e.value for e in events.Scalars("train/meta_lr")] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)
    assert (flat(state["algo"].values()) - initial).norm() > 0  # the outer steps moved θ
