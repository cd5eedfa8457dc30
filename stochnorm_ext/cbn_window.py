"""The window of Cross-Iteration BN: storage, Taylor compensation and Jacobians (SPEC.md).

This part of CBN is backend-independent plain PyTorch: it is O(window x weight size)
per step, tiny next to the normalisation itself except for the Jacobian ``dvar``, which
is one convolution weight-gradient (``aten.convolution_backward``) per step.

Storage per stored step ``tau`` (a ring buffer of ``window - 1`` slots)::

    mean  (K, C)                      mu_tau
    var   (K, C)                      var_tau (biased)
    dmu   (K, Gc, Cin/Gc*kh*kw)       d mu / d W_c: one slice per conv group
    dvar  (K, C, Cin/Gc*kh*kw)        d var / d W_c = 2 mean((x_c - mu) * patch)
    dmu_w (K, C)  float64             <dmu_tau, W_c(tau)>   (instead of storing W(tau))
    dvar_w(K, C)  float64             <dvar_tau, W_c(tau)>
    valid (K,)    bool                which slots hold an entry
    head  ()      int64               slot the next entry goes to
    step  ()      int64               CBN's own training-step counter (burn-in)

The Jacobians are stored flattened to 3D: ``model.to(memory_format=torch.channels_last)``
converts every 4D/5D tensor of a model, and a weight-shaped 5D buffer cannot take that
format. All updates are tensor operations (no host synchronisation), so a training step
can be captured by torch.compile or a CUDA graph.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CBNWindow", "ConvGeometry", "compensated_past", "conv_jacobians", "push_entry"]


class ConvGeometry(NamedTuple):
    """What the Jacobians need to know about the convolution that produces CBN's input."""
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    # Extra input padding for padding modes other than zeros or asymmetric 'same'
    # padding: (left, right, top, bottom) and the mode F.pad uses.
    input_pad: Tuple[int, int, int, int] = (0, 0, 0, 0)
    pad_mode: str = "constant"

    @staticmethod
    def from_conv(conv: torch.nn.Conv2d) -> "ConvGeometry":
        """Geometry of an ``nn.Conv2d``, with every padding form it accepts."""
        kh, kw = conv.kernel_size
        dilation = tuple(conv.dilation)
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                sym, extra = (0, 0), (0, 0, 0, 0)
            else:  # 'same': total padding dilation * (k - 1), the odd unit on the right/bottom
                th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
                sym = (th // 2, tw // 2)
                extra = (0, tw - 2 * (tw // 2), 0, th - 2 * (th // 2))
        else:
            sym, extra = tuple(conv.padding), (0, 0, 0, 0)
        if conv.padding_mode != "zeros":
            # nn.Conv2d pads the input itself with the mode, then convolves with padding 0.
            ph, pw = sym
            extra = (pw + extra[0], pw + extra[1], ph + extra[2], ph + extra[3])
            return ConvGeometry(tuple(conv.stride), (0, 0), dilation, conv.groups, extra,
                                conv.padding_mode)
        return ConvGeometry(tuple(conv.stride), sym, dilation, conv.groups, extra, "constant")


class CBNWindow(NamedTuple):
    """The ring buffer of past steps (see the module docstring). Tensors are updated in place."""
    mean: Tensor
    var: Tensor
    dmu: Tensor
    dvar: Tensor
    dmu_w: Tensor
    dvar_w: Tensor
    valid: Tensor
    head: Tensor
    step: Tensor

    @property
    def slots(self) -> int:
        return self.mean.shape[0]

    @staticmethod
    def empty(window: int, num_features: int, conv_weight_shape: Sequence[int], conv_groups: int = 1,
              device=None, dtype=torch.float32) -> "CBNWindow":
        """An empty window of ``window - 1`` slots for a conv weight of ``conv_weight_shape``
        ``(C, Cin/groups, kh, kw)``."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        C, cin_g, kh, kw = conv_weight_shape
        if C != num_features:
            raise ValueError(f"the conv has {C} output channels but the layer has {num_features} features")
        K = window - 1
        f = dict(device=device, dtype=dtype)
        return CBNWindow(
            mean=torch.zeros(K, C, **f), var=torch.zeros(K, C, **f),
            dmu=torch.zeros(K, conv_groups, cin_g * kh * kw, **f),
            dvar=torch.zeros(K, C, cin_g * kh * kw, **f),
            dmu_w=torch.zeros(K, C, device=device, dtype=torch.float64),
            dvar_w=torch.zeros(K, C, device=device, dtype=torch.float64),
            valid=torch.zeros(K, dtype=torch.bool, device=device),
            head=torch.zeros((), dtype=torch.long, device=device),
            step=torch.zeros((), dtype=torch.long, device=device),
        )


def _dots_with_weight(window: CBNWindow, conv_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """<dmu_k, W_c> and <dvar_k, W_c> for every slot k and channel c, in float64
    (the stored <., W(tau)> are subtracted from them: float64 keeps the difference)."""
    K, G = window.dmu.shape[:2]
    C = conv_weight.shape[0]
    w = conv_weight.detach().to(torch.float64)
    dmu = window.dmu.to(torch.float64)
    dmu_dot = torch.einsum("kgi,gci->kgc", dmu, w.reshape(G, C // G, -1))
    dvar_dot = torch.einsum("kci,ci->kc", window.dvar.to(torch.float64), w.reshape(C, -1))
    return dmu_dot.reshape(K, C), dvar_dot


def compensated_past(window: CBNWindow, conv_weight: Tensor, rho: float, burnin: int
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """The stored statistics moved to the current weights by a first-order Taylor step.

    With ``delta = rho * <dmu_tau, W_c(t) - W_c(tau)>``::

        mu'  = mu_tau + delta
        var' = var_tau + rho * <dvar_tau, W_c(t) - W_c(tau)> - delta^2

    (the published ``nu' - mu'^2`` rearranged so float32 does not cancel). An entry is
    kept for channel c if its slot is filled, ``var' >= 0`` (the published rule) and the
    burn-in is over. Returns ``(past_mean, past_var, keep)``, each (K, C), detached.
    """
    with torch.no_grad():
        dmu_dot, dvar_dot = _dots_with_weight(window, conv_weight)
        delta = rho * (dmu_dot - window.dmu_w)
        past_mean = window.mean.to(torch.float64) + delta
        past_var = window.var.to(torch.float64) + rho * (dvar_dot - window.dvar_w) - delta * delta
        keep = window.valid.unsqueeze(1) & (past_var >= 0) & (window.step >= burnin)
        dtype = window.mean.dtype
        return past_mean.to(dtype), past_var.to(dtype), keep


def conv_jacobians(conv_input: Tensor, conv_weight: Tensor, x: Tensor, mu_t: Tensor,
                   geometry: ConvGeometry) -> Tuple[Tensor, Tensor]:
    """The current step's Jacobians w.r.t. the conv weight, in closed form.

    ``dmu[g] = mean over (n, positions) of the input patch`` and
    ``dvar[c] = 2 * mean((x_c - mu_c) * patch)`` are weight-gradients of the conv with
    ``grad_output = 1/M`` and ``2 (x - mu) / M``. Both come out of one
    ``aten.convolution_backward`` call: the ``1/M`` map is stacked as one extra output
    channel per conv group. No autograd graph is involved. Returns
    ``dmu (Gc, Cin/Gc, kh, kw)`` and ``dvar (C, Cin/Gc, kh, kw)`` in float32 (float64 for
    float64 input).
    """
    with torch.no_grad():
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        N, C, Ho, Wo = x.shape
        G = geometry.groups
        M = N * Ho * Wo
        inp = conv_input.detach().to(acc)
        if any(geometry.input_pad):
            inp = F.pad(inp, geometry.input_pad, mode=geometry.pad_mode)
        centred = (x.detach().to(acc) - mu_t.to(acc).view(1, C, 1, 1)) * (2.0 / M)
        uniform = centred.new_full((N, G, 1, Ho, Wo), 1.0 / M)
        grad_out = torch.cat([centred.reshape(N, G, C // G, Ho, Wo), uniform], dim=2)
        grad_out = grad_out.reshape(N, G * (C // G + 1), Ho, Wo)
        cin_g, kh, kw = conv_weight.shape[1:]
        stacked_weight = inp.new_zeros(G * (C // G + 1), cin_g, kh, kw)
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, inp, stacked_weight, None, list(geometry.stride), list(geometry.padding),
            list(geometry.dilation), False, [0, 0], G, [False, True, False])
        grad_w = grad_w.reshape(G, C // G + 1, cin_g, kh, kw)
        dvar = grad_w[:, : C // G].reshape(C, cin_g, kh, kw)
        dmu = grad_w[:, C // G]
        return dmu, dvar


def push_entry(window: CBNWindow, mu_t: Tensor, var_t: Tensor, dmu: Tensor, dvar: Tensor,
               conv_weight: Tensor, burnin: int) -> None:
    """Store the current step in the ring buffer once the burn-in is over, then count the
    step. Tensor-only (no host sync): during burn-in the slot is rewritten with itself."""
    with torch.no_grad():
        store = window.step >= burnin
        slot = window.head.view(1)
        w = conv_weight.detach().to(torch.float64)
        G = dmu.shape[0]
        C = w.shape[0]
        dmu_w = torch.einsum("gi,gci->gc", dmu.to(torch.float64).reshape(G, -1),
                             w.reshape(G, C // G, -1)).reshape(C)
        dvar_w = (dvar.to(torch.float64).reshape(C, -1) * w.reshape(C, -1)).sum(1)
        for buf, new in ((window.mean, mu_t), (window.var, var_t), (window.dmu, dmu.reshape(G, -1)),
                         (window.dvar, dvar.reshape(C, -1)), (window.dmu_w, dmu_w), (window.dvar_w, dvar_w),
                         (window.valid, torch.ones((), dtype=torch.bool, device=store.device))):
            old = buf.index_select(0, slot)
            buf.index_copy_(0, slot, torch.where(store, new.to(buf.dtype).unsqueeze(0), old))
        window.head.copy_(torch.where(store, (window.head + 1) % window.slots, window.head))
        window.step.add_(1)
