"""BatchStatNorm's two forms (fused ``F.batch_norm`` under plain autograd, elementary ops under torch.func)
compute the same values and the same first- and second-order gradients, in float64."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, vmap

from metarun.models.batchnorm import BatchStatNorm


def norm(channels=3):
    torch.manual_seed(0)
    bn = BatchStatNorm(channels).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (7, 3)])
def test_fused_equals_elementary_to_second_order(shape):
    bn = norm(shape[1])
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    target = torch.randn(*shape, dtype=torch.float64)
    results = []
    for form in (bn.forward, bn.elementary):
        out = form(x)
        loss = ((out - target) ** 2).sum()
        g_x, g_w = torch.autograd.grad(loss, (x, bn.weight), create_graph=True)
        # a second-order quantity, as MAML's meta-gradient: d/dparams of a function of the first gradients
        second = torch.autograd.grad((g_x ** 2).sum() + (g_w ** 3).sum(), (x, bn.weight, bn.bias))
        results.append([out, g_x, g_w, *second])
    for fused, elementary in zip(*results):
        torch.testing.assert_close(fused, elementary, rtol=1e-9, atol=1e-8)  # terms of order 1e2


def test_forward_takes_the_fused_kernel_only_outside_torch_func(monkeypatch):
    bn = norm()
    calls = []
    original = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    bn(x)
    assert calls == [1]
    vmap(bn)(x[None].expand(2, -1, -1, -1, -1))
    grad(lambda t: bn(t).pow(2).sum())(x)
    assert calls == [1]  # vmap and grad took the elementary form


def test_one_value_per_channel_normalises_to_the_bias():
    bn = norm()
    x = torch.randn(1, 3, dtype=torch.float64)
    torch.testing.assert_close(bn(x), bn.bias.detach()[None].expand(1, -1))


def test_fused_form_passes_gradgradcheck():
    bn = norm()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    f = lambda t, w, b: torch.nn.functional.batch_norm(t, None, None, w, b, True, 0.0, bn.eps)  # noqa: E731
    inputs = (x, bn.weight.detach().requires_grad_(), bn.bias.detach().requires_grad_())
    assert gradcheck(f, inputs) and gradgradcheck(f, inputs)
