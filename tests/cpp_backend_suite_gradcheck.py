"""The C++ backends' shared tests (collected through tests/cpp_backend_suite.py by tests/test_cpu_backend.py
and tests/test_cuda_backend.py, which give the ``device`` fixture): gradcheck of every
layer in both memory formats.
"""
from __future__ import annotations

import pytest
import torch

from stochnorm_ext import functional as F
from stochnorm_ext.backend import resolve

from cpp_backend_helpers import LAYERS, backend_of, groups_for, make_case, make_input, to_device


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gradcheck(device, layer, fmt):
    shape = (3, 4, 2, 2)
    backend = backend_of(device)
    case = make_case(layer, shape)
    x = make_input(case["x"], torch.float64, fmt, device)
    w = to_device(case["weight"], device=device).requires_grad_()
    b = to_device(case["bias"], device=device).requires_grad_()

    def fn(x, w, b):
        rm, rv = to_device(case["running_mean"], device=device), to_device(case["running_var"], device=device)
        if layer == "stoch":
            return F.stoch_norm(x, rm, rv, w, b, training=True, momentum=0.0, mask=case["mask"].to(device),
                                backend=backend)
        if layer.startswith("bgn"):
            return F.batch_group_norm(x, groups_for(layer, shape), rm, rv, w, b, training=True, backend=backend)
        return resolve(backend, x.device).cross_iteration_norm(
            x, w, b, rm, rv, to_device(case["past_mean"], device=device), to_device(case["past_var"], device=device),
            case["past_keep"].to(device), True, 0.1, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b))
