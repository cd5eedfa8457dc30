"""The C++ backends' shared tests (collected through tests/cpp_backend_suite.py by tests/test_cpu_backend.py
and tests/test_cuda_backend.py, which give the ``device`` fixture): the modules over
several training steps against the reference modules: outputs, gradients, running statistics,
CBN's window buffers; a float16 input through a float32 module.
"""
from __future__ import annotations

import pytest
import torch

import stochnorm_ext as sx

from cpp_backend_helpers import backend_of, make_input, rel_err


# ----------------------------------------------------------------------------- modules, several steps
def _train_steps(make_module, backend, steps, x_shape, fmt, device, seed=0):
    """Both backends run on ``device``: StochNorm's mask is drawn on the input's device, so the
    same seed gives the same masks only on the same device."""
    torch.manual_seed(seed)
    m = make_module(backend).double().to(device)
    g = torch.Generator().manual_seed(seed + 1)
    outs = []
    for _ in range(steps):
        x = make_input(torch.randn(x_shape, generator=g, dtype=torch.float64), torch.float64, fmt, device)
        y = m(x)
        y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(device))
        outs.append((y.detach(), x.grad))
    m.eval()
    x = torch.randn(x_shape, generator=g, dtype=torch.float64).to(device)
    outs.append((m(x).detach(), None))
    return m, outs


@pytest.mark.parametrize("kind", ["stoch1d", "stoch2d", "stoch3d", "bgn2d_div", "bgn2d_mul", "bgn1d", "bgn3d_mul"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_module_state_after_several_steps(device, kind, fmt):
    shapes = {"stoch1d": (6, 5, 4), "stoch2d": (4, 6, 3, 3), "stoch3d": (2, 4, 2, 3, 2),
              "bgn2d_div": (4, 6, 3, 3), "bgn2d_mul": (4, 6, 4, 4), "bgn1d": (6, 6), "bgn3d_mul": (2, 4, 2, 2, 2)}
    makers = {
        "stoch1d": lambda be: sx.StochNorm1d(5, p=0.5, momentum=None, backend=be),
        "stoch2d": lambda be: sx.StochNorm2d(6, p=0.5, backend=be),
        "stoch3d": lambda be: sx.StochNorm3d(4, p=0.3, backend=be),
        "bgn2d_div": lambda be: sx.BatchGroupNorm2d(6, num_groups=2, backend=be),
        "bgn2d_mul": lambda be: sx.BatchGroupNorm2d(6, num_groups=24, backend=be),
        "bgn1d": lambda be: sx.BatchGroupNorm1d(6, num_groups=3, backend=be),
        "bgn3d_mul": lambda be: sx.BatchGroupNorm3d(4, num_groups=8, backend=be),
    }
    if fmt == "channels_last" and len(shapes[kind]) not in (4, 5):
        pytest.skip("no channels_last form")
    m_dev, out_dev = _train_steps(makers[kind], backend_of(device), 4, shapes[kind], fmt, device)
    m_ref, out_ref = _train_steps(makers[kind], "reference", 4, shapes[kind], fmt, device)
    for (y1, g1), (y2, g2) in zip(out_dev, out_ref):
        assert rel_err(y1, y2) < 1e-10
        if g1 is not None:
            assert rel_err(g1, g2) < 1e-10
    for name, buf in m_ref.state_dict().items():
        assert rel_err(m_dev.state_dict()[name], buf) < 1e-10, name
    assert rel_err(m_dev.weight.grad, m_ref.weight.grad) < 1e-10


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cbn_window_state_after_several_steps(device, fmt):
    """CBN bound to a conv: outputs, gradients (input, conv weight, affine), running statistics
    and every window buffer over burn-in, filling and wrapping of the ring buffer."""
    def make(backend):
        torch.manual_seed(3)
        return sx.Conv2dCBN(3, 6, 3, padding=1, window=3, burnin=1, backend=backend)

    results = []
    for backend in (backend_of(device), "reference"):
        m = make(backend).double().to(device)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(7)
        outs = []
        for _ in range(5):
            x = make_input(torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.float64, fmt, device)
            opt.zero_grad()
            y = m(x)
            y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(device))
            outs.append((y.detach(), x.grad, m.conv.weight.grad.clone(), m.norm.weight.grad.clone()))
            opt.step()
        results.append((m, outs))
    (m1, o1), (m2, o2) = results
    for a, b in zip(o1, o2):
        for t1, t2 in zip(a, b):
            assert rel_err(t1, t2) < 1e-9
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s2:
        if s2[k].is_floating_point():
            assert rel_err(s1[k], s2[k]) < 1e-9, k
        else:
            assert torch.equal(s1[k], s2[k]), k


def test_mixed_precision_module(device):
    """A float16 input through a float32 module (the autocast case) against the reference."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 6, 6, device=device).half().requires_grad_()
    outs = []
    for backend in (backend_of(device), "reference"):
        torch.manual_seed(1)
        m = sx.StochNorm2d(16, p=0.5, backend=backend).to(device)
        xi = x.detach().clone().requires_grad_()
        y = m(xi)
        y.float().sum().backward()
        outs.append((y.float(), xi.grad.float(), m.running_var.clone()))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 2e-2
