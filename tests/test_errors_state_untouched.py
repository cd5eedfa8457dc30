"""State a failed call must leave alone (docs/SPEC.md, shared rules): the right exception, a
message naming what was expected and what was given, and no state touched by the failed call.
StochNorm's failed call does not advance the global RNG; the functional CBN's window is
checked with the other arguments, before the running statistics or the window change.
"""
import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext import functional as SF
from stochnorm_ext.cbn_window import CBNWindow

from conftest import available
from errors_helpers import BACKEND, raises_untouched, randomized


# ------------------------------------------------------------------- the RNG (SPEC: state untouched)
@pytest.mark.parametrize("attr,value,match", [("eps", -1.0, "eps"), ("momentum", 2.0, "momentum")])
def test_stochnorm_failed_call_leaves_the_rng_alone(attr, value, match):
    # Like nn.BatchNorm*d, which draws nothing: a call that raises (here for a
    # hyper-parameter made invalid after construction) must not advance the global RNG.
    layer = randomized(sx.StochNorm2d(6, p=0.5, backend=BACKEND))
    setattr(layer, attr, value)
    x = torch.randn(2, 6, 4, 4)
    rng = torch.get_rng_state()
    raises_untouched(layer, ValueError, match, lambda: layer(x))
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
