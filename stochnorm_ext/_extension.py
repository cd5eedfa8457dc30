"""The compiled extension ``stochnorm_ext._C``: loading it, and saying in plain words why it
is not there.

``_C`` is loaded only from this package's own folder. A source checkout imported without its
build (``python`` started in the repository root, whose ``stochnorm_ext/`` hides an installed
copy) has none there: the ImportError then says what is missing and how to fix it, where
Python would say "cannot import name '_C' ... circular import" (or, beside an editable
install of another tree, silently load that tree's library with this tree's Python code).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from typing import Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.path.dirname(PACKAGE_DIR)

__all__ = ["load", "expected"]


def _library_in(directory: str) -> Optional[str]:
    """The path of a built ``_C`` in ``directory`` (any suffix this Python imports), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(directory, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def _is_source_checkout() -> bool:
    """Whether this package is the ``stochnorm_ext/`` folder of a source tree."""
    return (os.path.isfile(os.path.join(SOURCE_ROOT, "setup.py"))
            and os.path.isdir(os.path.join(SOURCE_ROOT, "csrc")))


def _hidden_copy() -> Optional[str]:
    """Another stochnorm_ext on sys.path, with its compiled extension, that this one hides."""
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "stochnorm_ext")
        if os.path.normcase(candidate) != os.path.normcase(PACKAGE_DIR) and _library_in(candidate):
            return candidate
    return None


def expected() -> bool:
    """Whether this copy of the package should have its compiled kernels: a source checkout,
    a library that is there but does not load, or a built copy that this one hides."""
    return _is_source_checkout() or _library_in(PACKAGE_DIR) is not None or _hidden_copy() is not None


def _missing_reason() -> str:
    hidden = _hidden_copy()
    hides = (f"; it hides the stochnorm_ext installed at {hidden}, which has its compiled kernels "
             "(Python imports from the current directory first)") if hidden else ""
    fallback = ("Until then only the pure-PyTorch 'reference' backend (and 'triton' where Triton "
                "runs) is available.")
    if _is_source_checkout():
        return (f"the compiled C++ kernels (stochnorm_ext._C) are not built in this source tree: "
                f"{PACKAGE_DIR} has no _C library{hides}. To fix it, build them in place "
                f"(in {SOURCE_ROOT}: `pip install --no-build-isolation -e .` or "
                "`python setup.py build_ext --inplace`), or run Python from another directory so that "
                f"the installed stochnorm_ext is imported. {fallback}")
    return (f"the compiled C++ kernels (stochnorm_ext._C) are missing from {PACKAGE_DIR}{hides}: this copy "
            "of stochnorm_ext was copied or installed without its build. To fix it, install stochnorm_ext "
            f"from its sources or a wheel (`pip install --no-build-isolation <source tree>`). {fallback}")


def load():
    """Import ``stochnorm_ext._C`` (which registers the op schemas and kernels) from this
    package's folder; raise ImportError saying what is missing or why it does not load."""
    library = _library_in(PACKAGE_DIR)
    if library is None:
        raise ImportError(_missing_reason())
    try:
        return importlib.import_module(__package__ + "._C")
    except ImportError as exc:
        import torch
        raise ImportError(f"the compiled C++ kernels {library} do not load ({exc}); most likely they were "
                          f"built against another torch than the {torch.__version__} here: rebuild them "
                          "(`pip install --no-build-isolation` of the source tree, or "
                          "`python setup.py build_ext --inplace` in it)") from exc
