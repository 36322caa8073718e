"""Prototypical Networks and Matching Networks: hand-computed outputs, the two batching paths, the
batch-norm protocol, and tiny end-to-end runs from the real configs.

Hand computations use a network whose embedding is the flattened image, so the distances and
cosines can be written out; the full-context embeddings are checked against an independent
reference built from torch's own ``nn.LSTM`` and ``nn.LSTMCell``.
"""

import math

import pytest
import torch
from torch import nn

from metarun.algos.matchingnet import MatchingNet, VmapLSTMCell
from metarun.algos.protonet import ProtoNet
from metarun.data.episode import Episode
from metarun.errors import MetarunError
from metarun.experiment import build_experiment, check_algorithm_fits
from metarun.models import Conv4
from metarun.train import train
from metarun.utils.runtime import build
from support import random_image_episode, TINY_OMNIGLOT, compose_config, omniglot_location, read_metrics

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 3


class Flatten(nn.Module):
    """A headless 'network' whose embedding is the image itself, flattened."""

    out_dim = 2

    def forward(self, x):
        return x.flatten(1)


def points_episode(support, support_y, query, query_y):
    """One task whose (1x1x2) images are the given 2-d points."""
    def as_images(points):
        return torch.tensor(points, dtype=torch.float64).view(1, len(points), 1, 1, 2)

    return Episode(as_images(support), torch.tensor([support_y]), as_images(query), torch.tensor([query_y]),
                   ways=2, shots=2, queries=1)


def image_episode(seed=0, ways=WAYS):
    return random_image_episode(TASKS, ways, SHOTS, QUERIES, seed)


def embedding_net():
    torch.manual_seed(0)
    return Conv4(out_features=None, hidden=4, variant="maxpool").double()


def make(name, model, **kwargs):
    if name == "protonet":
        return ProtoNet(model, "classification", **kwargs)
    torch.manual_seed(1)
    return MatchingNet(model, "classification", **({"fce": True, "fce_steps": 3} | kwargs)).double()


# -- 1. ProtoNets by hand ------------------------------------------------------------------------
# Class 0: (0,0), (2,0) -> prototype (1,0); class 1: (0,2), (0,4) -> prototype (0,3). The support
# set is interleaved on purpose: prototypes must follow the labels, not the order.
SUPPORT, SUPPORT_Y = [[0, 2], [0, 0], [0, 4], [2, 0]], [1, 0, 1, 0]
QUERY, QUERY_Y = [[3, 4], [1, 0]], [1, 0]


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_protonet_euclidean_logits_and_loss_by_hand(batching):
    algo = ProtoNet(Flatten(), "classification", distance="euclidean", batching=batching)
    episode = points_episode(SUPPORT, SUPPORT_Y, QUERY, QUERY_Y)
    zs, zq = algo.embed(episode.support_x[0], episode.query_x[0])
    # (3,4): 2^2+4^2 = 20 from (1,0), 3^2+1^2 = 10 from (0,3); (1,0): 0 and 1+9 = 10.
    want = torch.tensor([[-20.0, -10.0], [0.0, -10.0]], dtype=torch.float64)
    torch.testing.assert_close(algo.logits(zs, episode.support_y[0], zq, 2), want)
    loss, metrics = algo.meta_loss(episode)
    # Both queries are right, each by a margin of 10: cross-entropy log(1 + e^-10).
    assert loss.item() == pytest.approx(math.log1p(math.exp(-10)), rel=1e-12)
    assert metrics["accuracy"].item() == 1.0


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_protonet_cosine_logits_and_loss_by_hand(scale):
    algo = ProtoNet(Flatten(), "classification", distance="cosine", cosine_scale=scale)
    episode = points_episode(SUPPORT, SUPPORT_Y, QUERY, QUERY_Y)
    zs, zq = algo.embed(episode.support_x[0], episode.query_x[0])
    # (3,4)/5 against the directions (1,0) and (0,1): 0.6 and 0.8; (1,0): 1 and 0.
    want = scale * torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(algo.logits(zs, episode.support_y[0], zq, 2), want)
    loss, _ = algo.meta_loss(episode)
    expected = (math.log1p(math.exp(-0.2 * scale)) + math.log1p(math.exp(-1.0 * scale))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# -- 2. Matching Networks by hand, and the full-context embeddings ---------------------------------
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_matchingnet_log_probs_are_cosine_attention_by_hand(batching):
    algo = MatchingNet(Flatten(), "classification", fce=False, batching=batching)
    # Support (1,0) class 0, (0,1) and (1,1) class 1; query (1,0), label 0.
    episode = points_episode([[1, 0], [0, 1], [1, 1]], [0, 1, 1], [[1, 0]], [0])
    zs, zq = algo.embed(episode.support_x[0], episode.query_x[0])
    weights = [math.exp(c) for c in (1.0, 0.0, 1 / math.sqrt(2))]  # cosines to the three support points
    p = [weights[0] / sum(weights), (weights[1] + weights[2]) / sum(weights)]
    log_probs = algo.task_log_probs(zs, episode.support_y[0], zq, 2)
    torch.testing.assert_close(log_probs, torch.tensor([[math.log(p[0]), math.log(p[1])]], dtype=torch.float64))
    loss, _ = algo.meta_loss(episode)
    assert loss.item() == pytest.approx(-math.log(p[0]), rel=1e-12)


def test_vmap_lstm_cell_computes_what_torch_lstm_cell_does():
    torch.manual_seed(0)
    cell = VmapLSTMCell(3, 4).double()
    x, h, c = (torch.randn(5, n, dtype=torch.float64) for n in (3, 4, 4))
    for got, want in zip(cell(x, (h, c)), nn.LSTMCell.forward(cell, x, (h, c))):
        torch.testing.assert_close(got, want)


def reference_full_context(algo, zs, zq, steps):
    """The paper's appendix A with torch's native LSTMs, sharing only the weights with ``algo``."""
    dim = zs.shape[1]
    bilstm = nn.LSTM(dim, dim, bidirectional=True).double()
    for suffix, cell in (("", algo.support_forward), ("_reverse", algo.support_backward)):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(bilstm, f"{name}_l0{suffix}").data.copy_(getattr(cell, name))
    out, _ = bilstm(zs[:, None, :])  # (S, 1, 2D): forward states, then backward states
    g = zs + out[:, 0, :dim] + out[:, 0, dim:]
    cell = nn.LSTMCell(2 * dim, dim).double()
    cell.load_state_dict(algo.query_lstm.state_dict())
    h, c, read = zq, torch.zeros_like(zq), None
    for _ in range(steps):
        read = torch.softmax(h @ g.T, dim=1) @ g  # r_{k-1} from h_{k-1}
        h_hat, c = cell(torch.cat([zq, read], dim=1), (h, c))
        h = h_hat + zq
    return g, h


def test_matchingnet_fce_follows_the_paper_and_trains_its_lstms():
    algo = make("matchingnet", embedding_net(), batching="loop")
    episode = image_episode()
    zs, zq = algo.embed(episode.support_x[0], episode.query_x[0])
    g, f = algo.full_context(zs, zq)
    want_g, want_f = reference_full_context(algo, zs, zq, steps=3)
    torch.testing.assert_close(g, want_g)
    torch.testing.assert_close(f, want_f)

    log_probs = algo.task_log_probs(zs, episode.support_y[0], zq, WAYS)
    assert log_probs.shape == (WAYS * QUERIES, WAYS)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(WAYS * QUERIES, dtype=torch.float64))
    loss, _ = algo.meta_loss(episode)
    loss.backward()
    lstms = [algo.support_forward, algo.support_backward, algo.query_lstm]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for lstm in lstms for p in lstm.parameters())
    assert {n.split(".")[0] for n, _ in algo.named_parameters()} == {"model", "support_forward", "support_backward",
                                                                    "query_lstm"}


# -- 3. the loop and vmap paths --------------------------------------------------------------------
@pytest.mark.parametrize("transductive", [True, False])
@pytest.mark.parametrize("name", ["protonet", "matchingnet"])
def test_loop_and_vmap_give_the_same_loss_gradients_and_evaluation(name, transductive):
    model = embedding_net()
    algo = make(name, model, transductive=transductive)
    episode = image_episode()
    results = {}
    for batching in ("loop", "vmap"):
        algo.batching = batching
        loss, metrics = algo.meta_loss(episode)
        grads = torch.autograd.grad(loss, list(algo.parameters()))
        results[batching] = (loss, metrics["accuracy"], grads, algo.evaluate(episode, 0))
    (loss, accuracy, grads, evaluated), (v_loss, v_accuracy, v_grads, v_evaluated) = results["loop"], results["vmap"]
    assert evaluated.shape == (TASKS, 1)
    torch.testing.assert_close(v_loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(v_accuracy, accuracy)
    torch.testing.assert_close(v_evaluated, evaluated)
    for v, w in zip(v_grads, grads):
        torch.testing.assert_close(v, w, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in algo.parameters())


# -- 4. the batch-norm protocol --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["protonet", "matchingnet"])
def test_non_transductive_query_outputs_do_not_depend_on_the_other_queries(name):
    episode = image_episode()
    sx, sy, qx = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    changed = qx.clone()
    changed[1:] = torch.randn_like(changed[1:])  # every query but the first

    def first_query(algo, queries):
        with torch.no_grad():
            zs, zq = algo.embed(sx, queries)
            return algo.task_log_probs(zs, sy, zq, WAYS)[0]

    non_transductive = make(name, embedding_net(), transductive=False)
    torch.testing.assert_close(first_query(non_transductive, changed), first_query(non_transductive, qx))
    # Guard: with transductive batch norm the other queries do move it, so the check above can fail.
    transductive = make(name, embedding_net(), transductive=True)
    assert not torch.allclose(first_query(transductive, changed), first_query(transductive, qx))


# -- 5. settings, errors and end-to-end runs -------------------------------------------------------
def test_training_tasks_may_have_more_ways_than_test_tasks():
    algo = make("matchingnet", embedding_net())
    loss, _ = algo.meta_loss(image_episode(ways=5))
    assert torch.isfinite(loss)
    assert algo.evaluate(image_episode(ways=2), 0).shape == (TASKS, 1)


def test_bad_settings_are_clear_errors():
    # The classes are a library: they name their own arguments...
    with pytest.raises(ValueError, match="needs a headless embedding network as model"):
        ProtoNet(Conv4(out_features=5), "classification")
    with pytest.raises(ValueError, match="problem must be 'classification', got 'regression'"):
        MatchingNet(Flatten(), "regression")
    with pytest.raises(ValueError, match="distance must be one of"):
        ProtoNet(Flatten(), "classification", distance="manhattan")
    with pytest.raises(ValueError, match="fce_steps must be at least 1 with fce=True"):
        MatchingNet(Flatten(), "classification", fce=True, fce_steps=0)
    episode = image_episode()
    episode.query_x, episode.query_y = episode.query_x[:, :0], episode.query_y[:, :0]
    with pytest.raises(ValueError, match="the episode's tasks have none"):
        make("protonet", embedding_net()).meta_loss(episode)
    with pytest.raises(MetarunError, match="set data.train_queries to at least 1"):  # the config's words
        check_algorithm_fits(compose_config(["algo=protonet", "model=conv4_embedding", "data.train_queries=0"]))


def test_bad_settings_reach_the_user_as_config_keys():
    # ... and what the user reads names the config keys and the option that fixes it.
    with pytest.raises(MetarunError, match="use model=conv4_embedding"):
        build_experiment(compose_config(["algo=protonet", "data.download=false"]))  # before any data is read
    with pytest.raises(MetarunError, match="algo=matchingnet classifies .* needs classification data"):
        build_experiment(compose_config(["algo=matchingnet", "data=sinusoid", "model=mlp"]))
    for overrides, words in ((["algo=protonet", "algo.distance=manhattan"], "algo.distance must be one of"),
                             (["algo=matchingnet", "algo.fce=true", "algo.fce_steps=0"],
                              "algo.fce_steps must be at least 1 with algo.fce=true")):
        with pytest.raises(MetarunError, match=words):
            build(compose_config(overrides).algo, model=Flatten(), problem="classification")


@pytest.fixture
def tiny(shared_data_root, omniglot_cache_dir):
    # Metric-based algorithms have no eval_inner_steps to set.
    return [o for o in TINY_OMNIGLOT if not o.startswith("algo.")] + omniglot_location(shared_data_root,
                                                                                      omniglot_cache_dir)


@pytest.mark.parametrize("train_ways, overrides", [
    (5, ["algo=protonet", "data.train_queries=2"]),
    (4, ["algo=matchingnet", "algo.fce=true", "algo.fce_steps=2", "algo.transductive=false"]),
])
def test_tiny_runs_train_on_more_ways_than_they_test_on(tmp_path, tiny, train_ways, overrides):
    train(compose_config(tiny + overrides + ["model=conv4_embedding", f"data.train_ways={train_ways}"]), tmp_path)
    metrics = read_metrics(tmp_path)
    test = metrics["test"]
    assert test["episodes"] == 6 and len(test["per_step"]) == 1 and 0 <= test["accuracy"] <= 1
    assert all(math.isfinite(v) for v in (test["accuracy"], test["ci95"], metrics["val"]["accuracy"]))
    assert (metrics["protocol"]["ways"], metrics["protocol"]["train_ways"]) == (3, train_ways)
    assert metrics["protocol"]["eval_inner_steps"] == 0


def test_protonet_with_the_default_headed_conv4_is_a_one_line_error(tmp_path, tiny):
    with pytest.raises(MetarunError, match="use model=conv4_embedding") as error:
        train(compose_config(tiny + ["algo=protonet"]), tmp_path)
    assert "\n" not in str(error.value)
