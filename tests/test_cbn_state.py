"""The CBN module's state: the window's ring buffer, checkpoints (state dicts, a BatchNorm's,
an unbound layer's), activation checkpointing, Conv2dCBN, deepcopy/pickle, rebinding."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import stochnorm_ext as sx
from cbn_helpers import (BACKEND, TIGHT, _assert_runs_equal, _assert_state_equal, _inputs, _model,
                         _train_steps)


def test_cbn_ring_buffer_state():
    """step counts every training step; nothing is stored during burn-in; then one entry per
    step goes to slot head, head wraps around window - 1 slots; eval changes nothing."""
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    cbn = sx.CrossIterationBatchNorm2d(4, window=3, burnin=2, backend=BACKEND).double().bind(conv)
    assert cbn.window_mean.shape == (2, 4) and cbn.window_dvar.shape == (2, 4, 3 * 3 * 3)
    assert cbn.window_dmu.shape == (2, 1, 3 * 3 * 3)
    expected_valid = [[False, False], [False, False], [True, False], [True, True], [True, True],
                      [True, True]]
    expected_head = [0, 0, 1, 0, 1, 0]
    means = []
    for step in range(6):
        h = conv(torch.randn(4, 3, 5, 5, dtype=torch.float64) + step)
        cbn(h)
        means.append(h.detach().mean((0, 2, 3)))
        assert int(cbn.step) == step + 1
        assert cbn.window_valid.tolist() == expected_valid[step], step
        assert int(cbn.window_head) == expected_head[step], step
    # slots hold the newest two steps (4 -> slot 0 and 5 -> slot 1 after wrapping)
    torch.testing.assert_close(cbn.window_mean[0], means[4])
    torch.testing.assert_close(cbn.window_mean[1], means[5])
    cbn.eval()
    before = {k: v.clone() for k, v in cbn.state_dict().items()}
    cbn(conv(torch.randn(4, 3, 5, 5, dtype=torch.float64)))
    for k, v in cbn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the step counter is CBN's own, not num_batches_tracked
    assert int(cbn.num_batches_tracked) == 6 and "step" in before
    cbn.reset_window()
    assert not cbn.window_valid.any() and int(cbn.window_head) == 0


def test_state_dict_mid_run_resumes_bit_exactly():
    inputs = _inputs(7)
    a = _model(window=3, burnin=1)
    _train_steps(a, inputs[:3])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert any(k.startswith("1.window_") for k in sd) and "1.step" in sd
    b = _model(seed=123, window=3, burnin=1)  # fresh, differently initialised, bound
    b.load_state_dict(sd)
    _assert_state_equal(a, b)
    _assert_runs_equal(_train_steps(a, inputs[3:]), _train_steps(b, inputs[3:]), exact=True)
    _assert_state_equal(a, b)


def test_batchnorm_state_dict_loads_into_bound_cbn_with_empty_window():
    a = _model(window=3)
    _train_steps(a, _inputs(3))
    assert a[1].window_valid.any()
    bn = nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(1000)
    a[1].load_state_dict(bn.state_dict())
    assert not a[1].window_valid.any() and int(a[1].window_head) == 0 and int(a[1].step) == 0
    torch.testing.assert_close(a[1].running_mean, bn.running_mean, rtol=0, atol=0)
    assert int(a[1].num_batches_tracked) == 1000
    # the next training step is plain BN (empty window), then the window fills again
    h = a[0](torch.randn(4, 3, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(a[1](h), bn(h.detach()), **TIGHT)
    assert int(a[1].window_valid.sum()) == 1


def test_cbn_checkpoint_into_unbound_cbn_raises():
    a = _model(window=3)
    _train_steps(a, _inputs(2))
    fresh = sx.CrossIterationBatchNorm2d(6, window=3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match="bind"):
        fresh.load_state_dict(a[1].state_dict())
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("scope", ["conv+cbn", "block", "cbn"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_is_one_step(use_reentrant, scope):
    """Checkpointing recomputes the forward in backward; the recomputation must neither push
    the window nor update running statistics again: outputs, gradients and state equal
    training without checkpointing."""
    inputs = _inputs(5)
    plain = _model(window=3, burnin=1)
    ckpt = copy.deepcopy(plain)
    if scope == "conv+cbn":
        def wrap(m, x):
            h = checkpoint(lambda t: m[1](m[0](t)), x, use_reentrant=use_reentrant)
            return m[3](m[2](h))
    elif scope == "block":
        def wrap(m, x):
            return checkpoint(m, x, use_reentrant=use_reentrant)
    else:  # only the CBN layer: the conv ran outside, its input was captured then
        def wrap(m, x):
            h = checkpoint(m[1], m[0](x), use_reentrant=use_reentrant)
            return m[3](m[2](h))
    _assert_runs_equal(_train_steps(plain, inputs), _train_steps(ckpt, inputs, wrap=wrap), exact=False)
    _assert_state_equal(plain, ckpt)
    assert int(ckpt[1].step) == 5 and int(ckpt[1].num_batches_tracked) == 5


@pytest.mark.parametrize("conv_kwargs", [dict(stride=2, padding=1, groups=2, dilation=2),
                                         dict(padding="same", padding_mode="reflect")])
def test_conv2dcbn_equals_bound_cbn(conv_kwargs):
    torch.manual_seed(0)
    fused = sx.Conv2dCBN(4, 6, 3, bias=True, window=3, burnin=1, rho=0.7, backend=BACKEND,
                         **conv_kwargs).double()
    conv = nn.Conv2d(4, 6, 3, bias=True, **conv_kwargs).double()
    cbn = sx.CrossIterationBatchNorm2d(6, window=3, burnin=1, rho=0.7, backend=BACKEND).double()
    conv.load_state_dict(fused.conv.state_dict())
    cbn.bind(conv)
    cbn.load_state_dict(fused.norm.state_dict())
    bound = nn.Sequential(conv, cbn)
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(5)]
    _assert_runs_equal(_train_steps(fused, inputs), _train_steps(bound, inputs), exact=False)
    sa, sb = fused.state_dict(), bound.state_dict()
    for k in sa:
        kb = k.replace("conv.", "0.").replace("norm.", "1.")
        torch.testing.assert_close(sa[k], sb[kb], **TIGHT, msg=k)
    assert int(fused.norm.window_valid.sum()) == 2


def _hook_targets(conv):
    return [h.cbn for h in conv._forward_hooks.values() if hasattr(h, "cbn")]


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_keep_the_hook_on_the_copied_layer(how):
    inputs = _inputs(6)
    model = _model(window=3)
    _train_steps(model, inputs[:2])
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin[1].bound_conv is twin[0]
    assert _hook_targets(twin[0]) == [twin[1]]
    assert _hook_targets(model[0]) == [model[1]]
    _assert_state_equal(model, twin)
    # the copy trains on its own: same results as the original, no cross-talk
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    rb = _train_steps(twin, inputs[2:4])
    for k, v in model.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    ra = _train_steps(model, inputs[2:4])
    _assert_runs_equal(ra, rb, exact=True)
    twin[1].unbind()
    assert len(twin[0]._forward_hooks) == 0 and len(model[0]._forward_hooks) == 1
    _train_steps(model, inputs[4:])  # the original still works


def test_eval_needs_no_conv_and_uses_running_stats():
    cbn = sx.CrossIterationBatchNorm2d(4, window=3, backend=BACKEND).double().eval()
    with torch.no_grad():
        cbn.running_mean.normal_()
        cbn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    bn = nn.BatchNorm2d(4).double().eval()
    bn.load_state_dict(cbn.state_dict(), strict=False)
    torch.testing.assert_close(cbn(x), bn(x), **TIGHT)


def test_rebinding_empties_the_window_and_moves_the_hook():
    a = _model(window=3)
    _train_steps(a, _inputs(3))
    other = nn.Conv2d(3, 6, 3, stride=2, padding=1).double()
    a[1].bind(other)
    assert not a[1].window_valid.any()
    assert len(a[0]._forward_hooks) == 0 and _hook_targets(other) == [a[1]]
    h = other(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    a[1](h)
    assert int(a[1].window_valid.sum()) == 1
