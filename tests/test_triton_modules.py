"""The triton backend through the public API (modules over several training steps, CBN's
window state) against the reference backend. Kernels run under Triton's interpreter on CPU
tensors without a GPU (see test_triton_backend.py)."""
import pytest
import torch
import torch.nn.functional as F

import stochnorm_ext as sx
from stochnorm_ext.cbn_window import CBNWindow

from test_triton_backend import device_param

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------
# Through the public API: modules over several steps, CBN window state
# ---------------------------------------------------------------------------------------

def _module_steps(make, device, steps, shape, conv=None, seed=0):
    """Train ``steps`` steps then one eval step with a module on the triton and on the
    reference backend; returns both modules and the outputs/gradients of every step."""
    torch.manual_seed(seed)
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(seed)
        mod = make(backend)
        mod_conv = conv() if conv is not None else None
        if mod_conv is not None:
            mod.bind(mod_conv)
            mod_conv.to(device)
        mod.to(device)
        outs = []
        g = torch.Generator().manual_seed(seed + 1)
        for step in range(steps + 1):
            mod.train(step < steps)
            x = torch.randn(shape, generator=g).to(device).requires_grad_()
            inp = mod_conv(x) if mod_conv is not None else x
            y = mod(inp)
            y.backward(torch.randn(y.shape, generator=g).to(device))
            outs.append((y.detach().cpu(), x.grad.cpu()))
            if mod_conv is not None and step < steps:
                with torch.no_grad():  # move the conv weight so compensation matters
                    mod_conv.weight.add_(torch.randn(mod_conv.weight.shape, generator=g).to(device), alpha=0.05)
                    mod_conv.weight.grad = None
        results.append((mod, outs))
    return results


def _compare_modules(results, tol=5e-5):
    (mod_t, outs_t), (mod_r, outs_r) = results
    for step, ((y_t, dx_t), (y_r, dx_r)) in enumerate(zip(outs_t, outs_r)):
        assert not torch.isnan(y_t).any() and not torch.isnan(dx_t).any()
        assert (y_t - y_r).abs().max().item() < tol, f"step {step}: y"
        assert (dx_t - dx_r).abs().max().item() < tol, f"step {step}: dx"
    state_t, state_r = mod_t.state_dict(), mod_r.state_dict()
    assert state_t.keys() == state_r.keys()
    for key in state_t:
        a, b = state_t[key].cpu(), state_r[key].cpu()
        if a.is_floating_point():
            assert (a.double() - b.double()).abs().max().item() < tol, key
        else:
            assert torch.equal(a, b), key
    for (name, p_t), (_, p_r) in zip(mod_t.named_parameters(), mod_r.named_parameters()):
        assert (p_t.grad.cpu() - p_r.grad.cpu()).abs().max().item() < tol * 10, f"grad {name}"


@device_param
def test_stoch_norm_module_steps(device):
    _compare_modules(_module_steps(lambda b: sx.StochNorm2d(5, p=0.5, backend=b), device, 3, (4, 5, 3, 3)))


@device_param
def test_batch_group_norm_module_steps(device):
    _compare_modules(_module_steps(lambda b: sx.BatchGroupNorm2d(4, num_groups=8, momentum=None, backend=b),
                                   device, 3, (3, 4, 2, 3)))


@device_param
def test_cbn_window_state_after_steps(device):
    """CBN through the public module with a bound conv: outputs, gradients, running
    statistics and every window buffer (means, variances, Jacobians, head, step) after
    the burn-in and enough steps to wrap the ring buffer."""
    results = _module_steps(
        lambda b: sx.CrossIterationBatchNorm2d(4, window=3, burnin=1, backend=b), device, 5,
        (3, 2, 5, 5), conv=lambda: torch.nn.Conv2d(2, 4, 3, padding=1, bias=False))
    _compare_modules(results, tol=1e-4)
    mod_t = results[0][0]
    assert int(mod_t.state_dict()[[k for k in mod_t.state_dict() if k.endswith("step")][0]]) == 5


@device_param
def test_cbn_functional_window(device):
    """The functional form with an explicit window and conv arguments."""
    outs = []
    for backend in ("triton", "reference"):
        torch.manual_seed(3)
        conv_w = torch.randn(4, 2, 3, 3, device=device) * 0.3
        window = CBNWindow.empty(3, 4, conv_w.shape, device=device)
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        ys = []
        for step in range(4):
            inp = torch.randn(2, 2, 5, 5, device=device)
            x = F.conv2d(inp, conv_w, padding=1)
            ys.append(sx.functional.cross_iteration_batch_norm(
                x, inp, conv_w, window, None, None, rm, rv, training=True, padding=1, backend=backend).cpu())
            conv_w = conv_w + 0.05 * torch.randn_like(conv_w)
        outs.append((ys, window, rm, rv))
    (ys_t, win_t, rm_t, rv_t), (ys_r, win_r, rm_r, rv_r) = outs
    for a, b in zip(ys_t, ys_r):
        assert (a - b).abs().max().item() < 5e-5
    for a, b in zip(win_t, win_r):
        assert (a.double() - b.double()).abs().max().item() < 1e-4 if a.is_floating_point() else torch.equal(a, b)
    assert (rm_t - rm_r).abs().max().item() < 1e-5 and (rv_t - rv_r).abs().max().item() < 1e-5
