"""The tests the two C++ backends share, against ``stochnorm_ext.reference`` (the executable docs/SPEC.md).

Not collected by itself (the name does not start with ``test_``): tests/test_cpu_backend.py
and tests/test_cuda_backend.py import every test below and define the ``device`` fixture
they take, ``"cpu"`` (the cpu backend on CPU tensors) or ``"cuda"`` (the cuda backend on
CUDA tensors, skipped with a reason without a GPU). The C++ backends are named after their
device, so ``device`` picks both the tensors' device and the backend under test.

The tests live in one file per concern, gathered here:

- cpp_backend_suite_grid.py: every layer (StochNorm, BGN with both kinds of grouping, CBN's
  normalisation step), dtype (float64, float32, bfloat16, float16), memory format
  (contiguous, channels_last, channels_last_3d, permuted strides, sliced, misaligned by a
  storage offset so that the kernels take their scalar path) and a set of edge shapes (1x1
  spatial, N = 1, C = 3/7/17, (N, C), (N, C, L), 3d): forward output, gradients of
  input/weight/bias, running statistics;
- cpp_backend_suite_layer_edges.py: BGN's group counts and eval without running statistics,
  StochNorm's extreme masks, CBN's empty, all-dropped and all-kept windows;
- cpp_backend_suite_kernel_paths.py: long rows that the kernels split over many blocks, offset
  data (1e4 + randn), the four core ops against ATen, empty batches;
- cpp_backend_suite_gradcheck.py: gradcheck;
- cpp_backend_suite_module_state.py: module state over several steps (running statistics,
  CBN window), mixed precision;
- cpp_backend_suite_fuzz.py: fuzzed shapes;
- cpp_backend_helpers.py: the helpers they share (one step of a layer, the comparison with the
  reference and its tolerances).

Outputs are poisoned with NaN by the kernels (tests/conftest.py sets
STOCHNORM_EXT_POISON_OUTPUTS=1), so an element a kernel leaves unwritten fails the comparison.
"""
from cpp_backend_helpers import *  # noqa: F401,F403  (LAYERS, compare, ...: also used by the portable-build script)
from cpp_backend_suite_fuzz import *  # noqa: F401,F403
from cpp_backend_suite_gradcheck import *  # noqa: F401,F403
from cpp_backend_suite_grid import *  # noqa: F401,F403
from cpp_backend_suite_kernel_paths import *  # noqa: F401,F403
from cpp_backend_suite_layer_edges import *  # noqa: F401,F403
from cpp_backend_suite_module_state import *  # noqa: F401,F403
