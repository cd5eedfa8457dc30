"""Cross-Iteration BatchNorm against a published-style formulation written here (Python
lists of past steps, autograd Jacobians of the raw moments, the nu' - mu'^2 rule), and the
closed-form Jacobians against autograd. The window's state: test_cbn_state.py; the step's
cost and where the entry is stored: test_cbn_step_cost.py."""
import copy

import pytest
import torch
from torch import nn

import stochnorm_ext as sx

BACKEND = "reference"
EPS = 1e-5
TIGHT = dict(rtol=1e-9, atol=1e-10)


class PublishedCBN:
    """CBN the way the published code computes it, with eps inside the square root (our
    convention) and the burn-in of docs/SPEC.md (the first ``burnin`` steps are plain BN and
    store nothing). Past steps live in Python lists, newest first: (mu, nu, dmu/dW, dnu/dW,
    W) with the Jacobians from torch.autograd.grad of the channel mean and mean of squares.
    """

    def __init__(self, conv, C, window, burnin, rho, momentum, gamma, beta, rm, rv):
        self.conv, self.C, self.window, self.burnin, self.rho = conv, C, window, burnin, rho
        self.momentum = momentum
        self.gamma = gamma.detach().clone().requires_grad_()
        self.beta = beta.detach().clone().requires_grad_()
        self.rm, self.rv = rm.detach().clone(), rv.detach().clone()
        self.pre = []
        self.step = 0
        self.dropped = 0  # (entry, channel) pairs dropped by the nu' - mu'^2 < 0 rule
        self.max_shift = 0.0  # largest |mu' - mu_tau|: the compensation matters

    def parameters(self):
        return [self.gamma, self.beta]

    def __call__(self, inp):
        W = self.conv.weight
        x = self.conv(inp)
        C = self.C
        flat = x.transpose(0, 1).reshape(C, -1)
        mu_t = flat.mean(1)
        nu_t = (flat * flat).mean(1)
        use = self.window > 1 and self.step >= self.burnin
        mus, nus, keeps = [mu_t], [nu_t], [torch.ones(C, dtype=torch.bool)]
        if use:
            Wd = W.detach()
            for m, n, dm, dn, w_tau in self.pre:
                dW = Wd - w_tau
                m2 = m + self.rho * (dm * dW).flatten(1).sum(1)
                n2 = n + self.rho * (dn * dW).flatten(1).sum(1)
                keep = (n2 - m2 * m2) >= 0
                self.dropped += int((~keep).sum())
                self.max_shift = max(self.max_shift, float((m2 - m).abs().max()))
                mus.append(m2)
                nus.append(n2)
                keeps.append(keep)
            ones = torch.ones_like(mu_t)
            dmu = torch.autograd.grad(mu_t, W, ones, retain_graph=True)[0]
            dnu = torch.autograd.grad(nu_t, W, ones, retain_graph=True)[0]
        keep = torch.stack(keeps).to(x.dtype)
        count = keep.sum(0)
        mu = (torch.stack(mus) * keep).sum(0) / count
        var = (torch.stack(nus) * keep).sum(0) / count - mu * mu
        y = (x - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
        y = y * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)
        with torch.no_grad():
            M = flat.shape[1]
            var_unbiased = (nu_t - mu_t * mu_t) * M / (M - 1)
            self.rm.mul_(1 - self.momentum).add_(self.momentum * mu_t)
            self.rv.mul_(1 - self.momentum).add_(self.momentum * var_unbiased)
        if use:
            entry = (mu_t.detach(), nu_t.detach(), dmu, dnu, W.detach().clone())
            self.pre = [entry] + self.pre[: self.window - 2]
        self.step += 1
        return y


CONVS = {
    "stride2_pad1_groups2_dil2": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2,
                                      padding=1, groups=2, dilation=2),
    "same_asymmetric": dict(in_channels=4, out_channels=6, kernel_size=(2, 3), padding="same",
                            dilation=(1, 2)),
    "reflect_stride2": dict(in_channels=3, out_channels=6, kernel_size=3, stride=2, padding=1,
                            padding_mode="reflect"),
    "replicate_rect": dict(in_channels=3, out_channels=6, kernel_size=(3, 2), padding=(1, 2),
                           padding_mode="replicate", bias=False),
    "circular_groups3": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1,
                             padding_mode="circular", groups=3),
    "pointwise": dict(in_channels=3, out_channels=6, kernel_size=1, bias=False),
}


def _make_pair(conv_kwargs, window=3, burnin=2, rho=1.0, momentum=0.2, dtype=torch.float64):
    conv = nn.Conv2d(**conv_kwargs).to(dtype)
    C = conv.out_channels
    cbn = sx.CrossIterationBatchNorm2d(C, window=window, burnin=burnin, rho=rho, momentum=momentum,
                                       backend=BACKEND).to(dtype).bind(conv)
    with torch.no_grad():
        cbn.weight.copy_(1 + 0.4 * torch.randn(C))
        cbn.bias.copy_(0.3 * torch.randn(C))
        cbn.running_mean.copy_(torch.randn(C))
        cbn.running_var.copy_(0.5 + torch.rand(C))
    conv_ref = copy.deepcopy(conv)
    for hook_id in list(conv_ref._forward_hooks):  # the deep copy carries a hook; drop it
        del conv_ref._forward_hooks[hook_id]
    ref = PublishedCBN(conv_ref, C, window, burnin, rho, momentum, cbn.weight, cbn.bias,
                       cbn.running_mean, cbn.running_var)
    return conv, cbn, ref


def _compare_runs(conv, cbn, ref, steps, lr, N=4, HW=9, jump_at=None):
    Cin = conv.in_channels
    opt_a = torch.optim.SGD(list(conv.parameters()) + list(cbn.parameters()), lr=lr)
    opt_b = torch.optim.SGD(list(ref.conv.parameters()) + ref.parameters(), lr=lr)
    for step in range(steps):
        inp = torch.randn(N, Cin, HW, HW - 1, dtype=torch.float64) * 1.5 + 0.3
        ia, ib = inp.clone().requires_grad_(), inp.clone().requires_grad_()
        ya = cbn(conv(ia))
        yb = ref(ib)
        torch.testing.assert_close(ya, yb, **TIGHT, msg=f"output, step {step}")
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ia.grad, ib.grad, **TIGHT, msg=f"input grad, step {step}")
        torch.testing.assert_close(conv.weight.grad, ref.conv.weight.grad, **TIGHT,
                                   msg=f"conv weight grad, step {step}")
        if conv.bias is not None:
            torch.testing.assert_close(conv.bias.grad, ref.conv.bias.grad, **TIGHT)
        torch.testing.assert_close(cbn.weight.grad, ref.gamma.grad, **TIGHT)
        torch.testing.assert_close(cbn.bias.grad, ref.beta.grad, **TIGHT)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
        if jump_at == step:
            with torch.no_grad():
                g = torch.randn_like(conv.weight) * 3 * conv.weight.abs().mean()
                conv.weight += g
                ref.conv.weight += g
        torch.testing.assert_close(cbn.running_mean, ref.rm, **TIGHT)
        torch.testing.assert_close(cbn.running_var, ref.rv, **TIGHT)
        assert int(cbn.step) == ref.step


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", list(CONVS))
def test_cbn_matches_published_formulation(name):
    """6 SGD steps, window 3, burn-in 2, float64: outputs, input/conv-weight/affine grads and
    running statistics equal the published-style computation."""
    conv, cbn, ref = _make_pair(CONVS[name], window=3, burnin=2)
    _compare_runs(conv, cbn, ref, steps=6, lr=0.5)
    assert ref.max_shift > 1e-3, "the weights barely moved: the compensation went untested"
    assert int(cbn.window_valid.sum()) == 2


JACOBIAN_CONVS = {
    **CONVS,
    # 1x1 convs without padding take the pixel-covariance route where Cin (M + C) <= M C;
    # the last two do not (more input channels; padding).
    "pointwise_expand_bias": dict(in_channels=3, out_channels=8, kernel_size=1),
    "pointwise_stride2": dict(in_channels=4, out_channels=6, kernel_size=1, stride=2),
    "pointwise_reduce": dict(in_channels=8, out_channels=3, kernel_size=1),
    "pointwise_padded": dict(in_channels=3, out_channels=6, kernel_size=1, padding=1),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("route", ["unfold", "weight_grad"])
@pytest.mark.parametrize("batch_mean", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(JACOBIAN_CONVS))
def test_conv_jacobians_equal_autograd(name, channels_last, batch_mean, route, monkeypatch):
    """dmu = d mean(x_c)/dW_c and dvar = d mean((x_c - mu_c)^2)/dW_c with mu a constant, float64,
    against torch.autograd: mu not the batch mean (sync passes the group's), or the batch
    mean with ``mu_is_batch_mean=True``; on both routes of a general conv (products with the
    unfolded input for small inputs, conv weight-gradients beyond)."""
    routes = []
    pointwise = sx.cbn_window._pointwise_jacobians
    monkeypatch.setattr(sx.cbn_window, "_pointwise_jacobians",
                        lambda *args: routes.append("pointwise") or pointwise(*args))
    unfolded = sx.cbn_window._unfolded_jacobians
    monkeypatch.setattr(sx.cbn_window, "_unfolded_jacobians",
                        lambda *args: routes.append("unfold") or unfolded(*args))
    monkeypatch.setattr(sx.cbn_window, "UNFOLD_ELEMENTS", 1 << 16 if route == "unfold" else 0)
    torch.manual_seed(0)
    conv = nn.Conv2d(**JACOBIAN_CONVS[name]).double()
    inp = torch.randn(3, conv.in_channels, 7, 6, dtype=torch.float64) * 1.5 + 0.4
    if channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    x = conv(inp)
    C, G = conv.out_channels, conv.groups
    mu = x.detach().mean((0, 2, 3))
    if not batch_mean:
        mu = mu + 0.3 * torch.randn(C, dtype=torch.float64)
    dmu_ref = torch.autograd.grad(x.mean((0, 2, 3)).sum(), conv.weight, retain_graph=True)[0]
    dvar_ref = torch.autograd.grad(((x - mu.view(1, C, 1, 1)) ** 2).mean((0, 2, 3)).sum(), conv.weight)[0]
    dmu, dvar = sx.cbn_window.conv_jacobians(inp, conv.weight, x.detach(), mu,
                                             sx.cbn_window.ConvGeometry.from_conv(conv),
                                             mu_is_batch_mean=batch_mean)
    torch.testing.assert_close(dvar, dvar_ref, **TIGHT)
    torch.testing.assert_close(dmu.repeat_interleave(C // G, 0), dmu_ref, **TIGHT)
    pointwise_route = name.startswith("pointwise") and name not in ("pointwise_reduce", "pointwise_padded")
    assert routes == (["pointwise"] if pointwise_route else ["unfold"] if route == "unfold" else [])


def test_pointwise_conv_jacobians_float32_at_a_large_offset():
    """The pixel-covariance route of a 1x1 conv in float32, on data with a common offset of
    1e3 (input and output), stays close to float64: no raw second moments (they would lose
    ~6% here). (A k x k conv's route reads x - mu, whose float32 rounding at this offset is
    already of the order of the result.)"""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 1, bias=True).double()
    with torch.no_grad():
        conv.bias.fill_(1e3)
    inp = 1e3 + torch.randn(4, 4, 9, 9, dtype=torch.float64)
    geometry = sx.cbn_window.ConvGeometry.from_conv(conv)
    with torch.no_grad():
        x = conv(inp)
        exact = sx.cbn_window.conv_jacobians(inp, conv.weight, x, x.mean((0, 2, 3)), geometry)
        x32 = conv.float()(inp.float())
        approx = sx.cbn_window.conv_jacobians(inp.float(), conv.weight, x32, x32.mean((0, 2, 3)), geometry)
    for a, e in zip(approx, exact):
        assert a.dtype == torch.float32
        assert float((a.double() - e).abs().max() / e.abs().max()) < 1e-4


def test_cbn_drops_entries_with_negative_compensated_variance():
    """A large weight jump makes some compensated variances negative: those entries are
    dropped per channel (others kept), exactly as the published rule says."""
    conv, cbn, ref = _make_pair(CONVS["pointwise"], window=4, burnin=0)
    _compare_runs(conv, cbn, ref, steps=6, lr=0.3, jump_at=3)
    assert ref.dropped > 0


@pytest.mark.parametrize("window", [2, 5])
def test_cbn_long_window_and_no_burnin(window):
    conv, cbn, ref = _make_pair(CONVS["stride2_pad1_groups2_dil2"], window=window, burnin=0)
    _compare_runs(conv, cbn, ref, steps=7, lr=0.3)
    assert int(cbn.window_valid.sum()) == window - 1


def test_cbn_rho_zero_is_plain_averaging():
    """rho = 0: mean and variance pooled over the stored steps without any compensation,
    computed here from plain per-step batch statistics."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    cbn = sx.CrossIterationBatchNorm2d(5, window=3, burnin=1, rho=0.0, backend=BACKEND).double().bind(conv)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    history = []  # (mean, biased var) of the steps after burn-in
    for step in range(6):
        h = conv(torch.randn(4, 3, 5, 5, dtype=torch.float64))
        y = cbn(h)
        hd = h.detach()
        var_t, mu_t = torch.var_mean(hd, dim=(0, 2, 3), correction=0)
        stats = [(mu_t, var_t)] + (history[:2] if step >= 1 else [])
        mus = torch.stack([m for m, _ in stats])
        vars_ = torch.stack([v for _, v in stats])
        mu = mus.mean(0)
        var = (vars_ + (mus - mu) ** 2).mean(0)
        want = (hd - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
        want = want * cbn.weight.view(1, -1, 1, 1) + cbn.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y, want, **TIGHT)
        if step >= 1:
            history = [(mu_t, var_t)] + history
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
