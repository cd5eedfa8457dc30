"""Bad hyper-parameters (docs/SPEC.md, shared rules): the right exception, a message naming what
was expected and what was given, and no state touched by the failed call.
p, num_groups, window, burnin, eps, momentum, rho, StochNorm's running statistics and mask;
the functional forms' eps like F.batch_norm's.
"""
import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext import functional as SF
from stochnorm_ext.cbn_window import CBNWindow

from errors_helpers import BACKEND, raises_untouched, randomized


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
    layer = randomized(cls(6, G, backend=BACKEND))  # construction is fine
    raises_untouched(layer, ValueError, rf"num_groups={G} splits each of the 6 channels into {G // 6} pieces.*got spatial shape",
                      lambda: layer(torch.randn(shape)))
    layer.eval()
    raises_untouched(layer, ValueError, "spatial shape", lambda: layer(torch.randn(shape)))


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
