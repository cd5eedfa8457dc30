"""The layers with channels_last and channels_last_3d inputs and models converted to
channels_last.

Every check runs on each backend available here for CPU tensors (reference, the C++ cpu
backend when built and enabled, triton under its interpreter); CUDA variants skip without
a GPU.
"""
import pytest
import torch
from torch import nn

import stochnorm_ext as sx

from integration_helpers import CL, CPU_BACKENDS, LAYER_NAMES, conv_norm_relu, run_steps


# --------------------------------------------------------------------------- memory formats
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_channels_last_in_channels_last_out(name, dims, backend):
    """channels_last (2d) / channels_last_3d input gives the same format out, with the
    values and gradients of the contiguous run."""
    if name == "cbn" and dims == 3:
        pytest.skip("CBN is 2d only")
    fmt = CL[dims + 2]
    shape = (3, 3, 4, 4) if dims == 2 else (3, 3, 2, 2, 4)
    inputs = [torch.randn(shape) for _ in range(2)]
    runs = []
    for memory_format in (torch.contiguous_format, fmt):
        model = conv_norm_relu(name, backend, dims).to(memory_format=memory_format)
        formats = []
        model[1].register_forward_hook(lambda m, args, out: formats.append(
            (args[0].is_contiguous(memory_format=fmt), out.is_contiguous(memory_format=fmt))))
        runs.append((run_steps(model, [x.contiguous(memory_format=memory_format) for x in inputs]), formats))
    ((plain, state_plain), formats_plain), ((steps, state), formats) = runs
    assert formats == [(True, True)] * len(inputs), formats  # channels_last in and out of the layer
    assert formats_plain == [(False, False)] * len(inputs), formats_plain
    for (y, gx, grads), (y0, gx0, grads0) in zip(steps, plain):
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx0, rtol=1e-4, atol=1e-5)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5)
    for key in state:
        torch.testing.assert_close(state[key], state_plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_model_to_channels_last_with_cbn():
    """The usual way to run a ResNet channels_last works on a CBN-converted one:
    model.to(memory_format=...) converts every 4D/5D tensor, and CBN's window keeps its
    Jacobians in 3D buffers that the conversion leaves alone."""
    model = sx.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "cbn", window=2)
    model.to(memory_format=torch.channels_last)
    for _ in range(2):  # the second step uses the stored entry
        y = model(torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
