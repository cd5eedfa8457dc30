"""What is timed on a case: the subjects (BatchNorm, the published compositions, our
backends, conv + BN / conv + CBN), each owning its parameters and running statistics."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor

from stochnorm_ext import backend as registry
from stochnorm_ext import functional as SF
from stochnorm_ext.bench.baselines import PublishedConvCBN, published_batch_group_norm, published_stoch_norm
from stochnorm_ext.bench.cases import (BGN_GROUPS, CBN_WINDOW, DTYPES, EPS, MOMENTUM, STOCH_P, Case,
                                       bgn_groups, bgn_label, conv_in_channels)
from stochnorm_ext.bench.traffic import OpBytesCounter
from stochnorm_ext.nn import Conv2dCBN


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
                _ours_cbn_step, impl=registry.resolve(backend, torch.device(dev)), rm=rm, rv=rv, w=w,
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
    # The mask is drawn on the device inside (one bool bernoulli_(p) draw), as the module does.
    return SF.stoch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS, p=STOCH_P,
                         backend=backend)


def _ours_bgn(x, num_groups, rm, rv, w, b, backend):
    return SF.batch_group_norm(x, num_groups, rm, rv, w, b, training=True, momentum=MOMENTUM,
                               eps=EPS, backend=backend)


def _ours_cbn_step(x, impl, rm, rv, w, b, past):
    # The backend op itself (see stochnorm_ext.backend): the normalisation with the past entries given.
    y, _, _ = impl.cross_iteration_norm(x, w, b, rm, rv, *past, True, MOMENTUM, EPS, True)
    return y
