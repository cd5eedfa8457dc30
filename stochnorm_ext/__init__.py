"""stochnorm_ext: fused StochNorm, Batch Group Normalization and Cross-Iteration BN for PyTorch.

Modules: ``StochNorm1d/2d/3d``, ``BatchGroupNorm1d/2d/3d``, ``CrossIterationBatchNorm2d``
(and ``Conv2dCBN``); ``convert_model(model, kind)`` swaps a model's BatchNorm layers;
``convert_sync(model)`` turns on statistics synchronised across processes
(``torch.distributed``, see ``stochnorm_ext.distributed``);
``stochnorm_ext.functional`` has the differentiable functions; ``stochnorm_ext.reference``
the pure-PyTorch definitions every backend is tested against; ``backends()`` says which
backends (``reference``, ``cpu``, ``triton``, ``cuda``) are available here.
"""
from . import functional, reference
# The kernel providers' package is imported before the name ``backends`` is bound to the
# function below: importing a submodule sets the package attribute only on its first import,
# so ``stochnorm_ext.backends()`` stays the function (reach the package with
# ``from stochnorm_ext.backends import ...``).
from . import backends as _providers  # noqa: F401,E402
from ._backend import BACKEND_NAMES, available_backends, backends  # noqa: E402
from .cbn_window import CBNWindow
from .convert import convert_model, find_conv_bn_pairs
from .distributed import convert_sync
from .finetune import L2SP, InputNorm, bn_param_groups, bn_scale_init_, l2sp_penalty
from .deploy import PiecewiseAffine, fold_into_conv, to_batchnorm
from .modules import (BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d, Conv2dCBN,
                      CrossIterationBatchNorm2d, StochNorm1d, StochNorm2d, StochNorm3d)

__version__ = "0.1.0"

from . import _backend as _backend_module  # noqa: E402

_backend_module.preload()

__all__ = [
    "StochNorm1d", "StochNorm2d", "StochNorm3d",
    "BatchGroupNorm1d", "BatchGroupNorm2d", "BatchGroupNorm3d",
    "CrossIterationBatchNorm2d", "Conv2dCBN", "CBNWindow",
    "convert_model", "find_conv_bn_pairs", "convert_sync", "functional", "reference",
    "to_batchnorm", "fold_into_conv", "PiecewiseAffine",
    "backends", "available_backends", "BACKEND_NAMES", "__version__",
    "L2SP", "l2sp_penalty", "bn_scale_init_", "bn_param_groups", "InputNorm",
]
