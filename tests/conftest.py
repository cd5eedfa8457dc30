"""Test configuration shared by every test file.

Without a GPU, Triton kernels run on CPU tensors under its interpreter; the variable
must be set before any ``@triton.jit`` function is defined, so it is set here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every kernel backend fills the outputs it allocates with NaN before its kernels run when
# this is set, so an element a kernel forgets to write fails the comparison with the reference.
os.environ.setdefault("STOCHNORM_EXT_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

import stochnorm_ext  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def available(backend: str, device: str) -> bool:
    """Whether ``backend`` runs on ``device`` here (kernels built, device present)."""
    from stochnorm_ext import backend as registry
    if stochnorm_ext.backends()[backend] is not None:
        return False
    return registry.runs_on(backend, torch.device(device))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN (floats) so an element a kernel forgets to write fails a test."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


def randomize_bn_(m, num_batches_tracked: int):
    """Random affine parameters and running statistics (never the init values) of a BatchNorm-like
    layer, in place, and ``num_batches_tracked`` set; returns the layer."""
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(1 + 0.4 * torch.randn_like(m.weight))
            m.bias.copy_(0.3 * torch.randn_like(m.bias))
        if m.running_mean is not None:
            m.running_mean.copy_(0.5 * torch.randn_like(m.running_mean))
            m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
            m.num_batches_tracked.fill_(num_batches_tracked)
    return m


def load_example(name: str):
    """Import ``examples/<name>.py`` (not a package) as a module."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(module, argv):
    """``module.main(argv)`` and what it printed, restoring the process-wide thread count
    that the examples' main() sets."""
    import contextlib
    import io

    threads = torch.get_num_threads()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            result = module.main(argv)
    finally:
        torch.set_num_threads(threads)
    return result, printed.getvalue()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
