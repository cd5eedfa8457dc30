"""The nn.Module forms: StochNorm's mask (frequency, seeds, generators, explicit masks),
state dicts (BatchNorm compatibility, round trips), activation checkpointing of StochNorm
and BGN, and the module/functional plumbing (deepcopy, dtype/device moves)."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import stochnorm_ext as sx
from stochnorm_ext import functional as SF

from conftest import randomize_bn_

BACKEND = "reference"
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
STOCH = {1: sx.StochNorm1d, 2: sx.StochNorm2d, 3: sx.StochNorm3d}
BGN = {1: sx.BatchGroupNorm1d, 2: sx.BatchGroupNorm2d, 3: sx.BatchGroupNorm3d}
SHAPE = {1: (4, 6, 4), 2: (3, 6, 4, 3), 3: (2, 6, 3, 2, 2)}


def _randomize(m):
    return randomize_bn_(m, num_batches_tracked=11)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------- the mask
def _observed_mask(layer, x):
    """Which channels a training forward put on the batch branch, read off the output:
    the running mean sits far (+50) from the data, so the moving branch's output of a
    channel averages about -50 while the batch branch's averages 0 exactly. Every
    position of a channel must agree (one draw per channel, shared by all of them)."""
    with torch.no_grad():
        layer.running_mean.fill_(50.0)
        layer.running_var.fill_(1.0)
    y = layer(x).detach()
    dims = [0] + list(range(2, y.dim()))
    per_position = (y + 25.0 > 0)  # batch branch: |y| small; moving: about -50
    on_batch = per_position.all(dim=0)
    on_moving = (~per_position).all(dim=0)
    if y.dim() > 2:
        on_batch = on_batch.flatten(1).all(1)
        on_moving = on_moving.flatten(1).all(1)
    assert bool((on_batch ^ on_moving).all()), "a channel mixes both branches"
    # and the batch channels really are batch-normalised
    mean = y.mean(dim=dims)
    if bool(on_batch.any()):
        assert float(mean[on_batch].abs().max()) < 1e-4
    return on_batch


@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
def test_mask_frequency_matches_p(p):
    """C=4096 channels x 5 forwards: the fraction of batch-branch channels is within six
    standard deviations of p (the seed is fixed, so this cannot flake)."""
    C, draws = 4096, 5
    layer = sx.StochNorm1d(C, p=p, backend=BACKEND)
    picks = []
    for _ in range(draws):
        x = torch.randn(4, C)
        picks.append(_observed_mask(layer, x))
    picks = torch.stack(picks)
    n = picks.numel()
    freq = picks.float().mean().item()
    assert abs(freq - p) < 6 * math.sqrt(p * (1 - p) / n)
    # fresh draws each forward: consecutive masks differ
    assert not torch.equal(picks[0], picks[1])


def test_draw_mask_frequency_and_generator():
    C = 4096
    for p in (0.2, 0.7):
        g = torch.Generator().manual_seed(1)
        m = torch.stack([SF.draw_mask(C, p, generator=g) for _ in range(4)])
        assert m.dtype == torch.bool and m.shape == (4, C)
        assert abs(m.float().mean().item() - p) < 6 * math.sqrt(p * (1 - p) / m.numel())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(SF.draw_mask(C, 0.5, generator=g1), SF.draw_mask(C, 0.5, generator=g2))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_mask_p_extremes_exact(d, p):
    C = 64
    layer = STOCH[d](C, p=p, backend=BACKEND)
    shape = (3, C) + SHAPE[d][2:]
    for _ in range(3):
        mask = _observed_mask(layer, torch.randn(shape))
        assert bool(mask.all()) if p == 1.0 else not bool(mask.any())


def test_mask_channels_share_one_draw_and_both_branches_occur():
    layer = sx.StochNorm2d(32, p=0.5, backend=BACKEND)
    mask = _observed_mask(layer, torch.randn(4, 32, 3, 3))
    assert 0 < int(mask.sum()) < 32


def test_seed_reproduces_mask_outputs_and_state():
    C = 64
    a = _randomize(sx.StochNorm2d(C, p=0.5, backend=BACKEND)).double()
    b = copy.deepcopy(a)
    xs = [torch.randn(3, C, 2, 2, dtype=torch.float64) for _ in range(3)]
    outs = []
    for layer in (a, b):
        torch.manual_seed(1234)
        outs.append([layer(x) for x in xs])
    for ya, yb in zip(*outs):
        assert torch.equal(ya, yb)
    _assert_state_equal(_state(a), _state(b))
    # another seed draws other masks (2^-64 chance of a coincidence per call)
    c = _randomize(sx.StochNorm2d(C, p=0.5, backend=BACKEND)).double()
    c.load_state_dict(b.state_dict())
    torch.manual_seed(1234)
    y1 = c(xs[0])
    torch.manual_seed(4321)
    y2 = c(xs[0])  # running stats moved, but the moving branch alone cannot explain it
    m1 = (y1 - F.batch_norm(xs[0], None, None, c.weight, c.bias, True)).abs().amax((0, 2, 3)) < 1e-9
    m2 = (y2 - F.batch_norm(xs[0], None, None, c.weight, c.bias, True)).abs().amax((0, 2, 3)) < 1e-9
    assert not torch.equal(m1, m2)


def test_functional_generator_argument():
    C = 64
    x = torch.randn(4, C, 3, dtype=torch.float64)
    rm, rv = torch.randn(C, dtype=torch.float64), 0.5 + torch.rand(C, dtype=torch.float64)

    def run(gen):
        return SF.stoch_norm(x, rm.clone(), rv.clone(), training=True, p=0.5, generator=gen,
                             backend=BACKEND)
    rng = torch.get_rng_state()
    y1 = run(torch.Generator().manual_seed(9))
    y2 = run(torch.Generator().manual_seed(9))
    y3 = run(torch.Generator().manual_seed(10))
    assert torch.equal(torch.get_rng_state(), rng), "an explicit generator must not consume the default one"
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    # the documented draw: one bool bernoulli_(p) per channel from the generator, True = batch branch
    want_mask = torch.empty(C, dtype=torch.bool).bernoulli_(0.5, generator=torch.Generator().manual_seed(9))
    want = SF.stoch_norm(x, rm.clone(), rv.clone(), training=True, mask=want_mask, backend=BACKEND)
    assert torch.equal(y1, want)


def test_functional_explicit_mask_overrides_p():
    C = 6
    x = torch.randn(5, C, 4, dtype=torch.float64)
    rm, rv = torch.randn(C, dtype=torch.float64), 0.5 + torch.rand(C, dtype=torch.float64)
    all_batch = torch.ones(C, dtype=torch.bool)
    y = SF.stoch_norm(x, rm.clone(), rv.clone(), training=True, p=0.0, mask=all_batch, backend=BACKEND)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
    none = torch.zeros(C, dtype=torch.bool)
    y = SF.stoch_norm(x, rm.clone(), rv.clone(), training=True, p=1.0, mask=none, backend=BACKEND)
    torch.testing.assert_close(y, F.batch_norm(x, rm, rv, training=False))


# ------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("d", [1, 2, 3])
def test_stochnorm_state_dict_is_batchnorm_state_dict(d):
    C = 6
    bn = _randomize(BN[d](C))
    sn = STOCH[d](C, backend=BACKEND)
    a, b = bn.state_dict(), sn.state_dict()
    assert list(a.keys()) == list(b.keys())
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    sn.load_state_dict(a)  # strict
    _assert_state_equal(sn.state_dict(), a)
    x = torch.randn(SHAPE[d])
    torch.testing.assert_close(sn.eval()(x), bn.eval()(x), rtol=1e-6, atol=1e-6)
    # and back: a StochNorm checkpoint loads into nn.BatchNorm
    bn2 = BN[d](C)
    bn2.load_state_dict(sn.state_dict())
    torch.testing.assert_close(bn2.eval()(x), bn.eval()(x))


def test_old_batchnorm_checkpoint_without_num_batches_tracked_loads():
    bn = _randomize(nn.BatchNorm2d(4))
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    for layer in (sx.StochNorm2d(4), sx.CrossIterationBatchNorm2d(4), sx.BatchGroupNorm2d(4, 4)):
        layer.num_batches_tracked.fill_(5)
        layer.load_state_dict(sd)
        assert int(layer.num_batches_tracked) == 0
        torch.testing.assert_close(layer.running_var, bn.running_var)


def _trained(layer, shape, steps=2):
    _randomize(layer)
    for _ in range(steps):
        layer(torch.randn(shape)).sum().backward()
    return layer


@pytest.mark.parametrize("kind,d", [(k, d) for k in ("stochnorm", "bgn", "bgn_pieces", "bgn_norunning")
                                     for d in (1, 2, 3)] + [("cbn", 2)])
def test_state_dict_round_trip(kind, d):
    C, shape = 6, SHAPE[d]
    make = {
        "stochnorm": lambda: STOCH[d](C, p=0.3, backend=BACKEND),
        "bgn": lambda: BGN[d](C, 3, backend=BACKEND),
        "bgn_pieces": lambda: BGN[d](C, 2 * C, backend=BACKEND),
        "bgn_norunning": lambda: BGN[d](C, 2, track_running_stats=False, backend=BACKEND),
        "cbn": lambda: sx.CrossIterationBatchNorm2d(C, window=1, backend=BACKEND),
    }[kind]
    src = make()
    if kind == "bgn_norunning":
        with torch.no_grad():
            src.weight.normal_()
            src.bias.normal_()
    else:
        _trained(src, shape)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = make()
    dst.load_state_dict(torch.load(buf))
    _assert_state_equal(src.state_dict(), dst.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)
    if kind == "bgn":  # (G,) statistics, (C,) affine
        assert dst.running_mean.shape == (3,) and dst.weight.shape == (C,)


def test_bgn_state_dict_rejects_wrong_group_count():
    src = sx.BatchGroupNorm2d(6, 3)
    dst = sx.BatchGroupNorm2d(6, 2)
    with pytest.raises(RuntimeError, match="running_mean"):
        dst.load_state_dict(src.state_dict())


# ------------------------------------------------------------------- activation checkpointing
def _block(kind):
    conv = nn.Conv2d(3, 6, 3, padding=1)
    norm = {"stochnorm": sx.StochNorm2d(6, p=0.5, backend=BACKEND),
            "bgn": sx.BatchGroupNorm2d(6, 3, backend=BACKEND),
            "bgn_pieces": sx.BatchGroupNorm2d(6, 12, backend=BACKEND)}[kind]
    _randomize(norm)
    return nn.Sequential(conv, norm, nn.ReLU(), nn.Conv2d(6, 4, 1)).double()


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("kind", ["stochnorm", "bgn", "bgn_pieces"])
def test_checkpointing_matches_plain_training(kind, use_reentrant):
    """One training forward is one step, also when checkpointing recomputes it: the same
    outputs, gradients, mask, running statistics and step count as without it."""
    plain = _block(kind)
    ckpt = copy.deepcopy(plain)
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ckpt.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(100 + step)
        ya = plain(xa)
        torch.manual_seed(100 + step)
        yb = checkpoint(ckpt, xb, use_reentrant=use_reentrant)
        torch.manual_seed(555)  # the recomputation must not depend on the RNG at backward time
        dy = torch.randn_like(ya)
        torch.manual_seed(777)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
        for (n, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-12, atol=1e-12, msg=n)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
        _assert_state_equal(_state(plain[1]), _state(ckpt[1]))
    assert int(ckpt[1].num_batches_tracked) == 11 + 3


def test_checkpointed_stochnorm_two_forwards_before_backward_raises():
    """The recomputation needs the mask its own forward drew: two checkpointed forwards of
    the layer before their backward cannot be served and must raise, not mix masks up."""
    block = _block("stochnorm")
    x1 = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = checkpoint(block, x1, use_reentrant=False) + checkpoint(block, x2, use_reentrant=False)
    with pytest.raises(RuntimeError, match="recomputed"):
        y.sum().backward()


# ------------------------------------------------------------------- plumbing
@pytest.mark.parametrize("kind", ["stochnorm", "bgn"])
def test_deepcopy_and_to_dtype(kind):
    layer = _trained({"stochnorm": sx.StochNorm2d(6, backend=BACKEND),
                      "bgn": sx.BatchGroupNorm2d(6, 2, backend=BACKEND)}[kind], SHAPE[2])
    twin = copy.deepcopy(layer)
    _assert_state_equal(_state(layer), _state(twin))
    twin(torch.randn(SHAPE[2]))
    assert not torch.equal(twin.running_mean, layer.running_mean)  # no shared buffers
    d = copy.deepcopy(layer).double()
    assert d.running_mean.dtype == d.weight.dtype == torch.float64
    x = torch.randn(SHAPE[2], dtype=torch.float64)
    assert d.eval()(x).dtype == torch.float64


def test_repr_names_hyper_parameters():
    assert "p=0.25" in repr(sx.StochNorm2d(4, p=0.25))
    assert "num_groups=8" in repr(sx.BatchGroupNorm2d(4, 8))
    r = repr(sx.CrossIterationBatchNorm2d(4, window=3, burnin=2, rho=0.5))
    assert "window=3" in r and "burnin=2" in r and "rho=0.5" in r


def test_default_backend_runs_and_agrees_with_reference():
    """backend=None picks the best available backend for the input's device (the C++ CPU
    kernels once built); it must agree with the reference."""
    x = torch.randn(4, 6, 3, 3)
    for make in (lambda b: sx.StochNorm2d(6, p=1.0, backend=b),
                 lambda b: sx.BatchGroupNorm2d(6, 3, backend=b),
                 lambda b: sx.CrossIterationBatchNorm2d(6, window=1, backend=b)):
        a, r = make(None), make("reference")
        torch.testing.assert_close(a(x), r(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.running_var, r.running_var, rtol=1e-5, atol=1e-5)


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("STOCHNORM_EXT_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        sx.StochNorm2d(4)(torch.randn(2, 4, 2, 2))
    monkeypatch.setenv("STOCHNORM_EXT_BACKEND", "reference")
    assert sx.StochNorm2d(4)(torch.randn(2, 4, 2, 2)).shape == (2, 4, 2, 2)
    # an explicit argument wins over the variable
    monkeypatch.setenv("STOCHNORM_EXT_BACKEND", "no-such-backend")
    assert sx.StochNorm2d(4, backend="reference")(torch.randn(2, 4, 2, 2)).shape == (2, 4, 2, 2)


def test_backend_environment_variable_read_at_every_call(monkeypatch):
    """The variable is read at each call (set or unset between two calls of one layer), and
    an empty value means unset."""
    layer = sx.BatchGroupNorm2d(4, 2)
    x = torch.randn(2, 4, 2, 2)
    monkeypatch.setenv("STOCHNORM_EXT_BACKEND", "")
    layer(x)
    monkeypatch.setenv("STOCHNORM_EXT_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        layer(x)
    monkeypatch.delenv("STOCHNORM_EXT_BACKEND")
    layer(x)


@pytest.mark.parametrize("kind", ["stoch", "bgn", "cbn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parametrized_weight_and_buffer_are_read(kind, training):
    """A parametrized weight and running mean (torch.nn.utils.parametrize) are what the layer
    uses, on every path (the layers read their tensors from the parameter and buffer dicts
    where they are there)."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, t):
            return 2 * t

    make = {"stoch": lambda: sx.StochNorm2d(6, p=1.0), "bgn": lambda: sx.BatchGroupNorm2d(6, 3),
            "cbn": lambda: sx.CrossIterationBatchNorm2d(6, window=1)}[kind]
    torch.manual_seed(0)
    plain, para = make(), make()
    _randomize(plain)
    para.load_state_dict(plain.state_dict())
    parametrize.register_parametrization(para, "weight", Double())
    parametrize.register_parametrization(para, "running_mean", Double(), unsafe=True)
    with torch.no_grad():
        plain.weight.mul_(2)
        plain.running_mean.mul_(2)
    plain.train(training), para.train(training)
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(para(x), plain(x))
