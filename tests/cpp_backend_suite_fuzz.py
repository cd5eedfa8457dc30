"""The C++ backends' shared tests (collected through tests/cpp_backend_suite.py by tests/test_cpu_backend.py
and tests/test_cuda_backend.py, which give the ``device`` fixture): fuzzed shapes
(hypothesis) of every layer against the reference.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpp_backend_helpers import LAYERS, compare, groups_for


# ----------------------------------------------------------------------------- fuzzing
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 4), C=st.integers(1, 19), spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       layer=st.sampled_from(LAYERS), fmt=st.sampled_from(["contiguous", "channels_last", "noncontig"]),
       seed=st.integers(0, 2 ** 16))
def test_fuzz_shapes(device, N, C, spatial, layer, fmt, seed):
    shape = (N, C, *spatial)
    S = 1
    for s in spatial:
        S *= s
    if (layer == "cbn" and len(shape) != 4) or (layer == "bgn_mul" and S == 1):
        return
    if layer.startswith("bgn") and N * C * S // groups_for(layer, shape) < 2 or N * S < 2:
        return  # one value per statistic: an error in training
    if fmt == "channels_last" and len(shape) not in (4, 5):
        fmt = "contiguous"
    if fmt == "noncontig" and torch.empty(shape).transpose(0, -1).contiguous().transpose(0, -1).is_contiguous():
        fmt = "contiguous"  # permuting these strides gives a contiguous tensor again (size-1 dims)
    compare(device, layer, shape, torch.float64, fmt, seed=seed)
