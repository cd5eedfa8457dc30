"""Bad input (docs/SPEC.md, shared rules): the right exception, a message naming what was
expected and what was given, and no state touched by the failed call. N == 0 inputs."""
import pytest
import torch
from torch import nn

import stochnorm_ext as sx
from stochnorm_ext import functional as SF
from stochnorm_ext.cbn_window import CBNWindow

from conftest import available

BACKEND = "reference"


def _randomized(layer):
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.normal_()
            layer.bias.normal_()
        if layer.running_mean is not None:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2)
            layer.num_batches_tracked.fill_(4)
    return layer


def _bound_cbn(window=3, burnin=0):
    conv = nn.Conv2d(3, 6, 3, padding=1)
    cbn = _randomized(sx.CrossIterationBatchNorm2d(6, window=window, burnin=burnin,
                                                   backend=BACKEND)).bind(conv)
    for _ in range(2):  # a non-empty window and step counter to protect
        cbn(conv(torch.randn(2, 3, 4, 4)))
    assert int(cbn.window_valid.sum()) == 2
    return conv, cbn


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_untouched(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert torch.equal(v, before[k]), f"{k} changed by a call that raised"


def _raises_untouched(module, exc, match, call):
    before = _snapshot(module)
    with pytest.raises(exc, match=match) as info:
        call()
    _assert_untouched(module, before)
    return info


def _layers():
    """One of each layer in training, with non-trivial state."""
    return {
        "StochNorm2d": _randomized(sx.StochNorm2d(6, backend=BACKEND)),
        "BatchGroupNorm2d": _randomized(sx.BatchGroupNorm2d(6, 3, backend=BACKEND)),
        "BatchGroupNorm2d_pieces": _randomized(sx.BatchGroupNorm2d(6, 12, backend=BACKEND)),
        "CrossIterationBatchNorm2d": _bound_cbn()[1],
        "CrossIterationBatchNorm2d_w1": _randomized(sx.CrossIterationBatchNorm2d(6, window=1, backend=BACKEND)),
    }


LAYER_NAMES = list(_layers())


# ------------------------------------------------------------------- input checks (call time)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_wrong_number_of_dims(name):
    layer = _layers()[name]
    for shape in [(4, 6), (4, 6, 5), (2, 6, 2, 2, 2)]:
        _raises_untouched(layer, ValueError, rf"expected 4D input, got {len(shape)}D input of shape",
                          lambda: layer(torch.randn(shape)))


@pytest.mark.parametrize("cls,ok_dims,bad", [
    (sx.StochNorm1d, (2, 3), (2, 6, 2, 2)), (sx.StochNorm3d, (5,), (2, 6, 2, 2)),
    (sx.BatchGroupNorm1d, (2, 3), (2, 6, 2, 2, 2)), (sx.BatchGroupNorm3d, (5,), (2, 6, 4)),
])
def test_wrong_number_of_dims_1d_3d(cls, ok_dims, bad):
    layer = _randomized(cls(6, 3, backend=BACKEND) if "Group" in cls.__name__ else cls(6, backend=BACKEND))
    want = " or ".join(f"{d}D" for d in ok_dims)
    _raises_untouched(layer, ValueError, rf"expected {want} input, got {len(bad)}D",
                      lambda: layer(torch.randn(bad)))


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_channel_mismatch(name):
    layer = _layers()[name]
    _raises_untouched(layer, ValueError, r"expected 6 channels.*got input of shape \(2, 5, 4, 4\)",
                      lambda: layer(torch.randn(2, 5, 4, 4)))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_integer_dtype(name, dtype):
    layer = _layers()[name]
    x = torch.randint(0, 2, (2, 6, 4, 4)).to(dtype)
    _raises_untouched(layer, TypeError, rf"expected a float16, bfloat16, float32 or float64 input, got {dtype}",
                      lambda: layer(x))


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_input_on_another_device(name):
    layer = _layers()[name]
    x = torch.randn(2, 6, 4, 4, device="meta")
    _raises_untouched(layer, RuntimeError, r"input is on meta.*on cpu", lambda: layer(x))


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
    conv, cbn = _bound_cbn()
    conv(torch.randn(2, 3, 4, 4))
    _raises_untouched(cbn, RuntimeError, r"bound conv did not produce this input.*\(2, 6, 3, 3\)",
                      lambda: cbn(torch.randn(2, 6, 3, 3)))
    # no stale capture either: a later call without running the conv fails as well
    _raises_untouched(cbn, RuntimeError, "did not produce", lambda: cbn(torch.randn(2, 6, 4, 4)))


def test_cbn_input_computed_from_the_bound_conv_output():
    # Same shape, but not the conv's output: the stored Jacobians would belong to another
    # activation, so the layer must refuse it (identity of the captured output, not shape).
    conv, cbn = _bound_cbn()
    x = torch.randn(2, 3, 4, 4)
    _raises_untouched(cbn, RuntimeError, "must directly follow the conv",
                      lambda: cbn(torch.relu(conv(x))))
    _raises_untouched(cbn, RuntimeError, "must directly follow the conv",
                      lambda: cbn(conv(x).clone()))
    cbn(conv(x))  # the conv's own output still works


# ------------------------------------------------------------------- hyper-parameters (construction)
@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match="p must be"):
        sx.StochNorm2d(4, p=p)
    with pytest.raises(ValueError, match="p must be"):
        SF.stoch_norm(torch.randn(3, 4), torch.zeros(4), torch.ones(4), training=True, p=p)
    with pytest.raises(ValueError, match="p must be"):
        SF.draw_mask(4, p)


def test_p_wrong_type():
    with pytest.raises(TypeError, match="p must be a real number, got str"):
        sx.StochNorm2d(4, p="0.5")


@pytest.mark.parametrize("C,G", [(6, 4), (6, 9), (8, 12), (4, 0), (4, -2)])
def test_num_groups_neither_divides_nor_multiple(C, G):
    match = rf"num_groups={G}" if G > 0 else "num_groups must be >= 1"
    with pytest.raises(ValueError, match=match):
        sx.BatchGroupNorm2d(C, G)
    with pytest.raises(ValueError, match=match):
        SF.batch_group_norm(torch.randn(2, C, 4, 4), G, training=True)


def test_num_groups_not_int():
    with pytest.raises(TypeError, match="num_groups must be an int, got float"):
        sx.BatchGroupNorm2d(4, 2.0)


@pytest.mark.parametrize("G,shape", [(12, (2, 6, 7, 7)), (18, (2, 6, 2, 2)), (12, (4, 6))])
def test_pieces_need_divisible_spatial_size_at_call_time(G, shape):
    d = len(shape) - 2
    cls = {0: sx.BatchGroupNorm1d, 1: sx.BatchGroupNorm1d, 2: sx.BatchGroupNorm2d}[d]
    layer = _randomized(cls(6, G, backend=BACKEND))  # construction is fine
    _raises_untouched(layer, ValueError, rf"num_groups={G} splits each of the 6 channels into {G // 6} pieces.*got spatial shape",
                      lambda: layer(torch.randn(shape)))
    layer.eval()
    _raises_untouched(layer, ValueError, "spatial shape", lambda: layer(torch.randn(shape)))


@pytest.mark.parametrize("window", [0, -1])
def test_window_below_one(window):
    with pytest.raises(ValueError, match=rf"window must be >= 1, got {window}"):
        sx.CrossIterationBatchNorm2d(4, window=window)
    with pytest.raises(ValueError, match="window must be >= 1"):
        CBNWindow.empty(window, 4, (4, 3, 3, 3))


def test_window_and_burnin_types():
    with pytest.raises(TypeError, match="window must be an int"):
        sx.CrossIterationBatchNorm2d(4, window=2.5)
    with pytest.raises(TypeError, match="burnin must be an int"):
        sx.CrossIterationBatchNorm2d(4, burnin=None)


def test_burnin_below_zero():
    with pytest.raises(ValueError, match="burnin must be >= 0, got -1"):
        sx.CrossIterationBatchNorm2d(4, burnin=-1)
    with pytest.raises(ValueError, match="burnin must be >= 0"):
        SF.cross_iteration_batch_norm(torch.randn(2, 4, 2, 2), training=True, burnin=-1)


@pytest.mark.parametrize("kw,match", [
    (dict(momentum=1.5), "momentum must be <= 1"), (dict(momentum=-0.1), "momentum must be >= 0"),
    (dict(eps=-1e-5), "eps must be positive"), (dict(eps=0.0), "eps must be positive"),
    (dict(num_features=0), "num_features must be >= 1"),
])
def test_other_hyper_parameters(kw, match):
    kw = dict(kw)
    C = kw.pop("num_features", 4)
    for make in (lambda: sx.StochNorm2d(C, **kw), lambda: sx.BatchGroupNorm2d(C, max(C, 1), **kw),
                 lambda: sx.CrossIterationBatchNorm2d(C, **kw)):
        with pytest.raises(ValueError, match=match):
            make()


def test_cbn_rho_must_be_finite():
    with pytest.raises(ValueError, match="rho must be finite"):
        sx.CrossIterationBatchNorm2d(4, rho=float("nan"))


def test_stochnorm_needs_running_stats():
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        sx.StochNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="needs running statistics"):
        SF.stoch_norm(torch.randn(3, 4), None, None, training=True)


def test_stochnorm_bad_mask():
    x = torch.randn(3, 4, 2)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    for mask, got in [(torch.ones(5, dtype=torch.bool), r"shape \(5,\)"),
                      (torch.ones(4), "torch.float32"), ([True] * 4, "list")]:
        with pytest.raises(ValueError, match=rf"mask must be a bool tensor of shape \(4,\), got .*{got}"):
            SF.stoch_norm(x, rm, rv, training=True, mask=mask)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# ------------------------------------------------------------------- M == 1
@pytest.mark.parametrize("case", ["stoch1d", "stoch2d", "bgn_div", "bgn_pieces", "cbn_w1", "cbn_window"])
def test_one_value_per_statistic_in_training(case):
    if case == "stoch1d":
        layer, x = _randomized(sx.StochNorm1d(4, backend=BACKEND)), torch.randn(1, 4)
    elif case == "stoch2d":
        layer, x = _randomized(sx.StochNorm2d(4, backend=BACKEND)), torch.randn(1, 4, 1, 1)
    elif case == "bgn_div":  # G = C: one value per channel
        layer, x = _randomized(sx.BatchGroupNorm1d(4, 4, backend=BACKEND)), torch.randn(1, 4)
    elif case == "bgn_pieces":  # G = 2C on 2 positions: one value per piece
        layer, x = _randomized(sx.BatchGroupNorm1d(4, 8, backend=BACKEND)), torch.randn(1, 4, 2)
    elif case == "cbn_w1":
        layer, x = _randomized(sx.CrossIterationBatchNorm2d(4, window=1, backend=BACKEND)), torch.randn(1, 4, 1, 1)
    else:
        conv, layer = _bound_cbn()
        x = conv(torch.randn(1, 3, 1, 1))
    _raises_untouched(layer, ValueError, r"expected more than 1 value per statistic when training, got input of shape",
                      lambda: layer(x))
    layer.eval()  # fine in eval, which uses the running statistics
    assert layer(x).shape == x.shape


def test_one_value_per_statistic_functional():
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm0 = rm.clone()
    with pytest.raises(ValueError, match="more than 1 value"):
        SF.stoch_norm(torch.randn(1, 4), rm, rv, training=True)
    with pytest.raises(ValueError, match="more than 1 value"):
        SF.batch_group_norm(torch.randn(1, 4), 4, rm, rv, training=True)
    with pytest.raises(ValueError, match="more than 1 value"):  # no running stats: batch stats in eval too
        SF.batch_group_norm(torch.randn(1, 4), 4, training=False)
    with pytest.raises(ValueError, match="more than 1 value"):
        SF.cross_iteration_batch_norm(torch.randn(1, 4, 1, 1), running_mean=rm, running_var=rv, training=True)
    assert torch.equal(rm, rm0)


# ------------------------------------------------------------------- CBN binding
def test_cbn_window_in_training_needs_bind():
    cbn = _randomized(sx.CrossIterationBatchNorm2d(4, window=3, backend=BACKEND))
    _raises_untouched(cbn, RuntimeError, r"window=3 needs its conv in training: call bind\(conv\)",
                      lambda: cbn(torch.randn(2, 4, 3, 3)))
    assert cbn.eval()(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)  # eval needs no conv


def test_bind_checks_its_argument():
    cbn = sx.CrossIterationBatchNorm2d(4, window=3)
    with pytest.raises(TypeError, match="expects an nn.Conv2d, got Linear"):
        cbn.bind(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="the conv has 5 output channels, the layer has 4 features"):
        cbn.bind(nn.Conv2d(3, 5, 1))


# ------------------------------------------------------------------- backends
def test_unknown_backend():
    for make in (lambda: sx.StochNorm2d(4, backend="fast"), lambda: sx.BatchGroupNorm2d(4, 2, backend="fast"),
                 lambda: sx.CrossIterationBatchNorm2d(4, backend="fast")):
        with pytest.raises(ValueError, match="unknown backend 'fast'; expected one of reference, cpu, triton, cuda"):
            make()
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        SF.stoch_norm(torch.randn(3, 4), rm, rv, training=True, backend="fast")
    assert torch.equal(rm, torch.zeros(4))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_backend_unavailable_here(backend):
    """A known backend that cannot run on this CPU tensor raises RuntimeError saying why;
    skipped where it is available for CPU tensors (C++ kernels built, Triton interpreter)."""
    from stochnorm_ext import backend as registry
    if sx.backends()[backend] is None and registry.runs_on(backend, torch.device("cpu")):
        pytest.skip(f"the {backend!r} backend runs on CPU tensors here")
    for name, make, shape in [("StochNorm2d", lambda: sx.StochNorm2d(4, backend=backend), (3, 4, 2, 2)),
                              ("BGN", lambda: sx.BatchGroupNorm2d(4, 2, backend=backend), (3, 4, 2, 2)),
                              ("CBN", lambda: sx.CrossIterationBatchNorm2d(4, window=1, backend=backend),
                               (3, 4, 2, 2))]:
        layer = _randomized(make())
        _raises_untouched(layer, RuntimeError, rf"backend '{backend}' (is not available|does not run on cpu)",
                          lambda: layer(torch.randn(shape)))
    with pytest.raises(RuntimeError, match=rf"backend '{backend}'"):
        SF.batch_group_norm(torch.randn(3, 4), 2, training=True, backend=backend)


def test_backends_report():
    report = sx.backends()
    assert set(report) == {"reference", "cpu", "triton", "cuda"}
    assert report["reference"] is None and "reference" in sx.available_backends()
    for name, reason in report.items():
        assert reason is None or (isinstance(reason, str) and reason)


# ------------------------------------------------------------------- N == 0
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", LAYER_NAMES + ["StochNorm1d", "BatchGroupNorm3d"])
def test_empty_batch(name, training):
    if name == "StochNorm1d":
        layer, shape = _randomized(sx.StochNorm1d(6, backend=BACKEND)), (0, 6)
    elif name == "BatchGroupNorm3d":
        layer, shape = _randomized(sx.BatchGroupNorm3d(6, 12, backend=BACKEND)), (0, 6, 2, 1, 2)
    else:
        layer, shape = _layers()[name], (0, 6, 4, 4)
    layer.train(training)
    conv = layer.bound_conv if isinstance(layer, sx.CrossIterationBatchNorm2d) else None
    before = _snapshot(layer)
    # (CBN: running the bound conv hands its input to the layer, which must get the conv's output)
    leaf = torch.randn((0, 3, 4, 4) if conv is not None else shape, requires_grad=True)
    x = conv(leaf) if conv is not None else leaf
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert leaf.grad.shape == leaf.shape
    if training:  # counted as a step, as nn.BatchNorm*d counts it; nothing else changes
        before["num_batches_tracked"] += 1
    _assert_untouched(layer, before)


@pytest.mark.parametrize("kind", ["stochnorm", "bgn", "cbn"])
def test_empty_batch_counts_like_batchnorm(kind):
    # momentum=None averages over num_batches_tracked, which nn.BatchNorm2d advances for an
    # empty batch too: batch, empty batch, batch must give BatchNorm's running statistics.
    bn = nn.BatchNorm2d(6, momentum=None)
    ours = {"stochnorm": lambda: sx.StochNorm2d(6, momentum=None, p=1.0, backend=BACKEND),
            "bgn": lambda: sx.BatchGroupNorm2d(6, 6, momentum=None, backend=BACKEND),
            "cbn": lambda: sx.CrossIterationBatchNorm2d(6, window=1, momentum=None, backend=BACKEND)}[kind]()
    for n in (3, 0, 5):
        x = torch.randn(n, 6, 4, 4)
        bn(x)
        ours(x)
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean, bn.running_mean)
    torch.testing.assert_close(ours.running_var, bn.running_var)


def test_empty_batch_functional_keeps_buffers():
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    x = torch.randn(0, 4, 3)
    assert SF.stoch_norm(x, rm, rv, training=True).shape == (0, 4, 3)
    assert SF.batch_group_norm(x, 2, rm[:2], rv[:2], training=True).shape == (0, 4, 3)
    assert SF.cross_iteration_batch_norm(torch.randn(0, 4, 2, 2), running_mean=rm, running_var=rv,
                                         training=True).shape == (0, 4, 2, 2)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# ------------------------------------------------------------------- the RNG (SPEC: state untouched)
@pytest.mark.parametrize("attr,value,match", [("eps", -1.0, "eps"), ("momentum", 2.0, "momentum")])
def test_stochnorm_failed_call_leaves_the_rng_alone(attr, value, match):
    # Like nn.BatchNorm*d, which draws nothing: a call that raises (here for a
    # hyper-parameter made invalid after construction) must not advance the global RNG.
    layer = _randomized(sx.StochNorm2d(6, p=0.5, backend=BACKEND))
    setattr(layer, attr, value)
    x = torch.randn(2, 6, 4, 4)
    rng = torch.get_rng_state()
    _raises_untouched(layer, ValueError, match, lambda: layer(x))
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("field,make", [
    ("mean", lambda w: w._replace(mean=w.mean.to("meta"))),
    ("step", lambda w: w._replace(step=w.step.to("meta"))),
    ("valid", lambda w: w._replace(valid=w.valid.float())),
])
def test_functional_cbn_window_checked_with_the_other_arguments(backend, field, make):
    # A window on another device (or of a wrong dtype) is named in the error, raised before
    # the running statistics or any other window tensor change.
    if not available(backend, "cpu"):
        pytest.skip(f"{backend} does not run on CPU tensors here")
    conv_w = torch.randn(6, 3, 3, 3)
    conv_in = torch.randn(2, 3, 4, 4)
    x = torch.nn.functional.conv2d(conv_in, conv_w, padding=1)
    win = make(CBNWindow.empty(3, 6, conv_w.shape))
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    before = [t.clone() for t in win] + [rm.clone(), rv.clone()]
    with pytest.raises((RuntimeError, TypeError), match=rf"window\.{field}"):
        SF.cross_iteration_batch_norm(x, conv_in, conv_w, win, running_mean=rm, running_var=rv,
                                      training=True, padding=1, backend=backend)
    for a, b in zip(list(win) + [rm, rv], before):
        assert a.device == b.device and (a.device.type == "meta" or torch.equal(a, b))


def test_functional_eps_like_f_batch_norm():
    # F.batch_norm: eps must be positive in training, non-negative in eval.
    x, rm, rv = torch.randn(4, 6, 3), torch.randn(6), torch.rand(6) + 0.5
    calls = [lambda eps, training: SF.stoch_norm(x, rm, rv, training=training, eps=eps, backend=BACKEND),
             lambda eps, training: SF.batch_group_norm(x, 3, rm[:3], rv[:3], training=training, eps=eps,
                                                       backend=BACKEND),
             lambda eps, training: SF.cross_iteration_batch_norm(x[..., None], running_mean=rm, running_var=rv,
                                                                 training=training, eps=eps, backend=BACKEND)]
    for call in calls:
        rm0 = rm.clone()
        with pytest.raises(ValueError, match="eps must be positive, got 0"):
            call(0.0, True)
        with pytest.raises(ValueError, match="eps must be non-negative"):
            call(-1.0, False)
        assert torch.equal(rm, rm0)
        call(0.0, False)  # eval with eps = 0, as F.batch_norm allows
