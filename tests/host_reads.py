"""A dispatch mode that records every read of a tensor's value by the host (``item``,
``float``, ``bool``, ...): what a CUDA graph cannot capture."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))
