"""CBN's window steps as single ops (``cbn_window_compensate``, ``cbn_window_store``,
csrc/cbn_window.h) against their plain-PyTorch definitions in ``stochnorm_ext.cbn_window``, on
random windows (never zeros): values, which slots they write, what they leave alone, their
launches and their errors. On the CPU kernels, and on the CUDA ones where a GPU is there."""
from __future__ import annotations

import pytest
import torch

from stochnorm_ext import cbn_window
from stochnorm_ext.cbn_window import CBNWindow

from conftest import available

pytestmark = pytest.mark.skipif(not available("cpu", "cpu"), reason="the C++ CPU backend is not available")

if available("cpu", "cpu"):
    from stochnorm_ext.backend import compiled
    from stochnorm_ext.backend.compiled.ops import defaults as ops

DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=pytest.mark.skipif(not (torch.cuda.is_available() and available("cuda", "cuda")),
                                                          reason="no CUDA device or no CUDA kernels"))]
device_param = pytest.mark.parametrize("device", DEVICES)


def _on(device, *tensors):
    return tuple(t.to(device) if t is not None else None for t in tensors)


def _window(K, C, G, I, dtype, *, head=1, step=5, filled=None, seed=0, device="cpu"):
    """A window of random contents: K slots, C channels, G conv groups, I weights per channel."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(K, generator=g) < 0.7 if filled is None else torch.full((K,), filled)
    return _on_window(device, CBNWindow(
        mean=torch.randn(K, C, generator=g, dtype=dtype) + 0.5,
        var=torch.rand(K, C, generator=g, dtype=dtype) + 0.1,
        dmu=torch.randn(K, G, I, generator=g, dtype=dtype),
        dvar=torch.randn(K, C, I, generator=g, dtype=dtype) * 0.1,
        dmu_w=torch.randn(K, C, generator=g, dtype=torch.float64),
        dvar_w=torch.randn(K, C, generator=g, dtype=torch.float64) * 0.1,
        valid=valid, head=torch.tensor(head), step=torch.tensor(step)))


def _on_window(device, window):
    return CBNWindow(*_on(device, *window))


def _weight(C, G, I, dtype=torch.float32, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, I // 9, 3, 3, generator=g, dtype=dtype).to(device)


def _clone(window):
    return CBNWindow(*(t.clone() for t in window))


SHAPES = [(3, 6, 1, 27), (2, 8, 2, 18), (1, 4, 4, 9)]  # (K, C, G, I): one, two and depthwise-like groups


@pytest.mark.parametrize("K,C,G,I", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("burnin,step", [(0, 5), (3, 5), (9, 5)])
@device_param
def test_compensate_matches_definition(K, C, G, I, dtype, burnin, step, device):
    window = _window(K, C, G, I, dtype, step=step, device=device)
    weight = _weight(C, G, I, dtype, device=device)
    before = _clone(window)
    got = compiled.compensated_past(window, weight, 0.7, burnin)
    want = cbn_window.compensated_past(window, weight, 0.7, burnin)
    # the same products; the float64 arithmetic after them may round in another order
    torch.testing.assert_close(got[0], want[0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-14, atol=1e-14)
    assert got[0].dtype == got[1].dtype == torch.float64
    assert torch.equal(got[2], want[2]) and got[2].any() == (burnin <= step and bool(window.valid.any()))
    for a, b in zip(window, before):
        assert torch.equal(a, b)  # read only


@pytest.mark.parametrize("K,C,G,I", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("burnin,step", [(0, 5), (5, 5), (9, 5)])
@pytest.mark.parametrize("given_dots", [False, True])
@device_param
def test_store_matches_definition(K, C, G, I, dtype, burnin, step, given_dots, device):
    """The head slot gets the entry (once the burn-in is over: else nothing but the step
    counter changes); the other slots keep theirs."""
    window = _window(K, C, G, I, dtype, head=K - 1, step=step, device=device)
    weight = _weight(C, G, I, device=device)
    g = torch.Generator().manual_seed(5)
    mu_t, var_t = torch.randn(C, generator=g, dtype=dtype), torch.rand(C, generator=g, dtype=dtype) + 0.2
    dmu, dvar = torch.randn(G, I // 9, 3, 3, generator=g, dtype=dtype), torch.randn(C, I // 9, 3, 3, generator=g,
                                                                                      dtype=dtype)
    dots = (torch.randn(C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64)) \
        if given_dots else None
    mu_t, var_t, dmu, dvar = _on(device, mu_t, var_t, dmu, dvar)
    dots = None if dots is None else _on(device, *dots)
    got, want = _clone(window), _clone(window)
    compiled.push_entry(got, mu_t, var_t, dmu, dvar, weight, burnin, dots)
    cbn_window.push_entry(want, mu_t, var_t, dmu, dvar, weight, burnin, dots)
    stored = burnin <= step
    assert got.head.item() == want.head.item() == (0 if stored else K - 1)
    assert got.step.item() == want.step.item() == step + 1
    for field in CBNWindow._fields:  # the same products and copies: the same values
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    if stored:
        assert not torch.equal(got.mean, window.mean)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@device_param
def test_unmoved_weight_compensates_by_exactly_zero(dtype, device):
    """The store takes <., W(tau)> with the routine the compensation takes <., W(t)> with."""
    K, C, G, I = 2, 6, 2, 27
    window = _window(K, C, G, I, dtype, head=0, filled=False, device=device)
    weight = _weight(C, G, I, device=device)
    for _ in range(K):
        mu_t, var_t = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.1
        compiled.push_entry(window, *_on(device, mu_t, var_t, torch.randn(G, I, dtype=dtype),
                                         torch.randn(C, I, dtype=dtype)), weight, 0)
    past_mean, past_var, keep = compiled.compensated_past(window, weight, 1.0, 0)
    assert torch.equal(past_mean, window.mean.double()) and torch.equal(past_var, window.var.double())
    assert keep.all()


def test_half_window_is_written_back():
    """A window converted with the model (``.half()``) is read and written through converted copies."""
    K, C, G, I = 2, 4, 1, 9
    window = _window(K, C, G, I, torch.float32)
    half = CBNWindow(*(t.half() if t.dtype == torch.float32 else t for t in window))
    weight = _weight(C, G, I)
    mu_t, var_t = torch.randn(C), torch.rand(C) + 0.1
    dmu, dvar = torch.randn(G, I), torch.randn(C, I)
    want = _clone(half)
    compiled.push_entry(half, mu_t, var_t, dmu, dvar, weight, 0)
    cbn_window.push_entry(want, mu_t, var_t, dmu, dvar, weight, 0)
    for field in ("mean", "var", "dmu", "dvar", "valid", "head", "step"):
        assert torch.equal(getattr(half, field), getattr(want, field)), field
    torch.testing.assert_close(half.dvar_w, want.dvar_w, rtol=2e-3, atol=2e-3)


def _launches(fn, *args):
    before = torch.ops.stochnorm_ext._device_launches()
    fn(*args)
    return torch.ops.stochnorm_ext._device_launches() - before


@device_param
def test_launches(device):
    """compensate: the two dot-product matmuls, then one index step; store: the two matmuls
    (none with given dot products), the two Jacobian rows' index_copy_, one index step writing
    the slot's statistics, one advancing head and step (every index reads them first). A
    window and weight of one float dtype need no conversion."""
    K, C, G, I = 3, 6, 1, 27
    window = _window(K, C, G, I, torch.float32, device=device)
    weight = _weight(C, G, I, device=device)
    entry = _on(device, torch.randn(C), torch.rand(C), torch.randn(G, I), torch.randn(C, I))
    assert _launches(compiled.compensated_past, window, weight, 1.0, 0) == 3
    assert _launches(compiled.push_entry, window, *entry, weight, 0) == 6
    dots = _on(device, torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64))
    assert _launches(compiled.push_entry, window, *entry, weight, 0, dots) == 4


@pytest.mark.parametrize("bad", ["dvar_shape", "weight_shape", "valid_dtype", "entry_shape", "head_dtype",
                                 "head_outside", "no_slots"])
def test_store_errors_leave_the_window_untouched(bad):
    K, C, G, I = 2, 4, 1, 9
    window = _window(K, C, G, I, torch.float32)
    weight = _weight(C, G, I)
    args = dict(mu_t=torch.randn(C), var_t=torch.rand(C), dmu=torch.randn(G, I), dvar=torch.randn(C, I))
    if bad == "dvar_shape":
        window = window._replace(dvar=torch.randn(K, C + 1, I))
    elif bad == "weight_shape":
        weight = torch.randn(C, 2, 3, 3)
    elif bad == "valid_dtype":
        window = window._replace(valid=window.valid.long())
    elif bad == "entry_shape":
        args["mu_t"] = torch.randn(C + 1)
    elif bad == "head_dtype":
        window = window._replace(head=window.head.int())
    elif bad == "head_outside":  # a corrupted state: refused before anything is written
        window = window._replace(head=torch.tensor(K))
    else:
        window = CBNWindow(*(t[:0] if t.dim() and t.shape[0] == K else t for t in window))
    before = _clone(window)
    with pytest.raises((RuntimeError, IndexError), match="cbn_window_store" if bad != "head_outside" else "index"):
        ops.cbn_window_store(*window, *args.values(), weight, None, None, 0)
    for a, b in zip(window, before):
        assert torch.equal(a, b)
