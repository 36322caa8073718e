"""The ``graphs`` execution path: a training shape's whole meta-gradient captured once in a CUDA graph.

On a GPU, a small network (Omniglot's Conv4 on 28x28 images) is launch-bound: a second-order
meta-gradient is thousands of tiny kernels, each costing more to launch from Python than to run.
A CUDA graph records them once and replays them with one launch. ``Graphed`` captures, per shape,
``meta_loss`` (on the ``vmap`` path, the fewest kernels) and ``torch.autograd.grad`` of it into
static output tensors; each meta-iteration copies the episode into static input tensors, replays,
and adds the static gradients into ``.grad``.

What a graph may hold is narrow, so the path is offered only where it is safe: on CUDA, for an
algorithm whose meta-loss is the same function at every iteration and draws no random numbers
(``capturable = True``: MAML, FOMAML, ANIL, Meta-SGD, ProtoNets, Matching Networks; not MAML++,
whose loss weights and derivative order change with the iteration, nor Reptile), without
``train.task_chunk``. The parameters must stay the same tensors (an optimiser updates them in place;
``.to()`` or ``.double()`` replaces them and the graph is captured again).

And it checks itself: right after capture, the graph's replay on the capture episode is compared
with the eager meta-gradient of the same episode; a mismatch, or any capture error, raises
``Unavailable`` and the execution module's race counts the path as failed, so a wrong graph never
trains a model. ``capture`` is the CUDA mechanism; tests pass ``eager_capture``, which replays the
same function eagerly into the same static outputs, to exercise the rest on a CPU.
"""

from collections.abc import Callable
from dataclasses import replace

import torch

WARMUP = 3  # eager iterations on a side stream before capture, as torch.cuda.graphs asks
CHECK = {"rtol": 1e-4, "atol": 1e-6}  # graph against eager, float32 (the paths' usual agreement)


class Unavailable(RuntimeError):
    """The path cannot run this shape (capture failed, or its replay differed from the eager result)."""


def available(algo, episode, chunk: int | None) -> bool:
    return episode.support_x.device.type == "cuda" and getattr(algo, "capturable", False) and chunk is None


def capture(fn: Callable[[], tuple]) -> tuple[Callable[[], None], tuple]:
    """CUDA: warm ``fn`` up on a side stream, capture one call in a graph. Returns (replay, static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph.replay, outputs


def eager_capture(fn: Callable[[], tuple]) -> tuple[Callable[[], None], tuple]:
    """A stand-in for ``capture`` on any device: replay runs ``fn`` again and writes into the same outputs."""
    outputs = fn()

    def replay():
        for static, new in zip(flatten(outputs), flatten(fn())):
            static.copy_(new)

    return replay, outputs


def flatten(outputs: tuple) -> list[torch.Tensor]:
    loss, metrics, grads = outputs
    return [loss, *metrics.values(), *(g for g in grads if g is not None)]


class Graphed:
    """One shape's captured meta-gradient. ``algo.tuned_batching`` must be the inner path (``vmap``) while it runs."""

    def __init__(self, algo, episode, iteration: int, params: list, capture: Callable = capture):
        self.params, self.ident = params, tuple(id(p) for p in params)
        self.inputs = [t.clone() for t in fields(episode)]
        self.static = episode_like(episode, self.inputs)

        def step():
            loss, metrics = algo.meta_loss(self.static, iteration)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads

        want = step()  # the eager result the graph must reproduce
        want = (want[0].clone(), {k: v.clone() for k, v in want[1].items()},
                tuple(None if g is None else g.clone() for g in want[2]))
        try:
            self.replay, self.outputs = capture(step)
            self.replay()
        except RuntimeError as e:  # capture forbids some operations (host syncs, CPU tensors)
            raise Unavailable(f"capture failed: {' '.join(str(e).split())[:120]}") from e
        got = flatten(self.outputs)
        if len(got) != len(flatten(want)) or not all(
                torch.allclose(g, w, **CHECK) for g, w in zip(got, flatten(want))):
            raise Unavailable("its replay differs from the eager meta-gradient")

    def matches(self, params: list) -> bool:
        return tuple(id(p) for p in params) == self.ident

    def __call__(self, episode) -> tuple:
        """(loss, metrics, grads) of ``episode``: views of the static outputs, valid until the next replay."""
        for static, new in zip(self.inputs, fields(episode)):
            static.copy_(new)
        self.replay()
        return self.outputs


def fields(episode) -> list[torch.Tensor]:
    return [episode.support_x, episode.support_y, episode.query_x, episode.query_y]


def episode_like(episode, tensors: list[torch.Tensor]):
    return replace(episode, support_x=tensors[0], support_y=tensors[1], query_x=tensors[2], query_y=tensors[3])


def meta_gradient(graphed: dict, key: str, capture: Callable, algo, episode, iteration: int, params: list | None = None):
    """``metarun.execution.meta_gradient`` on the graphs path, with ``graphed`` the captured shapes by ``key``:
    into ``.grad`` (``params`` None) or returned as gradients of ``params``. Returns (loss, metrics, grads)."""
    from metarun.execution import on_path  # (execution imports this module)

    wanted = params if params is not None else [p for p in algo.parameters() if p.requires_grad]
    with on_path(algo, "vmap"):
        if key not in graphed or not graphed[key].matches(wanted):
            graphed.pop(key, None)  # free the old graph's memory before capturing anew
            graphed[key] = Graphed(algo, episode, iteration, wanted, capture)
        loss, metrics, grads = graphed[key](episode)
    loss, metrics = loss.clone(), {k: v.clone() for k, v in metrics.items()}
    if params is not None:
        return loss, metrics, tuple(None if g is None else g.clone() for g in grads)
    for p, g in zip(wanted, grads):
        if g is not None:
            p.grad = g.clone() if p.grad is None else p.grad + g
    return loss, metrics, None
