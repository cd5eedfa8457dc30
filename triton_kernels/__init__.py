"""Triton kernels of stochnorm_ext, installed as ``stochnorm_ext.triton_kernels``
(a top-level ``triton_kernels`` would clash with the package of that name Triton ships).
Importing this package must not require Triton: kernels live in submodules."""
