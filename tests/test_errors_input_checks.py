"""Bad input at call time (docs/SPEC.md, shared rules): the right exception, a message naming what
was expected and what was given, and no state touched by the failed call.
The input's dims, channels, dtype and device; the functional forms' tensors on different
devices and CBN's conv arguments; CBN's input and its bound conv, and ``bind``'s argument.
"""
import pytest
import torch
from torch import nn

import stochnorm_ext as sx
from stochnorm_ext import functional as SF
from stochnorm_ext.cbn_window import CBNWindow

from errors_helpers import BACKEND, LAYER_NAMES, bound_cbn, layers, raises_untouched, randomized


# ------------------------------------------------------------------- input checks (call time)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_wrong_number_of_dims(name):
    layer = layers()[name]
    for shape in [(4, 6), (4, 6, 5), (2, 6, 2, 2, 2)]:
        raises_untouched(layer, ValueError, rf"expected 4D input, got {len(shape)}D input of shape",
                          lambda: layer(torch.randn(shape)))


@pytest.mark.parametrize("cls,ok_dims,bad", [
    (sx.StochNorm1d, (2, 3), (2, 6, 2, 2)), (sx.StochNorm3d, (5,), (2, 6, 2, 2)),
    (sx.BatchGroupNorm1d, (2, 3), (2, 6, 2, 2, 2)), (sx.BatchGroupNorm3d, (5,), (2, 6, 4)),
])
def test_wrong_number_of_dims_1d_3d(cls, ok_dims, bad):
    layer = randomized(cls(6, 3, backend=BACKEND) if "Group" in cls.__name__ else cls(6, backend=BACKEND))
    want = " or ".join(f"{d}D" for d in ok_dims)
    raises_untouched(layer, ValueError, rf"expected {want} input, got {len(bad)}D",
                      lambda: layer(torch.randn(bad)))


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_channel_mismatch(name):
    layer = layers()[name]
    raises_untouched(layer, ValueError, r"expected 6 channels.*got input of shape \(2, 5, 4, 4\)",
                      lambda: layer(torch.randn(2, 5, 4, 4)))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_integer_dtype(name, dtype):
    layer = layers()[name]
    x = torch.randint(0, 2, (2, 6, 4, 4)).to(dtype)
    raises_untouched(layer, TypeError, rf"expected a float16, bfloat16, float32 or float64 input, got {dtype}",
                      lambda: layer(x))


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_input_on_another_device(name):
    layer = layers()[name]
    x = torch.randn(2, 6, 4, 4, device="meta")
    raises_untouched(layer, RuntimeError, r"input is on meta.*on cpu", lambda: layer(x))


def test_functional_tensors_on_different_devices():
    x = torch.randn(4, 6, 3, 3)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    w = torch.randn(6)
    meta = lambda t: t.to("meta")  # noqa: E731
    calls = {
        "weight": lambda: SF.stoch_norm(x, rm, rv, meta(w), training=True, backend=BACKEND),
        "running_mean": lambda: SF.stoch_norm(x, meta(rm), rv, training=True, backend=BACKEND),
        "bias": lambda: SF.batch_group_norm(x, 3, rm[:3], rv[:3], w, meta(w), training=True, backend=BACKEND),
        "running_var": lambda: SF.cross_iteration_batch_norm(x, running_mean=rm, running_var=meta(rv),
                                                             training=True, backend=BACKEND),
        "mask": lambda: SF.stoch_norm(x, rm, rv, training=True, mask=torch.ones(6, dtype=torch.bool, device="meta"),
                                      backend=BACKEND),
    }
    for name, call in calls.items():
        rm0, rv0 = rm.clone(), rv.clone()
        with pytest.raises(RuntimeError, match=rf"{name} is on meta but the input is on cpu"):
            call()
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_functional_cbn_conv_arguments_checked_before_any_update():
    conv_w = torch.randn(6, 3, 3, 3)
    conv_in = torch.randn(2, 3, 4, 4)
    x = torch.nn.functional.conv2d(conv_in, conv_w, padding=1)
    win = CBNWindow.empty(3, 6, conv_w.shape)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    bad = {
        "conv_input is on meta": dict(conv_input=conv_in.to("meta"), conv_weight=conv_w, padding=1),
        "needs conv_weight": dict(conv_input=conv_in, conv_weight=None, padding=1),
        r"spatial size \(2, 2\).*spatial size \(4, 4\)": dict(conv_input=conv_in, conv_weight=conv_w, padding=0),
        r"conv_weight of shape \(6, 1, 3, 3\) with groups=3": dict(conv_input=conv_in, conv_weight=conv_w[:, :1],
                                                                 padding=1, groups=3),
    }
    for match, kw in bad.items():
        before = [t.clone() for t in win] + [rm.clone(), rv.clone()]
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            SF.cross_iteration_batch_norm(x, window=win, running_mean=rm, running_var=rv, training=True,
                                          backend=BACKEND, **kw)
        for a, b in zip(list(win) + [rm, rv], before):
            assert torch.equal(a, b)
    # and the good call works and pushes one entry
    SF.cross_iteration_batch_norm(x, conv_in, conv_w, win, running_mean=rm, running_var=rv, training=True,
                                  padding=1, backend=BACKEND)
    assert int(win.step) == 1 and int(win.valid.sum()) == 1


def test_cbn_input_not_from_bound_conv():
    conv, cbn = bound_cbn()
    conv(torch.randn(2, 3, 4, 4))
    raises_untouched(cbn, RuntimeError, r"bound conv did not produce this input.*\(2, 6, 3, 3\)",
                      lambda: cbn(torch.randn(2, 6, 3, 3)))
    # no stale capture either: a later call without running the conv fails as well
    raises_untouched(cbn, RuntimeError, "did not produce", lambda: cbn(torch.randn(2, 6, 4, 4)))


def test_cbn_input_computed_from_the_bound_conv_output():
    # Same shape, but not the conv's output: the stored Jacobians would belong to another
    # activation, so the layer must refuse it (identity of the captured output, not shape).
    conv, cbn = bound_cbn()
    x = torch.randn(2, 3, 4, 4)
    raises_untouched(cbn, RuntimeError, "must directly follow the conv",
                      lambda: cbn(torch.relu(conv(x))))
    raises_untouched(cbn, RuntimeError, "must directly follow the conv",
                      lambda: cbn(conv(x).clone()))
    cbn(conv(x))  # the conv's own output still works


# ------------------------------------------------------------------- CBN binding
def test_cbn_window_in_training_needs_bind():
    cbn = randomized(sx.CrossIterationBatchNorm2d(4, window=3, backend=BACKEND))
    raises_untouched(cbn, RuntimeError, r"window=3 needs its conv in training: call bind\(conv\)",
                      lambda: cbn(torch.randn(2, 4, 3, 3)))
    assert cbn.eval()(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)  # eval needs no conv


def test_bind_checks_its_argument():
    cbn = sx.CrossIterationBatchNorm2d(4, window=3)
    with pytest.raises(TypeError, match="expects an nn.Conv2d, got Linear"):
        cbn.bind(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="the conv has 5 output channels, the layer has 4 features"):
        cbn.bind(nn.Conv2d(3, 5, 1))
