"""convert_model: torchvision models and small hand-built ones, for each kind."""
import copy
import warnings

import pytest
import torch
from torch import nn

import stochnorm_ext as sx

torchvision = pytest.importorskip("torchvision")

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NEW_TYPES = {"stochnorm": (sx.StochNorm1d, sx.StochNorm2d, sx.StochNorm3d),
             "bgn": (sx.BatchGroupNorm1d, sx.BatchGroupNorm2d, sx.BatchGroupNorm3d),
             "cbn": (sx.CrossIterationBatchNorm2d,)}


def _randomize_bns(model):
    """Random affine parameters and running statistics in every BatchNorm, so copying
    them (or not) shows in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.2)
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(17)
    return model


def _expected_conv_name(model, bn_name):
    """The conv that feeds a BatchNorm in torchvision's ResNets and MobileNetV2: the previous
    child of a Sequential, or convK for bnK."""
    parent, _, child = bn_name.rpartition(".")
    if child.isdigit():
        return f"{parent}.{int(child) - 1}" if parent else str(int(child) - 1)
    assert child.startswith("bn"), bn_name
    return (parent + "." if parent else "") + "conv" + child[2:]


def _group_stats(mean, var, G):
    """BN statistics -> BGN group statistics, written independently of convert.py: for
    G | C the group's mean is the mean of its channels' means and its variance the pooled
    second moment minus the squared mean (law of total variance); for G = m*C each channel
    is repeated for its m pieces."""
    C = mean.numel()
    if C % G == 0:
        k = C // G
        gm = torch.stack([mean[g * k:(g + 1) * k].double().mean() for g in range(G)])
        second = torch.stack([(var[g * k:(g + 1) * k].double() + mean[g * k:(g + 1) * k].double() ** 2).mean()
                              for g in range(G)])
        return gm, second - gm ** 2
    m = G // C
    idx = torch.arange(G) // m
    return mean[idx].double(), var[idx].double()


def _check_copied(kind, old, new, options):
    """Parameters and statistics copied (values), not shared (storage)."""
    C = old.num_features
    torch.testing.assert_close(new.weight, old.weight, rtol=0, atol=0)
    torch.testing.assert_close(new.bias, old.bias, rtol=0, atol=0)
    assert new.weight.data_ptr() != old.weight.data_ptr()
    if kind == "bgn":
        G = new.num_groups
        want_mean, want_var = _group_stats(old.running_mean, old.running_var, G)
        torch.testing.assert_close(new.running_mean.double(), want_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(new.running_var.double(), want_var, rtol=1e-6, atol=1e-6)
    else:
        assert new.running_mean.shape == (C,)
        torch.testing.assert_close(new.running_mean, old.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(new.running_var, old.running_var, rtol=0, atol=0)
    assert new.running_mean.data_ptr() != old.running_mean.data_ptr()
    assert int(new.num_batches_tracked) == int(old.num_batches_tracked)
    assert new.eps == options.get("eps", old.eps)
    assert new.momentum == options.get("momentum", old.momentum)


MODEL_OPTIONS = {
    "stochnorm": dict(p=0.5),
    "bgn": dict(num_groups=lambda C: C // 8),
    "cbn": dict(window=2, burnin=0),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stochnorm", "bgn", "cbn"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_convert_torchvision_model(name, kind):
    torch.manual_seed(0)
    model = _randomize_bns(getattr(torchvision.models, name)(weights=None))
    original = copy.deepcopy(model).eval()
    old_bns = {n: m for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    options = MODEL_OPTIONS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BN of these models is conv-fed: no warning
        out = sx.convert_model(model, kind, **options)
    assert out is model
    assert not any(isinstance(m, BN_TYPES) for m in model.modules())
    for bn_name, old in old_bns.items():
        new = model.get_submodule(bn_name)
        assert isinstance(new, NEW_TYPES[kind]), bn_name
        _check_copied(kind, old, new, options)
        if kind == "cbn":
            conv_name = _expected_conv_name(model, bn_name)
            assert new.bound_conv is convs[conv_name], (bn_name, conv_name)
            assert new.window == 2
        if kind == "bgn":
            assert new.num_groups == old.num_features // 8
    # the converted layers do not share tensors with the old ones
    with torch.no_grad():
        for old in old_bns.values():
            old.weight.add_(1.0)
            old.running_mean.add_(1.0)
            old.running_var.mul_(3.0)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        y, want = model(x), original(x)
    if kind == "bgn":  # pooled statistics: not BN any more; only check it is sane
        assert torch.isfinite(y).all()
    else:
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    # training steps run, give finite gradients everywhere, and (CBN) use the window
    # (64 x 64: at 32 x 32 the last stage's maps are 1 x 1, two values per statistic with a
    # batch of 2, and an untrained resnet50's step overflows for most StochNorm masks)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean().backward()
        for n, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        opt.step()
        opt.zero_grad()
    if kind == "cbn":
        for bn_name in old_bns:
            assert int(model.get_submodule(bn_name).window_valid.sum()) == 1, bn_name


def test_bgn_eval_with_groups_equal_channels_is_the_original_model():
    torch.manual_seed(0)
    model = _randomize_bns(torchvision.models.resnet18(weights=None)).eval()
    original = copy.deepcopy(model)
    sx.convert_model(model, "bgn", num_groups=lambda C: C)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-4)


def test_bgn_multiple_groups_replicates_statistics_and_trains():
    """G = 2C on ResNet-18 at 64x64 (the smallest map, 2x2, splits in two pieces)."""
    torch.manual_seed(0)
    model = _randomize_bns(torchvision.models.resnet18(weights=None))
    old_bns = {n: m for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    sx.convert_model(model, "bgn", num_groups=lambda C: 2 * C)
    for n, old in old_bns.items():
        new = model.get_submodule(n)
        assert new.num_groups == 2 * old.num_features
        _check_copied("bgn", old, new, {})
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    # at 32x32 the last stage is 1x1: a 1-position channel cannot be split
    with pytest.raises(ValueError, match="spatial"):
        model(torch.randn(2, 3, 32, 32))


# ------------------------------------------------------------------- small models
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv3d(1, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(4)
        self.fc = nn.Linear(16, 8)
        self.bn4 = nn.BatchNorm1d(8)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        v = self.bn3(self.conv3(x[:, :1].unsqueeze(1))).mean((1, 2))  # (N, H, W)
        f = self.bn4(self.fc(h.mean((2, 3))))
        return f.sum(1) + v.mean((1, 2))


@pytest.mark.parametrize("options,check", [
    (dict(p=0.3), lambda m: m.p == 0.3),
    (dict(p=0.0, eps=1e-3, momentum=None), lambda m: m.p == 0.0 and m.eps == 1e-3 and m.momentum is None),
])
def test_stochnorm_options_and_dims(options, check):
    model = _randomize_bns(Small())
    old = {n: m for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    sx.convert_model(model, "stochnorm", **options)
    want = {"bn1": sx.StochNorm2d, "bn2": sx.StochNorm2d, "bn3": sx.StochNorm3d, "bn4": sx.StochNorm1d}
    for n, cls in want.items():
        new = model.get_submodule(n)
        assert type(new) is cls and check(new)
        _check_copied("stochnorm", old[n], new, options)
    model(torch.randn(4, 3, 6, 6)).sum().backward()


@pytest.mark.parametrize("num_groups,expect", [
    (4, {"bn1": 4, "bn2": 4, "bn3": 4, "bn4": 4}),
    (lambda C: 2 * C, {"bn1": 16, "bn2": 32, "bn3": 8, "bn4": 16}),
    (lambda C: C // 4, {"bn1": 2, "bn2": 4, "bn3": 1, "bn4": 2}),
])
def test_bgn_options_int_and_callable(num_groups, expect):
    model = _randomize_bns(Small())
    old = {n: m for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    options = dict(num_groups=num_groups, eps=2e-4, momentum=0.05)
    sx.convert_model(model, "bgn", **options)
    want = {"bn1": sx.BatchGroupNorm2d, "bn2": sx.BatchGroupNorm2d, "bn3": sx.BatchGroupNorm3d,
            "bn4": sx.BatchGroupNorm1d}
    for n, cls in want.items():
        new = model.get_submodule(n)
        assert type(new) is cls and new.num_groups == expect[n], n
        _check_copied("bgn", old[n], new, options)
    if expect["bn4"] <= 8:  # (N, 8) input of bn4 cannot be split into pieces
        model(torch.randn(4, 3, 6, 6)).sum().backward()


def test_bgn_pooled_statistics_formula():
    """Group statistics of a converted BN: mean of means; mean of variances plus the spread
    of the means (G | C), replicated (G = m*C); checked on explicit numbers too."""
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 3.0, -2.0, 0.0]))
        bn.running_var.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    bgn = sx.convert_model(copy.deepcopy(bn), "bgn", num_groups=2)
    # group 0: mean 2, var (1 + 2)/2 + ((1-2)^2 + (3-2)^2)/2 = 2.5; group 1: mean -1, var 1 + 1 = 2
    torch.testing.assert_close(bgn.running_mean, torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(bgn.running_var, torch.tensor([2.5, 2.0]))
    bgn = sx.convert_model(copy.deepcopy(bn), "bgn", num_groups=8)
    torch.testing.assert_close(bgn.running_mean, torch.tensor([1.0, 1, 3, 3, -2, -2, 0, 0]))
    torch.testing.assert_close(bgn.running_var, torch.tensor([1.0, 1, 2, 2, 0.5, 0.5, 1.5, 1.5]))


def test_bgn_option_affine_and_track_running_stats():
    model = _randomize_bns(Small())
    sx.convert_model(model, "bgn", num_groups=2, affine=False, track_running_stats=False)
    for n in ("bn1", "bn2", "bn3", "bn4"):
        new = model.get_submodule(n)
        assert new.weight is None and new.running_mean is None
    model.eval()(torch.randn(4, 3, 6, 6))  # eval with batch statistics


def test_cbn_options_binding_and_warning_for_unfed_bn():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)              # conv-fed: converted
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(8)              # after a ReLU: left alone
            self.conv3 = nn.Conv2d(8, 8, 1)
            self.bn3 = nn.BatchNorm2d(8)              # conv output used twice: left alone
            self.fc = nn.Linear(8, 4)
            self.bn4 = nn.BatchNorm1d(4)              # after a Linear: left alone

        def forward(self, x):
            h = self.bn1(self.conv1(x))
            h = self.bn2(torch.relu(self.conv2(h)))
            c = self.conv3(h)
            h = self.bn3(c) + c
            return self.bn4(self.fc(h.mean((2, 3))))

    model = _randomize_bns(Mixed())
    old_bn1 = model.bn1
    with pytest.warns(UserWarning, match="left as BatchNorm") as record:
        sx.convert_model(model, "cbn", window=5, burnin=3, rho=0.5, eps=1e-4, momentum=None)
    msg = str(record[0].message)
    assert "bn2" in msg and "bn3" in msg and "bn4" in msg and "bn1" not in msg
    assert isinstance(model.bn1, sx.CrossIterationBatchNorm2d)
    assert model.bn1.bound_conv is model.conv1
    assert (model.bn1.window, model.bn1.burnin, model.bn1.rho) == (5, 3, 0.5)
    _check_copied("cbn", old_bn1, model.bn1, dict(eps=1e-4, momentum=None))
    for n in ("bn2", "bn3"):
        assert type(model.get_submodule(n)) is nn.BatchNorm2d
    assert type(model.bn4) is nn.BatchNorm1d
    for _ in range(5):
        model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert int(model.bn1.step) == 5 and int(model.bn1.window_valid.sum()) == 2


def test_convert_a_bare_batchnorm_and_syncbatchnorm():
    bn = _randomize_bns(nn.BatchNorm1d(6))
    new = sx.convert_model(bn, "stochnorm", p=0.2)
    assert type(new) is sx.StochNorm1d and new.p == 0.2
    model = _randomize_bns(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)))
    old = model[1]
    sx.convert_model(model, "cbn", window=2)
    assert type(model[1]) is sx.CrossIterationBatchNorm2d and model[1].bound_conv is model[0]
    _check_copied("cbn", old, model[1], {})
    # a SyncBatchNorm takes its dimensionality from the module feeding it
    model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.SyncBatchNorm(4), nn.Flatten(),
                          nn.Linear(4, 5), nn.SyncBatchNorm(5))
    sx.convert_model(model, "stochnorm")
    assert type(model[1]) is sx.StochNorm3d and type(model[4]) is sx.StochNorm1d
    model(torch.randn(2, 3, 3, 3, 3))


def test_convert_keeps_training_mode_and_requires_grad():
    model = _randomize_bns(Small())
    model.bn1.eval()
    model.bn2.weight.requires_grad_(False)
    sx.convert_model(model, "stochnorm")
    assert not model.bn1.training and model.bn2.training
    assert not model.bn2.weight.requires_grad and model.bn1.weight.requires_grad


def test_convert_model_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        sx.convert_model(Small(), "groupnorm")
    with pytest.raises(TypeError, match="window"):
        sx.convert_model(Small(), "stochnorm", window=3)
    with pytest.raises(ValueError, match="num_groups"):
        sx.convert_model(Small(), "bgn")
    with pytest.raises(ValueError, match="num_groups=3"):
        sx.convert_model(Small(), "bgn", num_groups=3)
    with pytest.raises(ValueError, match="p must be"):
        sx.convert_model(Small(), "stochnorm", p=1.5)
    with pytest.raises(ValueError, match="running statistics"):
        sx.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
                         "stochnorm")


class _Untraceable(nn.Sequential):
    """The same layers, but torch.fx cannot trace it: convert_model pairs by module order."""

    def forward(self, x):
        if x.sum() > float("inf"):  # data-dependent control flow
            return x
        return super().forward(x)


@pytest.mark.parametrize("traceable", [True, False])
@pytest.mark.parametrize("kind,options,cls", [
    ("stochnorm", dict(p=0.5), sx.StochNorm2d), ("bgn", dict(num_groups=2), sx.BatchGroupNorm2d),
    ("cbn", dict(window=3), sx.CrossIterationBatchNorm2d)])
def test_shared_batchnorm_converted_at_every_use(kind, options, cls, traceable):
    # One BN used twice: one new module at both places (the sharing is kept), never half.
    seq = nn.Sequential if traceable else _Untraceable
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
    model = seq(nn.Conv2d(3, 4, 1), nn.ReLU(), conv, bn, nn.ReLU(), conv, bn)  # one conv feeds both uses
    _randomize_bns(model)
    sx.convert_model(model, kind, **options)
    assert type(model[3]) is cls and model[6] is model[3]
    if kind == "cbn":
        assert model[3].bound_conv is conv
    for _ in range(2):
        model(torch.randn(2, 3, 4, 4)).sum().backward()
    assert int(model[3].num_batches_tracked) == 17 + 4  # randomized to 17; two uses per forward


@pytest.mark.parametrize("traceable", [True, False])
def test_shared_batchnorm_fed_by_two_convs(traceable):
    seq = nn.Sequential if traceable else _Untraceable
    bn = nn.BatchNorm2d(4)
    make = lambda: seq(nn.Conv2d(3, 4, 1), bn, nn.ReLU(), nn.Conv2d(4, 4, 1), bn)  # noqa: E731
    model = sx.convert_model(make(), "stochnorm")
    assert type(model[1]) is sx.StochNorm2d and model[4] is model[1]
    # CBN binds to one conv: a BN shared by two convs stays a BatchNorm, at both places.
    model = make()
    with pytest.warns(UserWarning, match=r"\['1'\].*no single conv feeds every use.*left as BatchNorm"):
        sx.convert_model(model, "cbn")
    assert model[1] is bn and model[4] is bn


@pytest.mark.parametrize("kind,options", [("stochnorm", {}), ("bgn", dict(num_groups=2)),
                                          ("cbn", dict(window=2))])
def test_batchnorm_without_bias_gains_no_parameter(kind, options):
    # nn.BatchNorm2d(C, bias=False) has a scale and no shift: the converted model (and its
    # deployed form) must not gain a trainable zero bias.
    bn = nn.BatchNorm2d(4)
    bn.bias = None  # what nn.BatchNorm2d(4, bias=False) holds; torch < 2.12 has no such argument
    model = _randomize_bns(nn.Sequential(nn.Conv2d(3, 4, 1), bn))
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(2, 3, 4, 4)
    want = model.eval()(x)
    sx.convert_model(model, kind, **options)
    assert [n for n, _ in model.named_parameters()] == names and model[1].bias is None
    assert "bias=False" in repr(model[1])
    if kind != "bgn":  # BGN pools its groups' statistics: another eval map
        torch.testing.assert_close(model(x), want)
    deployed = sx.to_batchnorm(model)
    assert [n for n, _ in deployed.named_parameters()] == names and deployed[1].bias is None
    torch.testing.assert_close(deployed(x), model(x))
    model.train()(x).sum().backward()
    assert model[1].weight.grad is not None
