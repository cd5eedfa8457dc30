"""One value per statistic in training (docs/SPEC.md, shared rules): the right exception, a message
naming what was expected and what was given, and no state touched by the failed call.
Every layer (CBN with and without a window) and the functional forms.
"""
import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext import functional as SF

from errors_helpers import BACKEND, bound_cbn, raises_untouched, randomized


# ------------------------------------------------------------------- M == 1
@pytest.mark.parametrize("case", ["stoch1d", "stoch2d", "bgn_div", "bgn_pieces", "cbn_w1", "cbn_window"])
def test_one_value_per_statistic_in_training(case):
    if case == "stoch1d":
        layer, x = randomized(sx.StochNorm1d(4, backend=BACKEND)), torch.randn(1, 4)
    elif case == "stoch2d":
        layer, x = randomized(sx.StochNorm2d(4, backend=BACKEND)), torch.randn(1, 4, 1, 1)
    elif case == "bgn_div":  # G = C: one value per channel
        layer, x = randomized(sx.BatchGroupNorm1d(4, 4, backend=BACKEND)), torch.randn(1, 4)
    elif case == "bgn_pieces":  # G = 2C on 2 positions: one value per piece
        layer, x = randomized(sx.BatchGroupNorm1d(4, 8, backend=BACKEND)), torch.randn(1, 4, 2)
    elif case == "cbn_w1":
        layer, x = randomized(sx.CrossIterationBatchNorm2d(4, window=1, backend=BACKEND)), torch.randn(1, 4, 1, 1)
    else:
        conv, layer = bound_cbn()
        x = conv(torch.randn(1, 3, 1, 1))
    raises_untouched(layer, ValueError, r"expected more than 1 value per statistic when training, got input of shape",
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
