"""The layers under torch.autocast (CPU bfloat16; CUDA float16 and bfloat16) against
nn.BatchNorm's autocast policy.

Every check runs on each backend available here for CPU tensors (reference, the C++ cpu
backend when built and enabled, triton under its interpreter); CUDA variants skip without
a GPU.
"""
import copy

import pytest
import torch
from torch import nn

from conftest import available
from integration_helpers import CPU_BACKENDS, LAYER_NAMES, assert_relative_error, conv_norm_relu, needs_cuda, run_steps


# --------------------------------------------------------------------------- autocast
def test_batchnorm_autocast_policy_on_cpu():
    """What we match: under CPU autocast nn.BatchNorm2d takes the conv's bfloat16 output,
    returns bfloat16 and keeps float32 parameters and buffers (batch_norm is in no autocast
    list, so it runs in its input's dtype)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 5, 5)).dtype == torch.bfloat16
    assert all(t.dtype in (torch.float32, torch.long) for t in model.state_dict().values())


def _check_autocast(name, backend, device, dtype):
    model = conv_norm_relu(name, backend).to(device)
    # Two float32 steps first: CBN's window holds an entry, the running statistics moved.
    run_steps(model, [torch.randn(8, 3, 6, 6, device=device) for _ in range(2)])
    reference = copy.deepcopy(model)
    seen = []
    model[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(8, 3, 6, 6, device=device)
    # One step from the same state in each precision (no compounding over steps).
    ([(y, gx, grads)], state_mixed) = run_steps(model, [x], autocast=dict(device_type=device, dtype=dtype))
    ([(y32, gx32, grads32)], state_full) = run_steps(reference, [x])
    assert seen == [dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y32, rtol=0.02, atol=0.02)
    # Gradients: bfloat16 rounding of the conv output and a few flipped ReLU signs make
    # them noisier (nn.BatchNorm2d shows the same), so compare them as a whole.
    assert_relative_error(gx.float(), gx32, 0.1)
    for g, g32 in zip(grads, grads32):
        assert g.dtype == torch.float32
        assert_relative_error(g, g32, 0.1)
    params = dict(model.named_parameters())
    for key, value in state_mixed.items():
        assert value.dtype == state_full[key].dtype, key  # parameters and buffers stay float32
        if key in params:  # updated with the gradients compared above
            continue
        if value.is_floating_point():  # running statistics, CBN's window
            assert_relative_error(value.double(), state_full[key].double(), 0.01)
        else:
            assert torch.equal(value, state_full[key]), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_cpu_autocast_bfloat16(name, backend):
    """Conv -> layer -> ReLU under torch.autocast('cpu', bfloat16) with float32 parameters:
    the layer gets bfloat16, returns bfloat16 (like nn.BatchNorm2d), parameters, gradients
    and buffers stay float32, and one step is close to the float32 step from the same state
    (after two float32 steps, so CBN's window and StochNorm's running statistics are used)."""
    _check_autocast(name, backend, "cpu", torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_cuda_autocast(name, backend, dtype):
    """The same under torch.autocast('cuda') in float16 and bfloat16 (needs a GPU)."""
    if not available(backend, "cuda"):
        pytest.skip(f"backend {backend} not available on CUDA")
    _check_autocast(name, backend, "cuda", dtype)
