"""Shared by the CBN test files: a small float64 model (conv -> CBN -> ReLU -> conv), SGD
steps that record outputs and gradients, and exact comparisons of runs and state."""
import torch
from torch import nn

import stochnorm_ext as sx

BACKEND = "reference"
TIGHT = dict(rtol=1e-9, atol=1e-10)


def _model(seed=0, **cbn_kwargs):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=1).double()
    cbn = sx.CrossIterationBatchNorm2d(6, backend=BACKEND, **cbn_kwargs).double()
    cbn.bind(conv)
    return nn.Sequential(conv, cbn, nn.ReLU(), nn.Conv2d(6, 2, 1).double())


def _train_steps(model, inputs, lr=0.3, wrap=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    for inp in inputs:
        x = inp.clone().requires_grad_()
        y = wrap(model, x) if wrap else model(x)
        assert bool(torch.isfinite(y).all())
        y.square().mean().backward()
        outs.append((y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
    return outs


def _inputs(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(n)]


def _assert_runs_equal(ra, rb, exact=True):
    kw = dict(rtol=0, atol=0) if exact else TIGHT
    for (ya, ga, pa), (yb, gb, pb) in zip(ra, rb):
        torch.testing.assert_close(ya, yb, **kw)
        torch.testing.assert_close(ga, gb, **kw)
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, **kw)


def _assert_state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
