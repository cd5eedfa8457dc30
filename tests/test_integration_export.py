"""torch.export of eval-mode converted ResNet-18s.

Every check runs on each backend available here for CPU tensors (reference, the C++ cpu
backend when built and enabled, triton under its interpreter); CUDA variants skip without
a GPU.
"""
import pytest
import torch

from integration_helpers import IMAGE, RESNET_KINDS, converted_resnet


# --------------------------------------------------------------------------- torch.export
@pytest.mark.timeout(600)
@pytest.mark.parametrize("key", list(RESNET_KINDS))
def test_export_eval_converted_resnet18(key):
    """torch.export.export of an eval-mode converted ResNet-18 (running statistics of real
    activations, see converted_resnet); the exported program gives the model's output on another
    input, channels_last included."""
    model = converted_resnet(key).eval()
    x = torch.randn(IMAGE)
    program = torch.export.export(model, (x,))
    other = torch.randn(IMAGE)
    with torch.no_grad():
        expected = model(other)
        torch.testing.assert_close(program.module()(other), expected, rtol=1e-4, atol=1e-4)
        cl = other.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(program.module()(cl), expected, rtol=1e-4, atol=1e-4)
