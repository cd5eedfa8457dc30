"""The C++ backends' shared tests (collected through tests/cpp_backend_suite.py by tests/test_cpu_backend.py
and tests/test_cuda_backend.py, which give the ``device`` fixture): every layer
(StochNorm, BGN with both kinds of grouping, CBN's normalisation step), dtype (float64,
float32, bfloat16, float16) and memory format (contiguous, channels_last, channels_last_3d,
permuted strides, sliced, misaligned by a storage offset) over a set of edge shapes against
the float64 reference: forward output, gradients, running statistics; without affine, in eval,
with parameters in the input's dtype, without updating the running statistics.
"""
from __future__ import annotations

import pytest
import torch

from cpp_backend_helpers import ALL_DTYPES, LAYERS, LOW_PRECISION, backend_of, compare, make_case, run


# ----------------------------------------------------------------------------- the grid
# Shapes chosen for the kernels' paths: odd C and L (scalar access), C and L multiples of 8
# (16-byte packs in both layouts for every dtype), 1x1 spatial (planar rows of one value,
# walked as interleaved), N = 1 with spatial > 1, (N, C) and (N, C, L), 3d.
SHAPES_4D = [(4, 3, 5, 5), (2, 7, 3, 4), (1, 17, 2, 3), (8, 5, 1, 1), (3, 16, 4, 4), (2, 32, 8, 8)]
SHAPES_OTHER = [(6, 7), (5, 16), (4, 7, 9), (1, 3, 6), (3, 8, 16), (2, 3, 2, 3, 4), (2, 17, 3, 2, 2),
                (2, 8, 2, 4, 4)]


def _formats(shape):
    fmts = ["contiguous", "noncontig", "offset"]
    if len(shape) in (4, 5):
        fmts.append("channels_last")
    return fmts


def _grid(shapes, layers):
    for layer in layers:
        for shape in shapes:
            if layer == "cbn" and len(shape) != 4:
                continue  # CBN is a 2d layer
            if layer == "bgn_mul" and all(s == 1 for s in shape[2:]):
                continue  # one position per channel cannot be cut into pieces
            for fmt in _formats(shape):
                yield layer, shape, fmt


GRID = list(_grid(SHAPES_4D + SHAPES_OTHER, LAYERS))


def _ids(cases):
    return [f"{layer}-{'x'.join(map(str, shape))}-{fmt}" for layer, shape, fmt in cases]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layer,shape,fmt", GRID, ids=_ids(GRID))
def test_training_step_matches_reference(device, layer, shape, fmt, dtype):
    compare(device, layer, shape, dtype, fmt)


LOWP_GRID = [c for c in GRID if c[1] in ((4, 3, 5, 5), (2, 32, 8, 8), (1, 17, 2, 3), (4, 7, 9), (3, 8, 16),
                                         (2, 8, 2, 4, 4), (6, 7), (5, 16), (2, 17, 3, 2, 2))
             and c[2] != "noncontig"]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layer,shape,fmt", LOWP_GRID, ids=_ids(LOWP_GRID))
def test_low_precision_matches_reference(device, layer, shape, fmt, dtype):
    compare(device, layer, shape, dtype, fmt)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sliced_input(device, layer, dtype):
    compare(device, layer, (3, 8, 4, 4), dtype, "sliced")


@pytest.mark.parametrize("C", [6, 8])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS)
def test_parameters_in_input_dtype(device, layer, dtype, C):
    """Affine parameters and running statistics in the input's own (low) precision."""
    compare(device, layer, (4, C, 4, 4), dtype, "contiguous", param_dtype=dtype)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_without_affine(device, layer, fmt):
    compare(device, layer, (4, 6, 4, 4), torch.float64, fmt, affine=False)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layer", LAYERS)
def test_eval_matches_reference(device, layer, fmt):
    """Eval: running statistics (plain BN for StochNorm/CBN, per-group for BGN), nothing updated."""
    got, _ = compare(device, layer, (3, 6, 4, 4), torch.float64, fmt, training=False)
    case = make_case(layer, (3, 6, 4, 4))
    assert torch.equal(got["running_mean"].cpu(), case["running_mean"])
    assert torch.equal(got["running_var"].cpu(), case["running_var"])


@pytest.mark.parametrize("layer", LAYERS)
def test_update_stats_false_leaves_running_stats(device, layer):
    case = make_case(layer, (3, 6, 4, 4))
    got = run(layer, backend_of(device), case, torch.float64, "contiguous", device, update_stats=False)
    assert torch.equal(got["running_mean"].cpu(), case["running_mean"])
    assert torch.equal(got["running_var"].cpu(), case["running_var"])
