"""Kernel providers (being moved here from the package root, issue 14): ``triton/`` (Triton
kernels and their ops) and ``compiled`` (the C++ CPU/CUDA ops); the registry follows."""
