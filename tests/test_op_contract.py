"""The C++ provider against the op contract (docs/DESIGN.md): the statistics ops, norm_apply and
norm_backward against ``stochnorm_ext.reference`` in float64, their mutation and autograd
semantics, and the device launches each op makes (counted in the Device abstraction of
csrc/ops_impl.h, read with the private op ``stochnorm_ext::_device_launches``).

The samples of tests/test_ops.py drive opcheck on the same ops.
"""
from __future__ import annotations

import pytest
import torch

from stochnorm_ext import reference

from conftest import available

pytestmark = pytest.mark.skipif(not available("cpu", "cpu"), reason="the C++ CPU backend is not available")

if available("cpu", "cpu"):
    from stochnorm_ext.backend.compiled.ops import defaults as ops
else:  # pragma: no cover
    ops = None

D = torch.float64


def _data(*shape, offset=0.3):
    return torch.randn(*shape, dtype=D) * 1.5 + offset


def _state(n):
    return _data(n) * 0.2, _data(n).abs() + 0.5, torch.tensor(4)


def launches(fn, *args):
    """(result, device launches fn made)."""
    before = torch.ops.stochnorm_ext._device_launches()
    out = fn(*args)
    return out, torch.ops.stochnorm_ext._device_launches() - before


# ----------------------------------------------------------------------------- statistics ops
@pytest.mark.parametrize("momentum", [0.2, None])
def test_stoch_norm_stats_matches_reference(momentum):
    C = 5
    x, mask = _data(4, C, 3, 3), torch.tensor([True, False, True, True, False])
    rm, rv, nbt = _state(C)
    want_rm, want_rv, want_nbt = rm.clone(), rv.clone(), nbt.clone()
    center, var, red = ops.stoch_norm_stats(x, rm, rv, mask, momentum, nbt, True)
    bv, bm = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    M = x.numel() // C
    torch.testing.assert_close(center, torch.where(mask, bm, want_rm))  # pre-update running statistics
    torch.testing.assert_close(var, torch.where(mask, bv, want_rv))
    torch.testing.assert_close(red, torch.where(mask, 1.0 / M, 0.0).to(D))
    reference.update_running_stats(want_rm, want_rv, bm, bv, M, momentum, want_nbt)
    torch.testing.assert_close(rm, want_rm)
    torch.testing.assert_close(rv, want_rv)
    assert nbt.item() == want_nbt.item() == 5


@pytest.mark.parametrize("G", [1, 2, 6, 12, 24])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_batch_group_norm_stats_matches_reference(G, fmt):
    C = 6
    x = (_data(3, C, 4, 2, offset=1e4) + torch.arange(C, dtype=D).view(1, C, 1, 1))
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv, nbt = _state(G)
    want_rm, want_rv = rm.clone(), rv.clone()
    center, var, red = ops.batch_group_norm_stats(x, G, rm, rv, None, nbt, True)
    grouped = x.reshape(3, G, -1)
    bv, bm = torch.var_mean(grouped, dim=(0, 2), correction=0)
    torch.testing.assert_close(center, bm, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(var, bv, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(red, torch.full((G,), 1.0 / (x.numel() // G), dtype=D))
    reference.update_running_stats(want_rm, want_rv, bm, bv, x.numel() // G, None, torch.tensor(4))
    torch.testing.assert_close(rm, want_rm, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rv, want_rv, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("K", [0, 3])
def test_cross_iteration_norm_stats_matches_reference(K):
    C = 5
    x = _data(4, C, 3, 3)
    past_mean, past_var, keep = _data(K, C), _data(K, C).abs() + 0.5, torch.rand(K, C) < 0.6
    rm, rv, nbt = _state(C)
    want_rm, want_rv = rm.clone(), rv.clone()
    mu_t, var_t, center, var, red = ops.cross_iteration_norm_stats(x, rm, rv, past_mean, past_var, keep, 0.3,
                                                                   nbt, True)
    bv, bm = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    mu, pooled_var, count = reference.pool_window(bm, bv, past_mean, past_var, keep)
    torch.testing.assert_close(mu_t, bm)
    torch.testing.assert_close(var_t, bv)
    torch.testing.assert_close(center, mu)
    torch.testing.assert_close(var, pooled_var)
    torch.testing.assert_close(red, 1.0 / (count * (x.numel() // C)))
    reference.update_running_stats(want_rm, want_rv, bm, bv, x.numel() // C, 0.3)
    torch.testing.assert_close(rm, want_rm)
    torch.testing.assert_close(rv, want_rv)


def test_stats_ops_are_not_differentiable_and_bump_versions():
    C = 4
    x = torch.randn(3, C, 2, 2, requires_grad=True)
    rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(0)
    versions = rm._version, rv._version, nbt._version
    outs = ops.stoch_norm_stats(x, rm, rv, torch.ones(C, dtype=torch.bool), 0.1, nbt, True)
    assert not any(t.requires_grad for t in outs)
    assert (rm._version, rv._version, nbt._version) > versions and all(
        now > before for now, before in zip((rm._version, rv._version, nbt._version), versions))
    outs = ops.batch_group_norm_stats(x, 2, None, None, 0.1, None, False)
    assert not any(t.requires_grad for t in outs)


def test_update_stats_false_changes_nothing():
    C = 4
    x = torch.randn(3, C, 2, 2)
    rm, rv, nbt = torch.randn(C), torch.rand(C) + 0.5, torch.tensor(7)
    before = rm.clone(), rv.clone()
    ops.stoch_norm_stats(x, rm, rv, torch.ones(C, dtype=torch.bool), None, nbt, False)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and nbt.item() == 7


@pytest.mark.parametrize("bad", ["no_step_count", "one_value", "mask_shape", "running_shape"])
def test_stats_op_errors_leave_state_untouched(bad):
    C = 4
    x = torch.randn(1, C, 1, 1) if bad == "one_value" else torch.randn(3, C, 2, 2)
    rm, rv, nbt = torch.randn(C), torch.rand(C) + 0.5, torch.tensor(2)
    mask = torch.ones(C + (bad == "mask_shape"), dtype=torch.bool)
    running_var = torch.rand(C + 1) if bad == "running_shape" else rv
    momentum, count = (None, None) if bad == "no_step_count" else (0.1, nbt)
    before = rm.clone(), rv.clone()
    match = {"no_step_count": "num_batches_tracked", "one_value": "more than 1 value", "mask_shape": "mask",
             "running_shape": "running_var"}[bad]
    with pytest.raises(RuntimeError, match=match):
        ops.stoch_norm_stats(x, rm, running_var, mask, momentum, count, True)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and nbt.item() == 2


# ----------------------------------------------------------------------------- apply and backward
@pytest.mark.parametrize("G", [1, 2, 6, 12])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_stats_then_apply_gradients_match_reference(G, fmt):
    """Training BGN as the two ops: y and the gradients of x, weight, bias (through norm_apply's
    C++ autograd and the one norm_backward) equal autograd through reference.batch_group_norm."""
    C = 6
    x = _data(3, C, 4, 2)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, dy = _data(C), _data(C), torch.randn(3, C, 4, 2, dtype=D)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    stats = ops.batch_group_norm_stats(leaves[0], G, None, None, 0.1, None, False)
    y = ops.norm_apply(*leaves, *stats, G, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want_y = reference.batch_group_norm(ref_leaves[0], G, ref_leaves[1], ref_leaves[2], None, None, True, 0.1, 1e-5)
    want = torch.autograd.grad(want_y, ref_leaves, dy)
    torch.testing.assert_close(y, want_y)
    for g, wg in zip(got, want):
        torch.testing.assert_close(g, wg)


def test_norm_apply_gradcheck():
    """The affine path (red None: constant statistics) against finite differences; with red the
    backward also carries the statistics' dependence on x (checked against the reference above)."""
    for G in (2, 4, 8):
        x = torch.randn(3, 4, 2, 2, dtype=D, requires_grad=True)
        w, b = torch.randn(4, dtype=D, requires_grad=True), torch.randn(4, dtype=D, requires_grad=True)
        center, var = torch.randn(G, dtype=D), torch.rand(G, dtype=D) + 0.5
        assert torch.autograd.gradcheck(lambda x, w, b: ops.norm_apply(x, w, b, center, var, None, G, 1e-5),
                                        (x, w, b))


def test_norm_backward_output_mask():
    x, dy = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    center, var, red = torch.randn(2), torch.rand(2) + 0.5, torch.full((2,), 0.1)
    w = torch.randn(4, dtype=torch.float64)
    full = ops.norm_backward(dy, x, w, center, var, red, 2, 1e-5, [True, True, True])
    part = ops.norm_backward(dy, x, w, center, var, red, 2, 1e-5, [False, True, False])
    assert part[0].numel() == 0 and part[2].numel() == 0
    torch.testing.assert_close(part[1], full[1])
    assert full[1].dtype == full[2].dtype == torch.float64  # the weight's dtype


def test_differentiating_norm_backward_raises():
    x = torch.randn(3, 4, 2, 2, dtype=D, requires_grad=True)
    stats = ops.batch_group_norm_stats(x, 2, None, None, 0.1, None, False)
    y = ops.norm_apply(x, None, None, *stats, 2, 1e-5)
    (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


# ----------------------------------------------------------------------------- launches
@pytest.mark.parametrize("G", [1, 2, 6, 12])
def test_launches_per_op(G):
    """CPU launches (one per pass / coefficient step / ATen launch); the CUDA side adds one
    merge per reduction pass where it splits (tests/test_cuda_backend.py)."""
    C = 6
    x, dy = torch.randn(4, C, 4, 4), torch.randn(4, C, 4, 4)
    rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(0)
    mask = torch.rand(C) < 0.5
    _, n = launches(ops.stoch_norm_stats, x, rm, rv, mask, 0.1, None, True)
    assert n == 2  # stats + coefficient step (statistics, EMA)
    _, n = launches(ops.stoch_norm_stats, x, rm, rv, mask, None, nbt, True)
    assert n == 2 and nbt.item() == 1  # the stats pass also counts the step
    grm, grv = torch.zeros(G), torch.ones(G)
    stats, n = launches(ops.batch_group_norm_stats, x, G, grm, grv, 0.1, nbt, True)
    assert n == 2 and nbt.item() == 2  # stats (and the step count) + ONE coefficient step whatever G
    _, n = launches(ops.cross_iteration_norm_stats, x, rm, rv, torch.randn(2, C), torch.rand(2, C),
                    torch.rand(2, C) < 0.5, 0.1, None, True)
    assert n == 2
    w, b = torch.randn(C), torch.randn(C)
    _, n = launches(ops.norm_apply, x, w, b, *stats, G, 1e-5)
    assert n == 1  # the apply pass reads the statistic tables itself
    _, n = launches(ops.norm_backward, dy, x, w, *stats, G, 1e-5, [True, True, True])
    assert n == 3  # sums + ONE coefficient step + apply, whatever G


def test_launches_of_a_training_step():
    """StochNorm through the backend: stats op + norm_apply forward, norm_backward backward."""
    from stochnorm_ext.backend import compiled as _backend_cpu
    C = 8
    x = torch.randn(2, C, 2, 2, requires_grad=True)
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(0)
    y, n = launches(_backend_cpu.stoch_norm, x, w, b, rm, rv, torch.rand(C) < 0.5, True, None, 1e-5, True, nbt)
    assert n == 3 and nbt.item() == 1  # stats (+ step count), coefficients (+ EMA), apply
    _, n = launches(y.backward, torch.randn_like(y))
    assert n == 3
    # an expanded gradient (y.sum()) is made dense once: one copy, not one per pass
    y = _backend_cpu.stoch_norm(x, w, b, rm, rv, torch.rand(C) < 0.5, True, None, 1e-5, True, nbt)
    _, n = launches(y.sum().backward)
    assert n == 4
