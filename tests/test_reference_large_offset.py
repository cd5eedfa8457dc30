"""The reference layers in float32 on data at a large common offset (1e4 + randn)
against float64: no cancelling E[x^2] - E[x]^2.

Everything runs the ``reference`` backend explicitly: other test files compare the kernel
backends with it, so it has to be right on its own.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import stochnorm_ext as sx
from stochnorm_ext import functional as SF

from reference_helpers import BACKEND


# ------------------------------------------------------------------- numerics: large offset
def _offset_err(y32, y64):
    return float((y32.detach().double() - y64.detach()).abs().max())


def test_large_offset_stochnorm_and_bgn_float32():
    """1e4 + randn in float32: the statistics are as accurate as float32 allows (the mean's
    own rounding, like torch's BatchNorm), not E[x^2]-E[x]^2 garbage."""
    x = (1e4 + torch.randn(8, 6, 4, 4, dtype=torch.float64)).float()
    x64 = x.double()  # the same (rounded) values
    bn_err = _offset_err(F.batch_norm(x, None, None, training=True),
                         F.batch_norm(x64, None, None, training=True))
    tol = max(3 * bn_err, 1e-3)
    mask = torch.tensor([True, False, True, True, False, False])
    rm, rv = torch.full((6,), 1e4) + torch.randn(6), 0.5 + torch.rand(6)
    y32 = SF.stoch_norm(x, rm.clone(), rv.clone(), training=True, mask=mask, backend=BACKEND)
    y64 = SF.stoch_norm(x64, rm.double(), rv.double(), training=True, mask=mask, backend=BACKEND)
    assert _offset_err(y32, y64) < tol
    for G in (3, 12, 1):
        rmg, rvg = torch.full((G,), 1e4), torch.ones(G)
        rm32, rv32, rm64, rv64 = rmg.clone(), rvg.clone(), rmg.double(), rvg.double()
        y32 = SF.batch_group_norm(x, G, rm32, rv32, training=True, backend=BACKEND)
        y64 = SF.batch_group_norm(x64, G, rm64, rv64, training=True, backend=BACKEND)
        assert _offset_err(y32, y64) < tol, G
        torch.testing.assert_close(rv32.double(), rv64, rtol=1e-3, atol=1e-3)


def test_large_offset_cbn_float32():
    """CBN at a 1e4 offset (from the conv bias) over several steps with a full window:
    float32 stays close to float64."""
    torch.manual_seed(3)
    conv64 = nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        conv64.bias.fill_(1e4)
    conv32 = copy.deepcopy(conv64).float()
    c64 = sx.CrossIterationBatchNorm2d(4, window=3, backend=BACKEND).double().bind(conv64)
    c32 = sx.CrossIterationBatchNorm2d(4, window=3, backend=BACKEND).bind(conv32)
    for step in range(5):
        inp = torch.randn(4, 3, 5, 5)
        h32 = conv32(inp)  # float64 normalises the same (rounded) conv output
        y32 = c32(h32)
        y64 = c64(h32.double(), conv_input=inp.double())
        assert _offset_err(y32, y64) < 3e-3, step
        g = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.01
        with torch.no_grad():  # the same small weight change in both
            conv64.weight += g
            conv32.weight += g.float()
    assert bool(c32.window_valid.all())
    torch.testing.assert_close(c32.running_var.double(), c64.running_var, rtol=1e-3, atol=1e-3)
