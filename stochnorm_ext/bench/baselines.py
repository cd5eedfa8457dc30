"""The published compositions our layers are compared with, written as the papers and the
released code compute them (each one tested against our reference in tests/test_bench.py,
so both sides of a ratio compute the same thing)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor

from stochnorm_ext.bench.cases import CBN_WINDOW, EPS, MOMENTUM


def published_stoch_norm(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor,
                         bias: Tensor, mask_host: np.ndarray, momentum: float = MOMENTUM,
                         eps: float = EPS) -> Tensor:
    """StochNorm as the published code computes it: both branches in full with two
    ``F.batch_norm`` calls, mixed by a 0/1 mask drawn on the host (``mask_host``, 1 = batch
    branch) and copied to the device on every call.

    One change: the moving branch gets a snapshot of the running buffers (two (C,) clones),
    because the batch branch updates them in place and autograd saved them by reference
    (docs/SPEC.md: otherwise its gradient uses the updated variance). So it computes exactly
    what the reference computes, at the published cost.
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    s = torch.from_numpy(mask_host).to(device=x.device, dtype=x.dtype).view(shape)
    moving_mean, moving_var = running_mean.clone(), running_var.clone()
    z_moving = TF.batch_norm(x, moving_mean, moving_var, weight, bias, False, momentum, eps)
    z_batch = TF.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return (1 - s) * z_moving + s * z_batch


def published_batch_group_norm(x: Tensor, num_groups: int, running_mean: Tensor,
                               running_var: Tensor, weight: Tensor, bias: Tensor,
                               momentum: float = MOMENTUM, eps: float = EPS) -> Tensor:
    """BGN as the paper describes it: reshape to ``(N, G, -1)`` (a copy for channels_last),
    ``F.batch_norm`` over dims 0 and 2, then the per-channel affine."""
    N, C = x.shape[:2]
    z = TF.batch_norm(x.reshape(N, num_groups, -1), running_mean, running_var, None, None, True,
                      momentum, eps).reshape(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    return z * weight.to(x.dtype).view(shape) + bias.to(x.dtype).view(shape)


class PublishedConvCBN:
    """conv + CBN as the released CBN code (Yao et al., ``CBatchNorm2d``) computes a
    training step, with ``out_p=True`` (eps inside the square root, as docs/SPEC.md).

    The statistics are raw moments of the conv output transposed to ``(C, N*H*W)``; their
    Jacobians w.r.t. the conv weight come from ``torch.autograd.grad`` (retain_graph=True,
    create_graph=False); the past steps live in Python lists, newest first, each moved to
    the current weight by a Taylor step; a past entry with a negative variance is dropped.
    """

    def __init__(self, conv_weight: Tensor, weight: Tensor, bias: Tensor, window: int = CBN_WINDOW,
                 rho: float = 1.0, momentum: float = MOMENTUM, eps: float = EPS, padding: int = 0):
        self.conv_weight, self.weight, self.bias, self.padding = conv_weight, weight, bias, padding
        C = conv_weight.shape[0]
        self.running_mean = torch.zeros(C, device=weight.device, dtype=weight.dtype)
        self.running_var = torch.ones(C, device=weight.device, dtype=weight.dtype)
        self.buffer_num, self.rho, self.momentum, self.eps = window - 1, rho, momentum, eps
        self.pre_mu, self.pre_meanx2, self.pre_dmudw, self.pre_dmeanx2dw, self.pre_weight = [], [], [], [], []

    def __call__(self, conv_input: Tensor) -> Tensor:
        w = self.conv_weight
        x = TF.conv2d(conv_input, w, padding=self.padding)
        y = x.transpose(0, 1)
        return_shape = y.shape
        y = y.contiguous().view(x.size(1), -1)
        cur_mu = y.mean(dim=1)
        cur_meanx2 = torch.pow(y, 2).mean(dim=1)
        cur_sigma2 = y.var(dim=1)
        ones = torch.ones_like(cur_mu)
        dmu_dw = torch.autograd.grad(cur_mu, w, ones, retain_graph=True)[0]
        dmeanx2_dw = torch.autograd.grad(cur_meanx2, w, ones, retain_graph=True)[0]
        rho, dims = self.rho, (1, 2, 3)
        mu_all = torch.stack([cur_mu] + [
            m + (rho * d * (w.data - old_w)).sum(dims).to(m.dtype)
            for m, d, old_w in zip(self.pre_mu, self.pre_dmudw, self.pre_weight)])
        meanx2_all = torch.stack([cur_meanx2] + [
            m + (rho * d * (w.data - old_w)).sum(dims).to(m.dtype)
            for m, d, old_w in zip(self.pre_meanx2, self.pre_dmeanx2dw, self.pre_weight)])
        sigma2_all = meanx2_all - torch.pow(mu_all, 2)
        re_mu_all, re_meanx2_all = mu_all.clone(), meanx2_all.clone()
        re_mu_all[sigma2_all < 0] = 0
        re_meanx2_all[sigma2_all < 0] = 0
        count = (sigma2_all >= 0).sum(dim=0).to(mu_all.dtype)
        mu = re_mu_all.sum(dim=0) / count
        sigma2 = re_meanx2_all.sum(dim=0) / count - torch.pow(mu, 2)
        keep = self.buffer_num - 1
        self.pre_mu = [cur_mu.detach()] + self.pre_mu[:keep]
        self.pre_meanx2 = [cur_meanx2.detach()] + self.pre_meanx2[:keep]
        self.pre_dmudw = [dmu_dw.detach()] + self.pre_dmudw[:keep]
        self.pre_dmeanx2dw = [dmeanx2_dw.detach()] + self.pre_dmeanx2dw[:keep]
        self.pre_weight = [w.data.clone()] + self.pre_weight[:keep]
        with torch.no_grad():
            f = self.momentum
            self.running_mean.mul_(1 - f).add_(cur_mu.to(self.running_mean.dtype), alpha=f)
            self.running_var.mul_(1 - f).add_(cur_sigma2.to(self.running_var.dtype), alpha=f)
        y = (y - mu.view(-1, 1)) / (sigma2.view(-1, 1) + self.eps) ** 0.5
        y = self.weight.to(y.dtype).view(-1, 1) * y + self.bias.to(y.dtype).view(-1, 1)
        return y.view(return_shape).transpose(0, 1)
