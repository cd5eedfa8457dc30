"""Backends that do not exist or cannot run here (docs/SPEC.md, shared rules): the right exception,
a message naming what was expected and what was given, and no state touched by the failed call.
And ``backends()``'s report of them.
"""
import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext import functional as SF

from errors_helpers import raises_untouched, randomized


# ------------------------------------------------------------------- backends
def test_unknown_backend():
    for make in (lambda: sx.StochNorm2d(4, backend="fast"), lambda: sx.BatchGroupNorm2d(4, 2, backend="fast"),
                 lambda: sx.CrossIterationBatchNorm2d(4, backend="fast")):
        with pytest.raises(ValueError, match="unknown backend 'fast'; expected one of reference, cpu, triton, cuda"):
            make()
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        SF.stoch_norm(torch.randn(3, 4), rm, rv, training=True, backend="fast")
    assert torch.equal(rm, torch.zeros(4))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_backend_unavailable_here(backend):
    """A known backend that cannot run on this CPU tensor raises RuntimeError saying why;
    skipped where it is available for CPU tensors (C++ kernels built, Triton interpreter)."""
    from stochnorm_ext import backend as registry
    if sx.backends()[backend] is None and registry.runs_on(backend, torch.device("cpu")):
        pytest.skip(f"the {backend!r} backend runs on CPU tensors here")
    for name, make, shape in [("StochNorm2d", lambda: sx.StochNorm2d(4, backend=backend), (3, 4, 2, 2)),
                              ("BGN", lambda: sx.BatchGroupNorm2d(4, 2, backend=backend), (3, 4, 2, 2)),
                              ("CBN", lambda: sx.CrossIterationBatchNorm2d(4, window=1, backend=backend),
                               (3, 4, 2, 2))]:
        layer = randomized(make())
        raises_untouched(layer, RuntimeError, rf"backend '{backend}' (is not available|does not run on cpu)",
                          lambda: layer(torch.randn(shape)))
    with pytest.raises(RuntimeError, match=rf"backend '{backend}'"):
        SF.batch_group_norm(torch.randn(3, 4), 2, training=True, backend=backend)


def test_backends_report():
    report = sx.backends()
    assert set(report) == {"reference", "cpu", "triton", "cuda"}
    assert report["reference"] is None and "reference" in sx.available_backends()
    for name, reason in report.items():
        assert reason is None or (isinstance(reason, str) and reason)
