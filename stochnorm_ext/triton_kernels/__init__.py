"""Triton kernels of stochnorm_ext (not a top-level ``triton_kernels``: that name would
clash with the package Triton ships).
Importing this package must not require Triton: kernels live in submodules.

- ``norm_kernels``: the shared segment-statistics / apply / backward kernels and the
  small per-layer finalize kernels (used by ``stochnorm_ext._backend_triton``);
- ``compile_check``: compiles every kernel variant the backend launches for an NVIDIA
  target without a GPU (``python -m stochnorm_ext.triton_kernels.compile_check``).
"""
