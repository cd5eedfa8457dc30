"""Deploying without the extension: ``fold_into_conv`` on small models, pairs it cannot
fold, untraceable models and models in training.
"""
import pytest
from torch import nn

from stochnorm_ext import (BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d, StochNorm1d,
                           StochNorm2d, StochNorm3d, fold_into_conv)

from deploy_helpers import CL, close, make_input, randomise_affine, train


# --------------------------------------------------------------------------- fold_into_conv
class ConvTwice(nn.Module):
    """The conv's output feeds the BN and a residual: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_small_models(dims):
    Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    Stoch = {1: StochNorm1d, 2: StochNorm2d, 3: StochNorm3d}[dims]
    BGN = {1: BatchGroupNorm1d, 2: BatchGroupNorm2d, 3: BatchGroupNorm3d}[dims]
    model = nn.Sequential(
        BN(3),                                   # 0: not preceded by a conv: stays
        Conv(3, 8, 3, padding=1, bias=True), Stoch(8), nn.ReLU(),           # 1-3
        Conv(8, 8, 3, padding=1, groups=4, bias=False), BGN(8, 4), nn.ReLU(),  # 4-6
        Conv(8, 4, 1), BGN(4, 8),                # 7-8: pieces: stays after the conv
        Conv(4, 4, 1), BN(4),                    # 9-10: plain BN is folded too
    )
    shape = (2, 3) + (4,) * dims
    randomise_affine(model)
    train(model, lambda: make_input(shape), steps=3)
    x = make_input(shape)
    expected = model(x)
    folded = fold_into_conv(model)
    kinds = [type(m).__name__ for m in folded]
    assert kinds[0] == BN.__name__ and kinds[8] == "PiecewiseAffine"
    assert [kinds[i] for i in (2, 5, 10)] == ["Identity"] * 3
    assert folded[4].bias is not None and folded[4].groups == 4
    close(folded(x), expected, tol=1e-4)
    if dims > 1:
        xc = x.contiguous(memory_format=CL[x.dim()])
        close(folded(xc), expected, tol=1e-4)


def test_fold_keeps_unfoldable_pairs():
    model = ConvTwice()
    train(model, lambda: make_input((2, 3, 5, 5)))
    x = make_input((2, 3, 5, 5))
    folded = fold_into_conv(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    close(folded(x), model(x))
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(shared, nn.BatchNorm2d(3), shared, nn.BatchNorm2d(3))
    train(model, lambda: make_input((2, 3, 5, 5)))
    folded = fold_into_conv(model)
    assert all(isinstance(m, nn.BatchNorm2d) for m in (folded[1], folded[3]))
    close(folded(x), model(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = StochNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_fold_untraceable_model_raises():
    with pytest.raises(RuntimeError, match="torch.fx cannot trace Untraceable.*to_batchnorm alone"):
        fold_into_conv(Untraceable().eval())


def test_fold_needs_eval():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), StochNorm2d(4))
    with pytest.raises(ValueError, match="training mode.*eval"):
        fold_into_conv(model, inplace=True)
    assert isinstance(model[1], StochNorm2d)
