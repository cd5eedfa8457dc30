"""The layers under torch.use_deterministic_algorithms(True): nothing raises on CPU
and two runs are bit-identical.

Every check runs on each backend available here for CPU tensors (reference, the C++ cpu
backend when built and enabled, triton under its interpreter); CUDA variants skip without
a GPU.
"""
import pytest
import torch

from integration_helpers import CPU_BACKENDS, LAYER_NAMES, conv_norm_relu, run_steps


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_deterministic_algorithms_bit_identical(name, backend):
    """Under torch.use_deterministic_algorithms(True) nothing raises on CPU and two runs from
    the same seed are bit-identical: outputs, gradients and state (the CPU kernels and the
    Triton kernels reduce in a fixed order, without atomics)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            model = conv_norm_relu(name, backend)
            torch.manual_seed(3)
            inputs = [torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last), torch.randn(4, 3, 6, 6)]
            runs.append(run_steps(model, inputs, seed=11))
    finally:
        torch.use_deterministic_algorithms(previous)
    (steps_a, state_a), (steps_b, state_b) = runs
    for (y, gx, grads), (y2, gx2, grads2) in zip(steps_a, steps_b):
        assert torch.equal(y, y2) and torch.equal(gx, gx2)
        assert all(torch.equal(g, g2) for g, g2 in zip(grads, grads2))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
