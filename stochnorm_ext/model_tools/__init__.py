"""Tools that work on whole models: ``convert`` (swap BatchNorm layers for ours),
``deploy`` (back to BatchNorm / folded into the conv for inference and export),
``finetune`` (L2-SP, BN scale initialisation, an input normalisation layer)."""
from .convert import convert_model, convert_sync, find_conv_bn_pairs
from .deploy import PiecewiseAffine, fold_into_conv, to_batchnorm
from .finetune import L2SP, InputNorm, bn_param_groups, bn_scale_init_, l2sp_penalty

__all__ = ["convert_model", "convert_sync", "find_conv_bn_pairs", "to_batchnorm", "fold_into_conv", "PiecewiseAffine",
           "L2SP", "InputNorm", "bn_param_groups", "bn_scale_init_", "l2sp_penalty"]
