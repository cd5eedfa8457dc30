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
    from stochnorm_ext import _backend
    if stochnorm_ext.backends()[backend] is not None:
        return False
    return _backend._supports(backend, torch.device(device))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN (floats) so an element a kernel forgets to write fails a test."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
