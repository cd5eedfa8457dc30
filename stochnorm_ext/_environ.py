"""Environment variables read at every call, cheaply: a setting takes effect at the next call.

``os.environ.get`` of an unset variable raises and catches a ``KeyError`` inside (about
1.5 us on a CPU), once per layer call or per allocation where it is read; CPython's
``os.environ`` keeps the encoded dict it reads in ``_data``, where a miss is one lookup.
Traced code (torch.compile) and any other ``os.environ`` take ``os.environ.get``.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch


def reader(name: str) -> Callable[[], Optional[str]]:
    """A function returning the variable ``name`` (None when unset) at each call."""
    key = os.environ.encodekey(name) if hasattr(os.environ, "encodekey") else None

    def read() -> Optional[str]:
        data = getattr(os.environ, "_data", None)
        if key is None or type(data) is not dict or torch.compiler.is_compiling():
            return os.environ.get(name)
        value = data.get(key)
        return os.environ.decodevalue(value) if value is not None else None

    return read
