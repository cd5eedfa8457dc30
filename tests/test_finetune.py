"""Fine-tuning companions: L2-SP, BN scale initialisation, parameter groups, InputNorm."""
import copy
import math

import pytest
import torch
from torch import nn

import stochnorm_ext as sx
from stochnorm_ext.model_tools.finetune import BATCH_NORM_TYPES, L2SP, InputNorm, l2sp_penalty


def _net(classes=3):
    """conv(bias) -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> linear head."""
    return nn.Sequential(
        InputNorm(2, gamma=1.0),
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes),
    )


def _perturb_(model, scale=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------- penalty
def test_penalty_hand_computed():
    w = torch.tensor([1.0, 2.0, 3.0])
    w0 = torch.tensor([1.0, 0.0, 1.0])
    new = torch.tensor([[3.0, 4.0]])
    # ||w - w0||^2 = 0 + 4 + 4 = 8, ||new||^2 = 25
    value = l2sp_penalty([w], [w0], [new], alpha=0.1, beta=0.01)
    assert value.item() == pytest.approx(0.1 / 2 * 8 + 0.01 / 2 * 25)
    assert l2sp_penalty([w], [w0], alpha=2.0).item() == pytest.approx(8.0)
    assert l2sp_penalty([], [], [new], beta=1.0).item() == pytest.approx(12.5)
    assert l2sp_penalty([], []).item() == 0.0


def test_penalty_gradient_matches_autograd_of_plain_formula():
    alpha, beta = 0.3, 0.07
    shapes = [(4, 3, 3, 3), (4,), (7, 5)]
    shared = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    reference = [torch.randn(s, dtype=torch.float64) for s in shapes]
    new = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True),
           torch.randn(3, dtype=torch.float64, requires_grad=True)]
    fast = l2sp_penalty(shared, reference, new, alpha, beta)
    fast_grads = torch.autograd.grad(fast, shared + new)
    plain = (alpha / 2 * sum(((w - w0) ** 2).sum() for w, w0 in zip(shared, reference))
             + beta / 2 * sum((w ** 2).sum() for w in new))
    plain_grads = torch.autograd.grad(plain, shared + new)
    torch.testing.assert_close(fast, plain)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b)
    # and the closed form
    for g, w, w0 in zip(fast_grads, shared, reference):
        torch.testing.assert_close(g, alpha * (w - w0).detach())
    for g, w in zip(fast_grads[len(shared):], new):
        torch.testing.assert_close(g, beta * w.detach())


def test_penalty_at_the_starting_point_has_zero_gradient():
    w = torch.randn(5, requires_grad=True)
    value = l2sp_penalty([w], [w.detach().clone()], alpha=0.1)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(w.grad, torch.zeros(5))  # not NaN (norm's gradient at 0)


def test_penalty_float32_and_float64_mixed():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    value = l2sp_penalty([a, b], [torch.zeros(3), torch.zeros(2, dtype=torch.float64)], alpha=1.0)
    assert value.dtype == torch.float64
    expected = 0.5 * (a.detach().double().square().sum() + b.detach().square().sum())
    torch.testing.assert_close(value.detach(), expected)


def test_penalty_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="references"):
        l2sp_penalty([torch.zeros(2)], [])
    with pytest.raises(ValueError, match="shape"):
        l2sp_penalty([torch.zeros(2)], [torch.zeros(3)])


# --------------------------------------------------------------------------- L2SP class
def test_shared_and_new_from_the_pretrained_state_dict():
    pre = _net(classes=5)
    state = pre.state_dict()
    model = copy.deepcopy(pre)
    model[9] = nn.Linear(6, 3)  # new head, other shape -> new
    default = L2SP(model, state)  # authors: weights only
    assert default.shared_names == ["1.weight", "4.weight"]
    assert default.new_names == ["9.weight"]
    assert sorted(default.excluded_names) == sorted(
        ["0.weight", "1.bias", "2.weight", "2.bias", "5.weight", "5.bias", "9.bias"])
    tllib = L2SP(model, state, alpha=0.01, beta=0.01, include_norm=True, include_bias=True)
    assert tllib.shared_names == ["0.weight", "1.weight", "1.bias", "2.weight", "2.bias",
                                  "4.weight", "5.weight", "5.bias"]
    assert tllib.new_names == ["9.weight", "9.bias"]
    assert tllib.excluded_names == []
    only_bias = L2SP(model, state, include_bias=True)
    assert "1.bias" in only_bias.shared_names and "2.bias" in only_bias.excluded_names
    # A replaced head with the same shape counts as shared unless its keys are dropped.
    same = copy.deepcopy(pre)
    same[9] = nn.Linear(6, 5)
    assert "9.weight" in L2SP(same, state).shared_names
    trimmed = {k: v for k, v in state.items() if not k.startswith("9.")}
    assert L2SP(same, trimmed).new_names == ["9.weight"]


def test_references_are_copies_and_frozen_params_are_left_out():
    model = _net()
    state = model.state_dict()
    model[1].weight.requires_grad_(False)
    reg = L2SP(model, state)
    assert "1.weight" not in reg.shared_names + reg.new_names + reg.excluded_names
    with torch.no_grad():
        model[4].weight.add_(1.0)
    ref = reg.reference[reg.shared_names.index("4.weight")]
    torch.testing.assert_close(ref, model[4].weight.detach() - 1.0)


def test_l2sp_with_converted_stochnorm_model_keeps_bn_names():
    pre = _net()
    state = pre.state_dict()
    model = sx.convert_model(copy.deepcopy(pre), "stochnorm", p=0.5)
    assert isinstance(model[2], sx.StochNorm2d)
    reg = L2SP(model, state, include_norm=True, include_bias=True)
    assert {"2.weight", "2.bias", "5.weight", "5.bias"} <= set(reg.shared_names)
    assert reg.new_names == []
    assert {"2.weight", "5.bias"} <= set(L2SP(model, state).excluded_names)


def test_model_penalty_gradients():
    pre = _net(classes=5)
    state = pre.state_dict()
    model = _perturb_(copy.deepcopy(pre))
    model[9] = nn.Linear(6, 3)
    reg = L2SP(model, state, alpha=0.2, beta=0.05)
    reg.penalty().backward()
    params = dict(model.named_parameters())
    for name in reg.shared_names:
        torch.testing.assert_close(params[name].grad, 0.2 * (params[name].detach() - state[name]))
    for name in reg.new_names:
        torch.testing.assert_close(params[name].grad, 0.05 * params[name].detach())
    for name in reg.excluded_names:
        assert params[name].grad is None


def test_decay_hand_computed():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    head = nn.Parameter(torch.tensor([2.0]))
    model = nn.Module()
    model.w, model.head = w, head
    reg = L2SP(model, {"w": torch.tensor([0.0, 0.0])}, alpha=0.1, beta=0.01)
    assert reg.shared_names == ["w"] and reg.new_names == ["head"]
    reg.decay_(lr=0.1)
    # w += lr*alpha*(w0 - w) = 0.99 * w; head *= 1 - lr*beta = 0.999
    torch.testing.assert_close(w.detach(), torch.tensor([0.99, -1.98]))
    torch.testing.assert_close(head.detach(), torch.tensor([1.998]))
    with pytest.raises(ValueError, match="either"):
        reg.decay_()
    with pytest.raises(ValueError, match="either"):
        reg.decay_(torch.optim.SGD([w], lr=0.1), lr=0.1)


def _sgd_pair(groups_fn, steps=3, **sgd_kwargs):
    """Train two copies: SGD on loss + penalty vs SGD on loss with decoupled decay."""
    torch.manual_seed(1)
    pre = _net(classes=5).double()
    state = pre.state_dict()
    base = _perturb_(copy.deepcopy(pre))
    base[9] = nn.Linear(6, 3).double()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    reg_a = L2SP(a, state, alpha=0.3, beta=0.1, include_norm=True, include_bias=True)
    reg_b = L2SP(b, state, alpha=0.3, beta=0.1, include_norm=True, include_bias=True)
    opt_a = torch.optim.SGD(groups_fn(a), **sgd_kwargs)
    opt_b = torch.optim.SGD(groups_fn(b), **sgd_kwargs)
    x = torch.randn(8, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    for _ in range(steps):
        opt_a.zero_grad()
        (nn.functional.cross_entropy(a(x), y) + reg_a.penalty()).backward()
        opt_a.step()
        opt_b.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        reg_b.decay_(opt_b)
        opt_b.step()
    return a, b


@pytest.mark.parametrize("groups_fn", [
    lambda m: m.parameters(),
    lambda m: sx.bn_param_groups(m, lr=0.2),  # gamma at lr/100
], ids=["one-group", "bn-param-groups"])
def test_decoupled_sgd_step_equals_sgd_on_penalty(groups_fn):
    a, b = _sgd_pair(groups_fn, lr=0.2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=name)
    for ba, bb in zip(a.buffers(), b.buffers()):
        torch.testing.assert_close(ba, bb)


@pytest.mark.parametrize("sgd_kwargs", [{"momentum": 0.9}, {"weight_decay": 1e-2}],
                         ids=["momentum", "weight-decay"])
def test_decoupled_differs_from_penalty_beyond_plain_sgd(sgd_kwargs):
    a, b = _sgd_pair(lambda m: m.parameters(), lr=0.2, **sgd_kwargs)
    diff = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    assert diff > 1e-9  # as documented: equal only under plain SGD


def test_decay_skips_parameters_the_optimizer_does_not_train():
    pre = _net()
    state = pre.state_dict()
    model = _perturb_(copy.deepcopy(pre))
    reg = L2SP(model, state)
    before = model[4].weight.detach().clone()
    trained = model[1].weight.detach().clone()
    reg.decay_(torch.optim.SGD(model[1].parameters(), lr=0.5))
    torch.testing.assert_close(model[4].weight.detach(), before)
    torch.testing.assert_close(model[1].weight.detach(),
                               trained + 0.5 * 0.1 * (state["1.weight"] - trained))


def test_l2sp_rejects_negative_strengths():
    with pytest.raises(ValueError, match="alpha"):
        L2SP(_net(), {}, alpha=-1.0)
    with pytest.raises(ValueError, match="beta"):
        L2SP(_net(), {}, beta=-0.1)


# --------------------------------------------------------------------------- BN scale init
def _all_norm_layers():
    return [nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3),
            sx.StochNorm1d(3), sx.StochNorm2d(3), sx.StochNorm3d(3),
            sx.BatchGroupNorm1d(3, 3), sx.BatchGroupNorm2d(3, 1), sx.BatchGroupNorm3d(3, 3),
            sx.CrossIterationBatchNorm2d(3)]


def test_bn_scale_init_every_layer_type():
    layers = _all_norm_layers()
    assert {type(m) for m in layers} == set(BATCH_NORM_TYPES)
    model = nn.Sequential(*layers, InputNorm(3, gamma=1.0), nn.LayerNorm(3),
                          nn.BatchNorm2d(3, affine=False))
    with torch.no_grad():
        for m in layers:
            m.weight.fill_(2.0)
            m.bias.fill_(0.5)
            m.running_mean.fill_(0.25)
    assert sx.bn_scale_init_(model, gamma=0.25) is model
    for m in layers:
        assert torch.equal(m.weight.detach(), torch.full((3,), 0.25))
        assert torch.equal(m.bias.detach(), torch.zeros(3))
        assert torch.equal(m.running_mean, torch.full_like(m.running_mean, 0.25))
    torch.testing.assert_close(model[11].weight.detach(), torch.full((3,), 0.25 * 0.58))
    assert torch.equal(model[12].weight.detach(), torch.ones(3))  # LayerNorm untouched


def test_bn_scale_init_default_and_bounds():
    bn = nn.BatchNorm2d(4)
    sx.bn_scale_init_(bn)
    assert torch.equal(bn.weight.detach(), torch.full((4,), 0.1))
    sx.bn_scale_init_(bn, 1.0)  # the closed end is allowed
    for bad in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            sx.bn_scale_init_(bn, bad)
    with pytest.raises(TypeError):
        sx.bn_scale_init_(bn, True)
    with pytest.warns(UserWarning, match="no affine"):
        sx.bn_scale_init_(nn.Linear(2, 2))


# --------------------------------------------------------------------------- param groups
def test_bn_param_groups():
    model = sx.convert_model(_net(), "stochnorm")
    model[4].weight.requires_grad_(False)
    groups = sx.bn_param_groups(model, lr=0.1, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    params = dict(model.named_parameters())
    ids = lambda names: {id(params[n]) for n in names}  # noqa: E731
    assert {id(p) for p in by_name["weights"]["params"]} == ids(["1.weight", "9.weight"])
    assert {id(p) for p in by_name["bn_scale"]["params"]} == ids(["0.weight", "2.weight", "5.weight"])
    assert {id(p) for p in by_name["no_decay"]["params"]} == ids(["1.bias", "2.bias", "5.bias", "9.bias"])
    assert by_name["weights"]["lr"] == 0.1 and by_name["weights"]["weight_decay"] == 1e-4
    assert by_name["bn_scale"]["lr"] == pytest.approx(0.001) and by_name["bn_scale"]["weight_decay"] == 0
    assert by_name["no_decay"]["lr"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # accepted by an optimizer
    assert len(opt.param_groups) == 3
    baseline = {g["name"]: g["lr"] for g in sx.bn_param_groups(model, 0.1, c=1.0)}
    assert baseline["bn_scale"] == 0.1
    assert [g["name"] for g in sx.bn_param_groups(nn.Linear(2, 2, bias=False), 0.1)] == ["weights"]
    with pytest.raises(ValueError, match="c must be"):
        sx.bn_param_groups(model, 0.1, c=0.0)


def test_norm_params_of_other_norm_layers_get_no_decay_at_full_lr():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4))
    by_name = {g["name"]: g for g in sx.bn_param_groups(model, 0.1, 1e-4)}
    assert "bn_scale" not in by_name
    assert len(by_name["no_decay"]["params"]) == 5  # linear bias + 2 x (weight, bias)


# --------------------------------------------------------------------------- InputNorm
def test_input_norm_forward_and_state():
    layer = InputNorm(3, gamma=0.5)
    torch.testing.assert_close(layer.weight.detach(), torch.full((3,), 0.5 * 0.58))
    assert [n for n, _ in layer.named_parameters()] == ["weight"]  # no shift parameter
    assert set(layer.state_dict()) == {"weight", "running_mean", "running_var", "num_batches_tracked"}
    x = 5.0 + 3.0 * torch.randn(6, 3, 4, 4, dtype=torch.float64)
    layer.double()
    y = layer(x)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = 0.29 * (x - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64))  # no shift
    # running statistics as nn.BatchNorm2d
    bn = nn.BatchNorm2d(3).double()
    bn(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert layer.num_batches_tracked.item() == 1
    layer.eval()
    before = [b.clone() for b in layer.buffers()]
    ye = layer(x)
    torch.testing.assert_close(ye, 0.29 * (x - bn.running_mean[:, None, None])
                               / torch.sqrt(bn.running_var[:, None, None] + 1e-5))
    assert all(torch.equal(a, b) for a, b in zip(before, layer.buffers()))


def test_input_norm_cumulative_momentum_and_shapes():
    layer = InputNorm(2, momentum=None)
    xs = [torch.randn(5, 2) + i for i in range(3)]
    for x in xs:
        layer(x)
    expected = torch.stack([x.mean(0) for x in xs]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected)
    assert layer(torch.randn(2, 2, 7)).shape == (2, 2, 7)  # any trailing dims
    with pytest.raises(ValueError, match=r"\(N, 2, \.\.\.\)"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError):
        InputNorm(3, gamma=0.0)
    with pytest.raises(ValueError):
        InputNorm(3, activation_std=0.0)


def test_failed_input_norm_call_leaves_state():
    layer = InputNorm(2)
    with pytest.raises((ValueError, RuntimeError)):
        layer(torch.randn(1, 2))  # one value per channel in training
    assert layer.num_batches_tracked.item() == 0


def test_convert_model_leaves_input_norm_alone():
    model = sx.convert_model(_net(), "stochnorm")
    assert type(model[0]) is InputNorm
    model.train()
    out = model(torch.randn(4, 2, 5, 5))
    assert out.shape == (4, 3) and math.isfinite(out.sum().item())
