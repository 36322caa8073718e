"""The ``graphs`` execution path (metarun.cuda_graphs): a captured meta-gradient replays each new episode's
own meta-gradient, checks itself against eager execution, and is offered only where it is safe.

On a CPU the capture is ``eager_capture`` (the same static inputs and outputs, the function run again
at each replay), which proves everything but CUDA's capture itself; the CUDA tests run on a GPU."""

import logging

import pytest
import torch

from metarun import cuda_graphs
from metarun import execution as ex
from metarun.algos.mamlpp import MAMLpp
from metarun.algos.reptile import Reptile
from metarun.execution import Execution, meta_gradient
from metarun.models import Conv4
from support import float64_algorithms, random_image_episode

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 4


def network(out_features=WAYS):
    torch.manual_seed(0)
    return Conv4(out_features=out_features, hidden=4).double()


CAPTURABLE = {k: v for k, v in float64_algorithms(WAYS, SHOTS).items()
              if k in ("maml", "fomaml", "anil", "metasgd", "protonet", "matchingnet", "snail")}


def loop_gradient(algo, episode):
    algo.zero_grad(set_to_none=True)
    loss, metrics, _ = meta_gradient(algo, episode, iteration=3)
    return [None if p.grad is None else p.grad.clone() for p in algo.parameters()], loss, metrics


@pytest.mark.parametrize("name", sorted(CAPTURABLE))
def test_each_replay_gives_its_own_episodes_meta_gradient(name):
    algo = CAPTURABLE[name]()
    assert algo.capturable
    graphed = {}
    for seed in (0, 1):  # the first call captures; the second replays with the new episode copied in
        episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES, seed=seed)
        want, want_loss, want_metrics = loop_gradient(algo, episode)
        algo.zero_grad(set_to_none=True)
        loss, metrics, _ = cuda_graphs.meta_gradient(graphed, "shape", cuda_graphs.eager_capture, algo, episode, 3)
        got = [None if p.grad is None else p.grad for p in algo.parameters()]
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
        assert metrics.keys() == want_metrics.keys()
    assert len(graphed) == 1 and algo.tuned_batching is None  # one capture, and the algorithm's path restored


def test_gradients_are_returned_or_accumulated_like_the_other_paths():
    algo = CAPTURABLE["maml"]()
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES, seed=0)
    params = [p for p in algo.parameters()]
    graphed = {}
    _, _, grads = cuda_graphs.meta_gradient(graphed, "k", cuda_graphs.eager_capture, algo, episode, 0, params)
    assert all(p.grad is None for p in params)  # returned, .grad untouched
    cuda_graphs.meta_gradient(graphed, "k", cuda_graphs.eager_capture, algo, episode, 0)
    cuda_graphs.meta_gradient(graphed, "k", cuda_graphs.eager_capture, algo, episode, 0)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, 2 * g)  # accumulated, not aliased to the static outputs


def test_a_graph_whose_replay_differs_from_eager_is_refused():
    def corrupt_capture(fn):
        replay, outputs = cuda_graphs.eager_capture(fn)

        def wrong():
            replay()
            outputs[0].add_(1.0)  # a replay that computes something else than the eager step

        return wrong, outputs

    algo = CAPTURABLE["maml"]()
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    with pytest.raises(cuda_graphs.Unavailable, match="differs from the eager"):
        cuda_graphs.meta_gradient({}, "k", corrupt_capture, algo, episode, 0)

    def failing_capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(cuda_graphs.Unavailable, match="capture failed: operation not permitted"):
        cuda_graphs.meta_gradient({}, "k", failing_capture, algo, episode, 0)


def test_replaced_parameters_are_captured_anew():
    algo = CAPTURABLE["maml"]()
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    graphed = {}
    cuda_graphs.meta_gradient(graphed, "k", cuda_graphs.eager_capture, algo, episode, 0)
    first = graphed["k"]
    algo.model.head.weight = torch.nn.Parameter(algo.model.head.weight.detach().clone())
    cuda_graphs.meta_gradient(graphed, "k", cuda_graphs.eager_capture, algo, episode, 0)
    assert graphed["k"] is not first and graphed["k"].matches(list(algo.parameters()))


def test_the_race_counts_a_path_that_cannot_be_captured_as_failed():
    clock = [0.0]

    def run(path):
        if path == "graphs":
            raise cuda_graphs.Unavailable("capture failed: something")
        clock[0] += {"loop": 1.0, "vmap": 0.5}[path]

    path, best, why = ex.race(run, torch.device("cpu"), ("loop", "vmap", "graphs"), clock=lambda: clock[0])
    assert path == "vmap" and best["graphs"] == float("inf") and "faster by 50%" in why


def test_graphs_is_offered_only_on_cuda_for_iteration_independent_meta_losses(caplog):
    episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES)
    maml = CAPTURABLE["maml"]()
    assert not cuda_graphs.available(maml, episode, None)  # a CPU episode
    assert not MAMLpp(network(), "classification", inner_steps=2).capturable
    assert not Reptile(network(), "classification").capturable
    assert "graphs" not in Execution("auto", None, None).candidates(maml, "train", episode)
    with caplog.at_level(logging.WARNING, logger="metarun"):
        assert Execution("graphs", None, None).path(maml, "train", episode) == "loop"
    assert "the graphs path needs CUDA" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_on_cuda_a_pinned_graphs_run_equals_the_loop(name):
    algo = CAPTURABLE[name]().float().cuda()
    execution = Execution("graphs", None, None)
    for seed in (0, 1, 2):
        episode = random_image_episode(TASKS, WAYS, SHOTS, QUERIES, seed=seed).to("cuda", torch.float32)
        want, want_loss, _ = loop_gradient(algo, episode)
        algo.zero_grad(set_to_none=True)
        assert execution.path(algo, "train", episode) == "graphs"
        loss, _ = execution.meta_gradient(algo, episode)
        for p, w in zip(algo.parameters(), want):
            if w is not None:
                torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
