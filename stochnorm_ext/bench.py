"""``python -m stochnorm_ext.bench``: check the three layers, then time them against BatchNorm.

Per device (CPU, and CUDA when present; ``--device`` picks):

1. Checks the reference against ``nn.BatchNorm2d`` where they coincide, then each layer on
   each available backend against the float64 reference, with the checks of
   ``stochnorm_ext.selfcheck`` (PASS/FAIL and the max relative error; Triton on CPU runs
   under its interpreter: checked, not timed).
2. Measures the copy bandwidth, ``dst.copy_(src)`` on a 256 MiB buffer, with the same
   timer: the ceiling of a memory-bound kernel.
3. Times the training forward (``fwd``), the backward alone (``bwd``, the graph kept and
   backpropagated again) and both (``fwd+bwd``) of, on each case (shape, batch, dtype,
   memory format):

   ``bn``        ``F.batch_norm`` in training, the baseline. Its label names the kernel that
                 ran (``cudnn`` or ``native``: on CUDA, fp32/fp16 go to cuDNN when it is
                 enabled, bf16 never does; on CPU it is always ``native``).
   ``stoch_norm``  our backends, and ``published``: two ``F.batch_norm`` calls (moving
                 branch ``training=False`` on the running buffers, batch branch
                 ``training=True``) mixed by a per-channel mask drawn on the host with
                 NumPy and moved to the device, as in the published code.
   ``bgn``       our backends (``G = C/4``), and ``published``: reshape to ``(N, G, -1)``,
                 ``F.batch_norm``, per-channel affine (the paper's description).
                 ``--bgn-groups`` times other group counts as well, as rows
                 ``bgn G=<spec>`` (``C`` is BatchNorm on our kernels, ``2C`` cuts each
                 channel in two spatial pieces).
   ``cbn``       the normalisation step of our CBN backends with a full window of 3
                 compensated past entries (the backend op, without conv or Jacobians).
   ``conv+bn``   a 1x1 conv from C/4 channels (the conv before every C-channel BN of a
                 ResNet-50 bottleneck) + ``F.batch_norm``: the baseline of ``conv+cbn``;
                 ``--conv 3x3``: a 3x3 conv from C channels (padding 1) instead.
   ``conv+cbn``  the same conv + a whole CBN step (window 4): ``published`` (statistics
                 and their Jacobians from ``torch.autograd.grad`` of the channel mean and
                 mean of squares w.r.t. the conv weight, as the released code does) and our
                 ``Conv2dCBN`` per backend.

Columns: time (ms, median), time relative to the baseline (``/BN``; ``conv+*`` rows
relative to ``conv+bn``) and to our reference backend (``/ref``), GB/s at the bytes
actually moved, that as a fraction of the copy bandwidth, and the bytes moved relative to
the minimum (fwd: read x + write y; bwd: read x, dy + write dx; fwd+bwd: both). Where the
bytes come from (``bytes`` column):

  ``kernel``  the backend module's ``bytes_moved(layer, direction, numel, element_size)``
              (``layer``: ``stoch_norm``, ``batch_group_norm`` or
              ``cross_iteration_norm``; ``direction``: ``fwd`` or ``bwd``);
  ``est``     a two-pass estimate: fwd reads x twice and writes y; bwd reads x and dy
              twice and writes dx (BatchNorm kernels, and backends without
              ``bytes_moved``);
  ``ops``     counted while running: every aten op reads its tensor inputs and writes its
              outputs once (views are free; a training batch-norm op makes the extra pass
              of the estimate above). For the eager compositions (reference, published).
  ``-``       conv rows: a conv is not memory-bound, only the time ratio is meaningful.

Timing: on CUDA ``triton.testing.do_bench`` (median; it clears the L2 cache before every
run) when Triton is importable, else CUDA events (median) with the inputs rotated over
enough copies that the working set is twice the L2 cache; on CPU
``torch.utils.benchmark.Timer.blocked_autorange`` (median of blocks, with torch's thread
count, ``--threads`` to change it) with the inputs rotated over twice the last-level cache.
Everything is warmed up first. ``--rounds R`` measures every subject R times in
alternating rounds and keeps each one's best round, so that a burst of background load
does not land on one side of a ratio only (a shared machine). ``--dry-run`` prints the
plan (cases, subjects, bytes) and runs nothing; it needs no GPU for ``--device cuda``.
Training forwards update running statistics (and CBN windows) of the timed layers; the
drift is accepted (the values stay finite) and the checks use their own inputs.

Exit status 1 if a check fails or a benchmark raises.
"""
from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from stochnorm_ext import selfcheck  # noqa: I100 (sets TRITON_INTERPRET before Triton loads)
import stochnorm_ext as sx
from stochnorm_ext import _backend
from stochnorm_ext import functional as SF
from stochnorm_ext.modules import Conv2dCBN

# ----------------------------------------------------------------------------- defaults
# A subset of ResNet-50's BatchNorm shapes (C, H, W): the first stage's bottleneck width, then
# the output width of each of the four stages.
GPU_SHAPES = [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
GPU_BATCHES = [2, 8, 32, 128]
GPU_DTYPES = ["float32", "bfloat16"]
# A short set that finishes in about two minutes on 2 CPU cores.
CPU_SHAPES = [(64, 56, 56), (1024, 14, 14)]
CPU_BATCHES = [8]
CPU_DTYPES = ["float32"]
# Every BatchNorm shape of torchvision's ResNet-50 (v1.5), for ``--shapes resnet50``.
RESNET50_BN_SHAPES = [(64, 112, 112),                                   # stem
                      (64, 56, 56), (256, 56, 56),                      # layer1
                      (128, 56, 56), (128, 28, 28), (512, 28, 28),      # layer2
                      (256, 28, 28), (256, 14, 14), (1024, 14, 14),     # layer3
                      (512, 14, 14), (512, 7, 7), (2048, 7, 7)]         # layer4
SHAPE_PRESETS = {"resnet50": RESNET50_BN_SHAPES}
MEMORY_FORMATS = ["nchw", "channels_last"]
LAYERS = ["stoch_norm", "bgn", "cbn"]
DIRECTIONS = ["fwd", "bwd", "fwd+bwd"]

STOCH_P = 0.5             # probability of the batch branch
BGN_GROUPS = ["C/4"]       # the group counts timed by default (``--bgn-groups``)
CONVS = ["1x1", "3x3"]     # the conv of conv+bn / conv+cbn (``--conv``): 1x1 from C/4, or 3x3 from C
CBN_WINDOW = 4            # the published detection configs: buffer_num=3 -> 4 steps
MOMENTUM, EPS = 0.1, 1e-5
COPY_BUFFER_BYTES = 256 * 2**20

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
SHORT_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
# The names our backends' bytes_moved() and the checks of selfcheck use for each layer.
BACKEND_LAYER = {"stoch_norm": "stoch_norm", "bgn": "batch_group_norm", "cbn": "cross_iteration_norm"}
SELFCHECK_CASES = {"stoch_norm": ["stoch_norm"], "bgn": ["bgn_G|C", "bgn_G=2C"], "cbn": ["cbn"]}


def base_layer(layer: str) -> str:
    """The layer a row label names: ``bgn G=2C`` is a ``bgn`` row."""
    return layer.split(" ")[0]


def bgn_groups(spec: str, C: int) -> int:
    """The number of BGN groups a ``--bgn-groups`` spec gives for C channels: ``C/k`` (groups
    of k whole channels), ``C`` (BatchNorm), ``kC`` (each channel cut into k pieces)."""
    text = spec.replace(" ", "").upper()
    try:
        if text.startswith("C/"):
            return max(C // int(text[2:]), 1)
        if text.endswith("C"):
            return C * int(text[:-1] or 1)
    except ValueError:
        pass
    raise ValueError(f"a BGN group spec is C/k, C or kC (e.g. C/4, C, 2C); got {spec!r}")


def bgn_label(spec: str) -> str:
    """The row label of BGN with the groups ``spec``: plain ``bgn`` for the default C/4."""
    return "bgn" if spec.replace(" ", "").upper() == "C/4" else f"bgn G={spec.replace(' ', '').upper()}"


def conv_in_channels(C: int, conv: str) -> int:
    """Input channels of the conv in front of a C-channel norm (``--conv``)."""
    return max(C // 4, 1) if conv == "1x1" else C


@dataclass(frozen=True)
class Case:
    """One input configuration: x is (batch, channels, height, width)."""
    device: str
    batch: int
    channels: int
    height: int
    width: int
    dtype: str
    memory_format: str

    @property
    def numel(self) -> int:
        return self.batch * self.channels * self.height * self.width

    @property
    def element_size(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def label(self) -> str:
        return (f"{self.batch}x{self.channels}x{self.height}x{self.width} "
                f"{SHORT_DTYPE[self.dtype]} {self.memory_format}")


# ----------------------------------------------------------------------------- bytes
def minimum_bytes(direction: str, numel: int, element_size: int) -> int:
    """The least a normalisation can move: fwd reads x and writes y; bwd reads x and dy and
    writes dx (per-channel parameters and statistics are negligible and left out)."""
    tensors = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[direction]
    return tensors * numel * element_size


def two_pass_bytes(direction: str, numel: int, element_size: int) -> int:
    """The estimate for a two-pass kernel: fwd reads x twice (statistics, then apply) and
    writes y; bwd reads x and dy twice (reductions, then apply) and writes dx."""
    tensors = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[direction]
    return tensors * numel * element_size


def kernel_bytes(backend_module, layer: str, direction: str, numel: int, element_size: int
                 ) -> Optional[int]:
    """What the backend says its kernels move, or None when it has no ``bytes_moved``."""
    report = getattr(backend_module, "bytes_moved", None)
    if report is None:
        return None
    try:
        parts = [report(BACKEND_LAYER[base_layer(layer)], d, numel, element_size) for d in direction.split("+")]
    except Exception:  # an unsupported layer/direction: fall back to the estimate
        return None
    return None if any(p is None for p in parts) else int(sum(parts))


def _tensor_bytes(values) -> int:
    total = 0
    for v in values:
        if isinstance(v, Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            total += _tensor_bytes(v)
    return total


class OpBytesCounter(TorchDispatchMode):
    """Counts the bytes that eager aten ops move, assuming no cache reuse between ops.

    Each op reads its tensor arguments and writes its outputs once. Views (outputs that
    alias an input without writing it) and allocations move nothing; ops that overwrite
    their first argument (``copy_``, ``fill_``, ``zero_``) do not read it. A batch-norm op
    in training makes a second pass over its big inputs (statistics, then apply), like the
    two-pass estimate. ``ops`` records the op names that ran.
    """

    _NO_READ_OF_SELF = ("copy_", "fill_", "zero_")

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        self.ops.append(name)
        returns = func._schema.returns
        is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                        for r in returns)
        if is_view or name.startswith("empty"):
            return out
        inputs = list(args) + list(kwargs.values())
        if name.endswith(self._NO_READ_OF_SELF):
            inputs = inputs[1:]
        moved = _tensor_bytes(inputs) + _tensor_bytes([out])
        if "batch_norm" in name and self._training(func, args, kwargs):
            # The second pass reads the input again (and the output gradient in backward).
            big = [a for a in args[:2 if "backward" in name else 1] if isinstance(a, Tensor)]
            moved += _tensor_bytes(big)
        self.bytes += moved
        return out

    @staticmethod
    def _training(func, args, kwargs) -> bool:
        if "cudnn_batch_norm_backward" in func._schema.name:
            return True  # cuDNN's backward always uses the batch statistics
        for i, arg in enumerate(func._schema.arguments):
            if arg.name in ("training", "train"):
                return bool(kwargs.get(arg.name, args[i] if i < len(args) else False))
        return False


# ----------------------------------------------------------------------------- published-style compositions
def published_stoch_norm(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor,
                         bias: Tensor, mask_host: np.ndarray, momentum: float = MOMENTUM,
                         eps: float = EPS) -> Tensor:
    """StochNorm as the published code computes it: both branches in full with two
    ``F.batch_norm`` calls, mixed by a 0/1 mask drawn on the host (``mask_host``, 1 = batch
    branch) and copied to the device on every call.

    One change: the moving branch gets a snapshot of the running buffers (two (C,) clones),
    because the batch branch updates them in place and autograd saved them by reference
    (SPEC.md: otherwise its gradient uses the updated variance). So it computes exactly
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
    training step, with ``out_p=True`` (eps inside the square root, as SPEC.md).

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


# ----------------------------------------------------------------------------- what is timed
@dataclass
class Subject:
    """One implementation timed on a case."""
    layer: str                       # stoch_norm, bgn, cbn, bn, conv+bn, conv+cbn
    impl: str                        # a backend name, "published", or the BN kernel (cudnn/native)
    forward: Callable[[Tensor], Tensor]
    params: List[Tensor]             # the leaves besides the input that get gradients
    conv_input: bool = False         # takes the conv's input (C/4 channels) instead of x
    bytes_source: str = "est"        # kernel, est, ops or -
    backend: Optional[str] = None    # our backend, for the check column

    def __post_init__(self):
        if self.backend == "reference" and self.bytes_source != "-":
            self.bytes_source = "ops"  # eager PyTorch: count what its ops move


def batch_norm_kind(x: Tensor) -> str:
    """The kernel ``F.batch_norm`` runs for this input, with parameters and statistics as
    the subjects have them: cudnn, miopen or native (observed, not predicted)."""
    counter = OpBytesCounter()
    weight, bias, mean, var = _params(x.shape[1], x.device, _param_dtype(x.dtype))
    with torch.no_grad(), counter:
        TF.batch_norm(x, mean, var, weight, bias, True, MOMENTUM, EPS)
    for kind in ("cudnn", "miopen"):
        if any(kind in op for op in counter.ops):
            return kind
    return "native"


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _params(C: int, device: str, param_dtype: torch.dtype):
    """weight, bias (requiring grad), running mean and variance, in the autocast style:
    float32 parameters whatever the input dtype (float64 for float64 input)."""
    f = dict(device=device, dtype=param_dtype)
    weight = (1 + 0.1 * torch.randn(C, **f)).requires_grad_()
    bias = (0.1 * torch.randn(C, **f)).requires_grad_()
    return weight, bias, torch.zeros(C, **f), torch.ones(C, **f)


def build_subjects(case: Case, layers: Sequence[str], backends: Sequence[str], bn_kind: str,
                   seed: int = 0, groups: Sequence[str] = tuple(BGN_GROUPS), conv: str = "1x1") -> List[Subject]:
    """Everything timed on one case, baselines first. Each subject owns its parameters
    and running statistics. ``groups``: the BGN group specs (see ``bgn_groups``); ``conv``:
    the conv of the conv+* subjects (see ``conv_in_channels``)."""
    torch.manual_seed(seed)
    dev, C, dtype = case.device, case.channels, DTYPES[case.dtype]
    pdt = _param_dtype(dtype)
    subjects = []

    w, b, rm, rv = _params(C, dev, pdt)
    subjects.append(Subject("bn", bn_kind, lambda x, w=w, b=b, rm=rm, rv=rv: TF.batch_norm(
        x, rm, rv, w, b, True, MOMENTUM, EPS), [w, b]))

    if "stoch_norm" in layers:
        rng = np.random.default_rng(seed)
        w, b, rm, rv = _params(C, dev, pdt)
        subjects.append(Subject("stoch_norm", "published", lambda x, w=w, b=b, rm=rm, rv=rv:
                                published_stoch_norm(x, rm, rv, w, b, rng.binomial(1, STOCH_P, C)),
                                [w, b], bytes_source="ops"))
        for backend in backends:
            w, b, rm, rv = _params(C, dev, pdt)
            subjects.append(Subject("stoch_norm", backend, functools.partial(
                _ours_stoch_norm, rm=rm, rv=rv, w=w, b=b, backend=backend), [w, b], backend=backend))

    for spec in (groups if "bgn" in layers else []):
        G, label = bgn_groups(spec, C), bgn_label(spec)
        w, b, _, _ = _params(C, dev, pdt)
        _, _, rm, rv = _params(G, dev, pdt)
        subjects.append(Subject(label, "published", lambda x, G=G, w=w, b=b, rm=rm, rv=rv:
                                published_batch_group_norm(x, G, rm, rv, w, b), [w, b],
                                bytes_source="ops"))
        for backend in backends:
            w, b, _, _ = _params(C, dev, pdt)
            _, _, rm, rv = _params(G, dev, pdt)
            subjects.append(Subject(label, backend, functools.partial(
                _ours_bgn, num_groups=G, rm=rm, rv=rv, w=w, b=b, backend=backend), [w, b], backend=backend))

    if "cbn" in layers:
        K = CBN_WINDOW - 1
        for backend in backends:
            w, b, rm, rv = _params(C, dev, pdt)
            past = (0.01 * torch.randn(K, C, device=dev, dtype=pdt),     # compensated means
                    1 + 0.01 * torch.rand(K, C, device=dev, dtype=pdt),   # compensated variances
                    torch.ones(K, C, device=dev, dtype=torch.bool))       # all kept
            subjects.append(Subject("cbn", backend, functools.partial(
                _ours_cbn_step, impl=_backend.resolve(backend, torch.device(dev)), rm=rm, rv=rv, w=w,
                b=b, past=past), [w, b], backend=backend))

        cin, k = conv_in_channels(C, conv), int(conv[0])
        pad = k // 2
        conv_weight = (torch.randn(C, cin, k, k, device=dev, dtype=pdt) / math.sqrt(cin * k * k)).to(dtype)
        w, b, rm, rv = _params(C, dev, pdt)
        cw = conv_weight.clone().requires_grad_()
        subjects.append(Subject("conv+bn", bn_kind, lambda u, cw=cw, w=w, b=b, rm=rm, rv=rv:
                                TF.batch_norm(TF.conv2d(u, cw, padding=pad), rm, rv, w, b, True, MOMENTUM, EPS),
                                [cw, w, b], conv_input=True, bytes_source="-"))
        w, b, _, _ = _params(C, dev, pdt)
        cw = conv_weight.clone().requires_grad_()
        subjects.append(Subject("conv+cbn", "published", PublishedConvCBN(cw, w, b, padding=pad), [cw, w, b],
                                conv_input=True, bytes_source="-"))
        for backend in backends:
            block = Conv2dCBN(cin, C, k, padding=pad, window=CBN_WINDOW, backend=backend).to(dev, pdt)
            with torch.no_grad():
                block.conv.weight.copy_(conv_weight)
            block.conv.to(dtype)  # the conv runs in the input dtype, the norm keeps float32
            subjects.append(Subject("conv+cbn", backend, block,
                                    [block.conv.weight, block.norm.weight, block.norm.bias],
                                    conv_input=True, bytes_source="-", backend=backend))
    return subjects


def build_subject_names(layers: Sequence[str], backends: Sequence[str],
                        groups: Sequence[str] = tuple(BGN_GROUPS)) -> List[Tuple[str, str]]:
    """(layer, impl) of every subject build_subjects makes, for the progress total and the plan."""
    names = [("bn", "baseline")]
    if "stoch_norm" in layers:
        names += [("stoch_norm", "published")] + [("stoch_norm", b) for b in backends]
    for spec in (groups if "bgn" in layers else []):
        names += [(bgn_label(spec), "published")] + [(bgn_label(spec), b) for b in backends]
    if "cbn" in layers:
        names += [("cbn", b) for b in backends] + [("conv+bn", "baseline"), ("conv+cbn", "published")]
        names += [("conv+cbn", b) for b in backends]
    return names


def _ours_stoch_norm(x, rm, rv, w, b, backend):
    # The mask is drawn on the device inside (torch.rand(C) < p), as the module does.
    return SF.stoch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS, p=STOCH_P,
                         backend=backend)


def _ours_bgn(x, num_groups, rm, rv, w, b, backend):
    return SF.batch_group_norm(x, num_groups, rm, rv, w, b, training=True, momentum=MOMENTUM,
                               eps=EPS, backend=backend)


def _ours_cbn_step(x, impl, rm, rv, w, b, past):
    # The backend op itself (see _backend.py): the normalisation with the past entries given.
    y, _, _ = impl.cross_iteration_norm(x, w, b, rm, rv, *past, True, MOMENTUM, EPS, True)
    return y


# ----------------------------------------------------------------------------- timing
def last_level_cache_bytes(device: str) -> int:
    """L2 of the GPU, or the largest CPU cache; 50 MB when unknown."""
    fallback = 50 * 10**6
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or fallback)
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in os.listdir(root):
            with open(os.path.join(root, index, "size")) as f:
                text = f.read().strip()
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
    except (OSError, ValueError):
        pass
    return max(sizes, default=fallback)


def have_triton_do_bench() -> bool:
    try:
        import triton.testing  # noqa: F401
    except Exception:
        return False
    return os.environ.get("TRITON_INTERPRET") != "1"


@dataclass
class TimerSettings:
    device: str
    min_run_time_s: float = 0.2   # CPU: blocked_autorange's minimum measuring time
    warmup_ms: int = 25           # CUDA
    rep_ms: int = 50              # CUDA

    @property
    def method(self) -> str:
        if self.device != "cuda":
            return "torch.utils.benchmark.Timer.blocked_autorange"
        return "triton.testing.do_bench" if have_triton_do_bench() else "CUDA events"

    @property
    def rotates_inputs(self) -> bool:
        return self.method != "triton.testing.do_bench"  # do_bench clears L2 itself


def median_ms(step: Callable[[], object], settings: TimerSettings) -> float:
    """Median time of ``step()`` in milliseconds, after a warm-up."""
    if settings.device == "cuda":
        if settings.method == "triton.testing.do_bench":
            import triton.testing
            return float(triton.testing.do_bench(step, warmup=settings.warmup_ms, rep=settings.rep_ms,
                                                 return_mode="median"))
        return _cuda_events_median_ms(step, settings)
    from torch.utils.benchmark import Timer
    for _ in range(2):
        step()
    # Timer runs with 1 thread unless told otherwise: measure with all of them.
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=settings.min_run_time_s).median * 1e3


def _cuda_events_median_ms(step, settings: TimerSettings) -> float:
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < settings.warmup_ms:
        step()
        torch.cuda.synchronize()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    repeats = max(10, int(settings.rep_ms / estimate_ms))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for begin, end in events:
        begin.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return float(np.median([begin.elapsed_time(end) for begin, end in events]))


def copy_bandwidth_gbps(settings: TimerSettings) -> float:
    """Read + write bandwidth of ``dst.copy_(src)`` on a buffer larger than any cache."""
    n = COPY_BUFFER_BYTES // 4
    src = torch.full((n,), 1.5, device=settings.device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), settings)
    return 2 * COPY_BUFFER_BYTES / (ms * 1e-3) / 1e9


class Rotation:
    """Calls its callables in turn: each call reads inputs that are not in cache."""

    def __init__(self, calls):
        self.calls, self.next = calls, 0

    def __call__(self):
        call = self.calls[self.next]
        self.next = (self.next + 1) % len(self.calls)
        return call()


def copies_for_cache(bytes_per_call: int, cache_bytes: int, limit: int = 16) -> int:
    """How many input copies make the rotated working set at least twice the cache."""
    return max(1, min(limit, math.ceil(2 * cache_bytes / max(bytes_per_call, 1))))


def make_inputs(case: Case, channels: int, copies: int) -> List[Tuple[Tensor, Tensor]]:
    """``copies`` pairs (input requiring grad, output gradient) in the case's layout."""
    fmt = torch.channels_last if case.memory_format == "channels_last" else torch.contiguous_format
    dtype = DTYPES[case.dtype]
    shape = (case.batch, channels, case.height, case.width)
    out_shape = (case.batch, case.channels, case.height, case.width)
    pairs = []
    for _ in range(copies):
        x = (torch.randn(shape, device=case.device) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
        dy = torch.randn(out_shape, device=case.device).to(dtype).contiguous(memory_format=fmt)
        pairs.append((x.requires_grad_(), dy))
    return pairs


def direction_step(subject: Subject, inputs, direction: str) -> Callable[[], object]:
    """A callable running one ``direction`` of ``subject``, rotating over ``inputs``."""
    def grads(y, x, dy, retain=False):
        return torch.autograd.grad(y, [x] + subject.params, dy, retain_graph=retain)

    if direction == "fwd":
        calls = [functools.partial(subject.forward, x) for x, _ in inputs]
    elif direction == "fwd+bwd":
        calls = [lambda x=x, dy=dy: grads(subject.forward(x), x, dy) for x, dy in inputs]
    else:  # bwd: one forward graph per input copy, backpropagated again and again
        graphs = [(subject.forward(x), x, dy) for x, dy in inputs]
        calls = [functools.partial(grads, y, x, dy, True) for y, x, dy in graphs]
    return Rotation(calls)


def counted_op_bytes(subject: Subject, x: Tensor, dy: Tensor, direction: str) -> int:
    """Bytes the eager ops of ``subject`` move in ``direction`` (see OpBytesCounter)."""
    total = 0
    if "fwd" in direction:
        with OpBytesCounter() as counter:
            subject.forward(x)
        total += counter.bytes
    if "bwd" in direction:
        y = subject.forward(x)
        with OpBytesCounter() as counter:
            torch.autograd.grad(y, [x] + subject.params, dy)
        total += counter.bytes
    return total


# ----------------------------------------------------------------------------- checks
@dataclass
class CheckResult:
    device: str
    backend: str
    layer: str        # the bench layer (stoch_norm, bgn, cbn)
    case: str         # selfcheck's case name
    dtype: str
    ok: bool
    max_rel_err: Optional[float]
    tolerance: float
    error: str = ""

    def line(self) -> str:
        if self.layer == "identity":  # selfcheck's reference == nn.BatchNorm2d checks
            return f"{'PASS' if self.ok else 'FAIL'} {self.case}"
        detail = self.error or f"max rel err {self.max_rel_err:.2e} (tol {self.tolerance:.0e})"
        return (f"{'PASS' if self.ok else 'FAIL'} {self.device:4s} {self.backend:9s} {self.case:10s} "
                f"{self.dtype:8s} {detail}")


def run_checks(device: str, backends: Sequence[str], layers: Sequence[str],
               dtypes: Sequence[str]) -> List[CheckResult]:
    """Each layer on each backend against the float64 reference, with selfcheck's inputs,
    training step and error measure (output, gradients, running statistics, CBN window)."""
    results = []
    for layer in layers:
        for case_name in SELFCHECK_CASES[layer]:
            inputs = selfcheck._case_inputs(case_name, device)
            want = selfcheck._run(case_name, "reference", inputs, torch.float64)
            for backend in backends:
                for dtype_name in dtypes:
                    dtype = DTYPES[dtype_name]
                    if backend in ("reference", "triton") and dtype == torch.float64:
                        continue  # as selfcheck: Triton computes in float32; the reference is the oracle
                    tol = selfcheck.TOLERANCE[dtype]
                    try:
                        got = selfcheck._run(case_name, backend, inputs, dtype)
                        errors = [selfcheck._rel_err(got[k], want[k]) for k in want]
                        # max() would skip a NaN that is not first: look for it explicitly.
                        err = math.nan if any(math.isnan(e) for e in errors) else max(errors)
                        results.append(CheckResult(device, backend, layer, case_name, dtype_name,
                                                   err <= tol, err, tol))
                    except Exception as exc:  # report it, check the rest
                        results.append(CheckResult(device, backend, layer, case_name, dtype_name,
                                                   False, None, tol, f"{type(exc).__name__}: {exc}"))
    return results


def identity_checks() -> List[CheckResult]:
    """selfcheck's checks of the reference against nn.BatchNorm2d (StochNorm p=1, BGN G=C,
    CBN window 1), so a wrong reference cannot make every backend look right."""
    return [CheckResult("cpu", "reference", "identity", line, "float64", ok, None, 1e-12)
            for ok, line in selfcheck.check_identities()]


def backends_to_check(device: str, requested: Optional[Sequence[str]]) -> List[str]:
    """Every available backend that runs on ``device``, Triton's interpreter on CPU included
    (checked for correctness, not timed)."""
    return [name for name in requested or sx.BACKEND_NAMES
            if sx.backends()[name] is None and _backend._supports(name, torch.device(device))]


# ----------------------------------------------------------------------------- the run
def row_for(case: Case, subject: Subject, direction: str, ms: Optional[float],
            moved: Optional[int], bytes_source: str, copies: int, timer: str, error: str = "") -> dict:
    return dict(device=case.device, layer=subject.layer, impl=subject.impl, batch=case.batch,
                channels=case.channels, height=case.height, width=case.width, dtype=case.dtype,
                memory_format=case.memory_format, direction=direction, time_ms=ms,
                bytes_moved=moved, bytes_minimum=minimum_bytes(direction, case.numel, case.element_size)
                if subject.bytes_source != "-" else None,
                bytes_source=bytes_source, input_copies=copies, timer=timer, error=error,
                backend=subject.backend)


def bytes_for(subject: Subject, case: Case, direction: str, inputs) -> Tuple[Optional[int], str]:
    """The bytes a subject moves in a direction and where the number comes from."""
    if subject.bytes_source == "-":
        return None, "-"
    if subject.bytes_source == "ops":
        x, dy = inputs[0]
        return counted_op_bytes(subject, x, dy, direction), "ops"
    if subject.backend is not None:
        module = _backend.resolve(subject.backend, torch.device(case.device))
        reported = kernel_bytes(module, subject.layer, direction, case.numel, case.element_size)
        if reported is not None:
            return reported, "kernel"
    return two_pass_bytes(direction, case.numel, case.element_size), "est"


def benchmark_case(case: Case, layers, backends, settings: TimerSettings, progress, rounds: int = 1,
                   groups: Sequence[str] = tuple(BGN_GROUPS), conv: str = "1x1") -> List[dict]:
    """Time every subject in every direction on one case; with ``rounds`` > 1 every timing is
    taken once per round, the rounds alternating over the subjects, and the best one kept."""
    # Copies by the fwd+bwd working set: x, y, dy, dx.
    copies = 1
    if settings.rotates_inputs:
        copies = copies_for_cache(4 * case.numel * case.element_size, last_level_cache_bytes(case.device))
    norm_inputs = make_inputs(case, case.channels, copies)
    conv_inputs = make_inputs(case, conv_in_channels(case.channels, conv), copies) if "cbn" in layers else None
    bn_kind = batch_norm_kind(norm_inputs[0][0].detach())
    subjects = build_subjects(case, layers, backends, bn_kind, groups=groups, conv=conv)
    inputs_of = [conv_inputs if subject.conv_input else norm_inputs for subject in subjects]
    best: Dict[Tuple[int, str], float] = {}
    errors: Dict[Tuple[int, str], str] = {}
    for i, subject in enumerate(subjects):
        try:  # also fills CBN windows and compiles/autotunes kernels before any timing
            for _ in range(CBN_WINDOW):
                direction_step(subject, inputs_of[i][:1], "fwd+bwd")()
        except Exception as exc:
            errors.update({(i, d): f"{type(exc).__name__}: {exc}" for d in DIRECTIONS})
    for _ in range(rounds):
        for i, subject in enumerate(subjects):
            for direction in DIRECTIONS:
                progress.step(f"{case.device} {case.label} {subject.layer}/{subject.impl} {direction}")
                if (i, direction) in errors:
                    continue
                try:
                    ms = median_ms(direction_step(subject, inputs_of[i], direction), settings)
                    best[i, direction] = min(best.get((i, direction), math.inf), ms)
                except Exception as exc:  # keep going; reported in the table and the exit status
                    errors[i, direction] = f"{type(exc).__name__}: {exc}"
                    if case.device == "cuda":
                        torch.cuda.empty_cache()
    rows = []
    for i, subject in enumerate(subjects):
        for direction in DIRECTIONS:
            try:
                if (i, direction) in errors:
                    raise RuntimeError(errors[i, direction])
                moved, source = bytes_for(subject, case, direction, inputs_of[i])
                rows.append(row_for(case, subject, direction, best[i, direction], moved, source,
                                    len(inputs_of[i]), settings.method))
            except Exception as exc:
                error = errors.get((i, direction)) or f"{type(exc).__name__}: {exc}"
                rows.append(row_for(case, subject, direction, None, None, "-", len(inputs_of[i]),
                                    settings.method, error))
    return rows


def add_metrics(rows: List[dict], copy_gbps: Dict[str, float], checks: List[CheckResult]) -> None:
    """Ratios to the baseline and the reference, GB/s, copy fraction, check column."""
    def key(r, layer=None, impl=None):
        return (r["device"], r["batch"], r["channels"], r["height"], r["width"], r["dtype"],
                r["memory_format"], r["direction"], layer or r["layer"], impl or r["impl"])
    times = {key(r): r["time_ms"] for r in rows}
    baseline = {key(r, impl="baseline"): r["time_ms"] for r in rows if r["layer"] in ("bn", "conv+bn")}
    check_ok: Dict[tuple, bool] = {}
    for c in checks:
        k = (c.device, c.backend, c.layer, c.dtype)
        check_ok[k] = check_ok.get(k, True) and c.ok
    for r in rows:
        t = r["time_ms"]
        baseline_layer = "conv+bn" if r["layer"].startswith("conv+") else "bn"
        t_base = baseline.get(key(r, layer=baseline_layer, impl="baseline"))
        t_ref = times.get(key(r, impl="reference"))
        r["ratio_to_bn"] = t / t_base if t and t_base else None
        r["ratio_to_reference"] = (t / t_ref if t and t_ref and r["layer"] not in ("bn", "conv+bn")
                                   else None)
        has_bytes = t and r["bytes_moved"]
        r["gbps"] = r["bytes_moved"] / (t * 1e-3) / 1e9 if has_bytes else None
        r["copy_fraction"] = r["gbps"] / copy_gbps[r["device"]] if r["gbps"] else None
        r["bytes_vs_minimum"] = r["bytes_moved"] / r["bytes_minimum"] if has_bytes else None
        check_layer = "cbn" if r["layer"] == "conv+cbn" else base_layer(r["layer"])
        ok = check_ok.get((r["device"], r["backend"], check_layer, r["dtype"]))
        r["check"] = "" if ok is None else ("pass" if ok else "FAIL")


# ----------------------------------------------------------------------------- output
COLUMNS = [("layer", "layer"), ("impl", "impl"), ("direction", "dir"), ("time_ms", "ms"),
           ("ratio_to_bn", "/BN"), ("ratio_to_reference", "/ref"), ("gbps", "GB/s"),
           ("copy_fraction", "%copy"), ("bytes_vs_minimum", "bytes/min"),
           ("bytes_source", "bytes"), ("check", "check")]


def format_value(field: str, value) -> str:
    """How one table cell is written; '-' for a missing number."""
    if value is None or value == "":
        return "-" if field not in ("check",) else ""
    if field == "time_ms":
        return f"{value:.4g}"
    if field in ("ratio_to_bn", "ratio_to_reference", "bytes_vs_minimum"):
        return f"{value:.2f}"
    if field == "gbps":
        return f"{value:.1f}"
    if field == "copy_fraction":
        return f"{100 * value:.0f}%"
    return str(value)


def case_of(row: dict) -> Case:
    return Case(row["device"], row["batch"], row["channels"], row["height"], row["width"],
                row["dtype"], row["memory_format"])


def format_table(rows: List[dict], markdown: bool = False) -> str:
    """The result table, one block per case (plain text, or markdown with a heading per case)."""
    cases: Dict[Case, List[dict]] = {}
    for r in rows:
        cases.setdefault(case_of(r), []).append(r)
    headers = [h for _, h in COLUMNS]
    blocks = []
    for case, case_rows in cases.items():
        cells = [[format_value(f, r[f]) for f, _ in COLUMNS] for r in case_rows]
        errors = [f"{r['layer']}/{r['impl']} {r['direction']}: {r['error']}" for r in case_rows if r["error"]]
        if markdown:
            lines = [f"#### {case.device} {case.label}", "",
                     "| " + " | ".join(headers) + " |",
                     "|" + "|".join("---" if i < 3 else "---:" for i in range(len(headers))) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in cells]
            lines += [""] + [f"- error: {e}" for e in errors]
        else:
            widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
            def fmt(row):
                return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
            lines = [f"== {case.device} {case.label}", fmt(headers)] + [fmt(c) for c in cells]
            lines += [f"   error: {e}" for e in errors]
        blocks.append("\n".join(lines).rstrip())
    return "\n\n".join(blocks) + "\n"


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def write_csv(path: str, rows: List[dict]) -> None:
    fields = list(rows[0].keys()) if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


LAYER_COLORS = {"bn": "black", "stoch_norm": "tab:blue", "bgn": "tab:orange", "cbn": "tab:green",
                "conv+bn": "dimgray", "conv+cbn": "tab:red"}
IMPL_STYLE = {"reference": ("x", ":"), "published": ("s", "--"), "cpu": ("o", "-"),
              "triton": ("^", "-"), "cuda": ("D", "-")}


def write_plot(path: str, rows: List[dict], environment: dict) -> None:
    """Two panels per device for fwd+bwd: speed-up over BN, and fraction of the copy
    bandwidth, per case; one line per layer/implementation (colour: layer, marker: impl)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    devices = list(dict.fromkeys(r["device"] for r in rows))
    ncases = max(len({case_of(r) for r in rows if r["device"] == d}) for d in devices)
    fig, axes = plt.subplots(2, len(devices), squeeze=False, sharex="col",
                             figsize=(len(devices) * max(9, 0.45 * ncases + 6), 9))
    for col, device in enumerate(devices):
        sel = [r for r in rows if r["device"] == device and r["direction"] == "fwd+bwd"]
        cases = list(dict.fromkeys(case_of(r) for r in sel))
        series = list(dict.fromkeys((r["layer"], r["impl"]) for r in sel))
        value = {(case_of(r), r["layer"], r["impl"]): r for r in sel}
        speed_ax, band_ax = axes[0][col], axes[1][col]
        for layer, impl in series:
            marker, style = IMPL_STYLE.get(impl, ("*", "-"))
            kw = dict(color=LAYER_COLORS.get(base_layer(layer), "purple"), marker=marker, linestyle=style,
                      label=f"{layer} / {impl}")
            found = [value.get((c, layer, impl), {}) for c in cases]
            if layer not in ("bn", "conv+bn"):
                speedup = [1 / r["ratio_to_bn"] if r.get("ratio_to_bn") else math.nan for r in found]
                speed_ax.plot(range(len(cases)), speedup, **kw)
            fraction = [r.get("copy_fraction") or math.nan for r in found]
            if not all(math.isnan(f) for f in fraction):
                band_ax.plot(range(len(cases)), fraction, **kw)
        speed_ax.axhline(1.0, color="black", linewidth=0.8)
        speed_ax.set_yscale("log")
        speed_ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        speed_ax.set_ylabel("speed-up over BN (BN time / time)\nconv+cbn: over conv+BN")
        speed_ax.set_title(f"{device}: speed-up over BN, fwd+bwd (above 1 = faster)")
        band_ax.axhline(1.0, color="black", linewidth=0.8)
        band_ax.set_ylim(bottom=0)
        band_ax.set_ylabel("fraction of copy bandwidth\n(GB/s at bytes moved / copy GB/s)")
        band_ax.set_title(f"{device}: bandwidth, fwd+bwd (1 = copy, "
                          f"{environment['devices'][device]['copy_gbps']:.1f} GB/s)")
        band_ax.set_xticks(range(len(cases)), [c.label for c in cases], rotation=30, ha="right")
        band_ax.set_xlabel("case: N x C x H x W, dtype, memory format")
        for ax in (speed_ax, band_ax):
            ax.grid(True, alpha=0.3)
        for ax in (speed_ax, band_ax):
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    names = "; ".join(f"{d}: {environment['devices'][d]['name']}" for d in devices)
    fig.suptitle(f"stochnorm_ext bench on {names}\ntorch {environment['torch']}, commit {environment['commit']}"
                 + (" (uncommitted changes)" if environment["dirty"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_report(device: str, environment: dict, checks: List[CheckResult], rows: List[dict],
                    plot_path: Optional[str], markdown_path: str) -> str:
    """One device's section of the results file: environment, checks, tables, plot."""
    info = environment["devices"][device]
    lines = [f"### {device}: {info['name']}", "",
             f"- command: `{environment['command']}`",
             f"- torch {environment['torch']}, triton {environment['triton']}, CUDA {environment['cuda']}, "
             f"cuDNN {environment['cudnn']}, Python {environment['python']}",
             f"- commit {environment['commit']}" + (" (the working tree had uncommitted changes)"
                                                    if environment["dirty"] else ""),
             "- backends here: " + ", ".join(f"{k}: {'available' if v is None else 'unavailable (' + v + ')'}"
                                               for k, v in environment["backends"].items()),
             f"- timer: {info['timer']}; copy bandwidth {info['copy_gbps']:.1f} GB/s "
             f"(`dst.copy_(src)`, {COPY_BUFFER_BYTES // 2**20} MiB, read + write)",
             f"- load average (1/5/15 min) at start {environment['load_average_at_start']}, at end "
             f"{environment.get('load_average_at_end')}, on {os.cpu_count()} CPU cores", "",
             "Checks against the float64 reference (`stochnorm_ext.selfcheck`)"
             + (", Triton under its interpreter (checked, not timed)" if device == "cpu" and any(
                 c.backend == "triton" and c.device == "cpu" for c in checks) else "") + ":", "", "```"]
    lines += [c.line() for c in checks if c.device == device] or ["(none run)"]
    lines += ["```", "", format_table([r for r in rows if r["device"] == device], markdown=True)]
    if plot_path:
        rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(markdown_path)))
        lines += [f"![fwd+bwd speed-up over BN and bandwidth fraction]({rel})", ""]
    return "\n".join(lines)


def update_markdown(path: str, device: str, section: str) -> None:
    """Put ``section`` between this device's markers in ``path`` (replacing what was there),
    or append it with markers when the file has none (creating the file)."""
    start, end = f"<!-- bench:{device}:start -->", f"<!-- bench:{device}:end -->"
    block = f"{start}\n{section.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else ""
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- environment
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Tuple[str, bool]:
    """The short commit of the source tree this module runs from, and whether it is dirty."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", root, "status", "--porcelain"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        return commit, bool(status)
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)", False


def environment_info(argv: Sequence[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    commit, dirty = git_commit()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return dict(torch=torch.__version__, triton=triton_version,
                cuda=(torch.version.cuda or "none") + ("" if torch.cuda.is_available() else " (build; no GPU here)"),
                cudnn=cudnn if cudnn else "none", python=platform.python_version(), commit=commit,
                dirty=dirty, stochnorm_ext=sx.__version__, backends=sx.backends(),
                command="python -m stochnorm_ext.bench " + " ".join(argv), devices={},
                load_average_at_start=_load_average())


def _load_average() -> Optional[List[float]]:
    """1/5/15-minute load averages: timings on a busy machine are not to be trusted."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {threads} thread{'s' if threads != 1 else ''} of {os.cpu_count()} cores"


# ----------------------------------------------------------------------------- CLI
class Progress:
    """A plain-text progress line on stderr (tqdm when it is installed)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, leave=False)
            except ImportError:
                pass
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.started
        line = f"[{self.done:4d}/{self.total}] {elapsed:5.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
        elif self.done == 1 or self.done % max(1, self.total // 20) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\n")


def parse_shape(text: str):
    """``CxHxW`` -> (C, H, W); a preset name (``resnet50``) -> its list of shapes."""
    if text.lower() in SHAPE_PRESETS:
        return list(SHAPE_PRESETS[text.lower()])
    try:
        C, H, W = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is CxHxW, e.g. 64x56x56, or one of "
                                         f"{sorted(SHAPE_PRESETS)}; got {text!r}") from None
    return C, H, W


def parse_bgn_groups(text: str) -> str:
    bgn_groups(text, 8)  # raises on a malformed spec
    return text


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m stochnorm_ext.bench",
                                description="Check the three layers against the reference, then time "
                                            "them against BatchNorm (see the module docstring).")
    p.add_argument("--device", action="append", choices=["cpu", "cuda"],
                   help="devices to run on, repeatable (default: cpu, and cuda when present)")
    p.add_argument("--layers", nargs="+", choices=LAYERS, default=LAYERS,
                   help="layers to time (default: all; cbn also times conv+cbn against conv+bn)")
    p.add_argument("--backends", nargs="+", choices=list(sx.BACKEND_NAMES),
                   help="our backends to time (default: every available one that runs natively on "
                        "the device; BatchNorm and the published compositions always run)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="CxHxW",
                   help=f"default: GPU {' '.join('x'.join(map(str, s)) for s in GPU_SHAPES)}; "
                        f"CPU {' '.join('x'.join(map(str, s)) for s in CPU_SHAPES)}; "
                        f"'resnet50': all {len(RESNET50_BN_SHAPES)} BatchNorm shapes of ResNet-50")
    p.add_argument("--batches", nargs="+", type=int,
                   help=f"default: GPU {GPU_BATCHES}, CPU {CPU_BATCHES}")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                   help=f"default: GPU {GPU_DTYPES}, CPU {CPU_DTYPES}")
    p.add_argument("--memory-formats", nargs="+", choices=MEMORY_FORMATS, default=None,
                   help=f"default: {MEMORY_FORMATS}")
    p.add_argument("--bgn-groups", nargs="+", type=parse_bgn_groups, default=list(BGN_GROUPS), metavar="SPEC",
                   help="BGN group counts to time: C/k (groups of k channels), C (BatchNorm on our "
                        "kernels), kC (k pieces per channel); default: C/4")
    p.add_argument("--conv", choices=CONVS, default="1x1",
                   help="the conv of conv+bn and conv+cbn: 1x1 from C/4 channels (default), or 3x3 "
                        "from C channels with padding 1")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternating rounds per timing, the best kept (steadier on a shared machine)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (cases, subjects, minimum bytes) and run nothing; no GPU needed")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: first default shape, smallest batch, first dtype, nchw, short timings")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="CPU: seconds blocked_autorange measures each timing (default 0.2, quick 0.02)")
    p.add_argument("--rep-ms", type=int, default=None,
                   help="CUDA: milliseconds of timed runs per timing (default 50, quick 10)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads torch uses (default: torch's default, here %d)" % torch.get_num_threads())
    p.add_argument("--skip-checks", action="store_true", help="time without checking first")
    p.add_argument("--json", metavar="FILE", help="write the environment, checks and rows as JSON")
    p.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="draw fwd+bwd speed-up over BN and bandwidth fraction")
    p.add_argument("--markdown", metavar="FILE",
                   help="write each device's report into FILE between <!-- bench:DEVICE:start/end --> "
                        "markers (replacing that section, or appending it)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p.parse_args(argv)


def cases_for(device: str, args) -> List[Case]:
    on_gpu = device == "cuda"
    shapes = ([s for item in args.shapes for s in (item if isinstance(item, list) else [item])]
              if args.shapes else (GPU_SHAPES if on_gpu else CPU_SHAPES))
    batches = args.batches or (GPU_BATCHES if on_gpu else CPU_BATCHES)
    dtypes = args.dtypes or (GPU_DTYPES if on_gpu else CPU_DTYPES)
    formats = args.memory_formats or MEMORY_FORMATS
    if args.quick:  # the first of each unless given explicitly
        shapes = shapes if args.shapes else shapes[:1]
        batches = batches if args.batches else [min(batches)]
        dtypes = dtypes if args.dtypes else dtypes[:1]
        formats = formats if args.memory_formats else ["nchw"]
    return [Case(device, n, C, H, W, dt, fmt) for (C, H, W) in shapes for n in batches
            for dt in dtypes for fmt in formats]


def backends_for(device: str, requested: Optional[Sequence[str]]) -> List[str]:
    """Our backends to time on ``device``: available ones that run natively there (Triton
    on CPU tensors is its interpreter, not a speed)."""
    chosen = []
    for name in requested or sx.BACKEND_NAMES:
        reason = sx.backends()[name]
        native = _backend._supports(name, torch.device(device)) and not (name == "triton" and device == "cpu")
        if reason is None and native:
            chosen.append(name)
        elif requested:
            why = reason or f"does not run natively on {device}"
            print(f"note: backend {name!r} skipped on {device}: {why}", file=sys.stderr)
    return chosen


def print_plan(args, devices) -> None:
    """What a run with these arguments would time (``--dry-run``): our backends are those
    available here, or the requested ones where the device is absent."""
    for device in devices:
        here = device != "cuda" or torch.cuda.is_available()
        # Without a GPU: every requested (or known) backend that can run on CUDA tensors.
        backends = (backends_for(device, args.backends) if here
                    else [n for n in args.backends or sx.BACKEND_NAMES if n != "cpu"])
        names = build_subject_names(args.layers, backends, args.bgn_groups)
        cases = cases_for(device, args)
        print(f"{device}: {len(cases)} cases x {len(names)} subjects x {len(DIRECTIONS)} directions"
              f" x {args.rounds} round(s); conv {args.conv}")
        print("  subjects: " + ", ".join(f"{layer}/{impl}" for layer, impl in names))
        for case in cases:
            sizes = " ".join(f"{d}={minimum_bytes(d, case.numel, case.element_size) / 2**20:.1f}MiB"
                             for d in DIRECTIONS)
            print(f"  {case.label:34s} minimum bytes: {sizes}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if args.dry_run:
        print_plan(args, devices)
        return 0
    if args.rounds < 1:
        print(f"error: --rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    if "cuda" in devices and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, devices)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv, devices) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    env = environment_info(argv)
    print(f"stochnorm_ext {env['stochnorm_ext']} bench: torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}")

    load = env["load_average_at_start"]
    if "cpu" in devices and load and load[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(f"warning: load average {load[0]} on {os.cpu_count()} cores: CPU timings with "
              f"{torch.get_num_threads()} threads suffer from OpenMP waiting for descheduled threads; "
              "--threads 1 gives steadier numbers", file=sys.stderr)

    plan = []
    for device in devices:
        plan.append((device, backends_for(device, args.backends), cases_for(device, args)))

    checks: List[CheckResult] = []
    if not args.skip_checks:
        checks += identity_checks()
        for device, _, cases in plan:
            # selfcheck's dtypes and the benchmarked ones
            dtypes = list(dict.fromkeys(["float64", "float32", "bfloat16"] + [c.dtype for c in cases]))
            checks += run_checks(device, backends_to_check(device, args.backends), args.layers, dtypes)
        print("\nChecks against the float64 reference:")
        for c in checks:
            print("  " + c.line())

    rows, copy_gbps = [], {}
    total = sum(len(cases) * len(build_subject_names(args.layers, backends, args.bgn_groups)) * len(DIRECTIONS)
                * args.rounds for _, backends, cases in plan)
    progress = Progress(total, enabled=not args.no_progress)
    for device, backends, cases in plan:
        settings = TimerSettings(device)
        if args.min_run_time is not None:
            settings.min_run_time_s = args.min_run_time
        elif args.quick:
            settings.min_run_time_s = 0.02
        if args.rep_ms is not None:
            settings.rep_ms = args.rep_ms
        elif args.quick:
            settings.warmup_ms, settings.rep_ms = 5, 10
        copy_gbps[device] = copy_bandwidth_gbps(settings)
        env["devices"][device] = dict(name=device_name(device), timer=settings.method,
                                      copy_gbps=copy_gbps[device], backends_timed=backends)
        for case in cases:
            rows += benchmark_case(case, args.layers, backends, settings, progress, rounds=args.rounds,
                                   groups=args.bgn_groups, conv=args.conv)
    progress.close()
    env["load_average_at_end"] = _load_average()
    add_metrics(rows, copy_gbps, checks)

    for device in devices:
        info = env["devices"][device]
        print(f"\n{device}: {info['name']}; timer {info['timer']}; copy bandwidth {info['copy_gbps']:.1f} GB/s")
    print("/BN: time relative to F.batch_norm (conv+* rows: to conv+bn); /ref: to our reference "
          "backend; bytes: kernel = reported by the backend, est = two-pass estimate, ops = counted "
          "aten ops\n")
    print(format_table(rows))

    report = dict(environment=env, checks=[asdict(c) for c in checks], rows=rows)
    if args.json:
        write_json(args.json, report)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        write_plot(args.plot, rows, env)
    if args.markdown:
        for device in devices:
            update_markdown(args.markdown, device,
                            markdown_report(device, env, checks, rows, args.plot, args.markdown))

    failed_checks = sum(not c.ok for c in checks)
    failed_runs = sum(bool(r["error"]) for r in rows)
    print(f"checks: {len(checks) - failed_checks} passed, {failed_checks} failed; "
          f"timings: {len(rows) - failed_runs} ran, {failed_runs} raised")
    return 1 if failed_checks or failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
