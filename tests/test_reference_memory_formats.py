"""The reference layers on channels_last, channels_last_3d, strided and transposed
inputs: outputs and gradients do not depend on the layout, and channels_last(_3d) inputs
give outputs in the same format.

Everything runs the ``reference`` backend explicitly: other test files compare the kernel
backends with it, so it has to be right on its own.
"""
import pytest
import torch

import stochnorm_ext as sx

from reference_helpers import BACKEND, BGN, STOCH, rand_x, randomize


# ------------------------------------------------------------------- memory formats
@pytest.mark.parametrize("kind,layout", [
    (k, lay) for k in ("stochnorm", "bgn", "bgn_pieces", "cbn")
    for lay in ("channels_last", "channels_last_3d", "strided", "transposed")
    if not (k == "cbn" and lay == "channels_last_3d")])
def test_memory_formats_and_non_contiguous_inputs(kind, layout):
    """Outputs and gradients do not depend on the layout; channels_last(_3d) inputs give
    outputs in the same format."""
    d = 3 if layout == "channels_last_3d" else 2
    base = rand_x((3, 6, 4, 6, 4) if d == 3 else (3, 6, 8, 6), torch.float64)
    if layout == "channels_last":
        x, fmt = base.contiguous(memory_format=torch.channels_last), torch.channels_last
    elif layout == "channels_last_3d":
        x, fmt = base.contiguous(memory_format=torch.channels_last_3d), torch.channels_last_3d
    elif layout == "strided":
        x, fmt = base[:, :, ::2], None
    else:
        x, fmt = base.transpose(2, 3).contiguous().transpose(2, 3), None
    assert not x.is_contiguous()
    make = {"stochnorm": lambda: STOCH[d](6, p=0.5, backend=BACKEND),
            "bgn": lambda: BGN[d](6, 2, backend=BACKEND),
            "bgn_pieces": lambda: BGN[d](6, 12, backend=BACKEND),
            "cbn": lambda: sx.CrossIterationBatchNorm2d(6, window=1, backend=BACKEND)}[kind]
    a, b = make().double(), make().double()
    randomize(a)
    b.load_state_dict(a.state_dict())
    xa, xb = x.clone().requires_grad_(), x.contiguous().requires_grad_()
    torch.manual_seed(11)
    ya = a(xa)
    torch.manual_seed(11)
    yb = b(xb)
    if fmt is not None:
        assert ya.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)
