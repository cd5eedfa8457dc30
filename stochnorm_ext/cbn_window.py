"""The window of Cross-Iteration BN: storage, Taylor compensation and Jacobians (docs/SPEC.md).

This part of CBN is backend-independent plain PyTorch: it is O(window x weight size)
per step, tiny next to the normalisation itself except for the Jacobian ``dvar``, which
is one convolution weight-gradient (``aten.convolution_backward``) per step, or less for
a 1x1 conv with fewer input than output channels (see ``_pointwise_jacobians``).

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

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CBNWindow", "ConvGeometry", "StoreAtBackward", "compensated_past", "conv_jacobians",
           "push_entry"]


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


def _window_dots(dmu: Tensor, dvar: Tensor, conv_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """``<dmu_k, W_c>`` and ``<dvar_k, W_c>`` as ``(K, C)`` views, in the Jacobians' dtype, for
    Jacobians ``dmu (K, Gc, I)`` and ``dvar (K, C, I)``; ``dmu_k`` of group g pairs with the
    channels of group g.

    Two batched matrix products that read the weight and the stored slots where they lie
    (the slots' stride is a matrix stride: no copy, no float64 conversion of weight-sized
    tensors). The products accumulate in the Jacobians' dtype; the result is subtracted
    from the stored ``<., W(tau)>`` (float64), which this same routine computed, so a weight
    that did not move gives the same dot product (docs/DESIGN.md, "CBN's step cost", has the
    float32 error figures). A weight of another dtype than the window (a model converted in
    parts) is cast first."""
    K, G, I = dmu.shape
    C = dvar.shape[1]
    w = conv_weight.detach()
    if w.dtype != dvar.dtype:
        w = w.to(dvar.dtype)
    mu_dots = torch.bmm(w.reshape(G, C // G, I), dmu.permute(1, 2, 0))     # (G, C/G, K)
    var_dots = torch.bmm(w.reshape(C, 1, I), dvar.permute(1, 2, 0))        # (C, 1, K)
    return mu_dots.view(C, K).t(), var_dots.view(C, K).t()


def compensated_past(window: CBNWindow, conv_weight: Tensor, rho: float, burnin: int
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """The stored statistics moved to the current weights by a first-order Taylor step.

    With ``delta = rho * <dmu_tau, W_c(t) - W_c(tau)>``::

        mu'  = mu_tau + delta
        var' = var_tau + rho * <dvar_tau, W_c(t) - W_c(tau)> - delta^2

    (the published ``nu' - mu'^2`` rearranged so float32 does not cancel). An entry is
    kept for channel c if its slot is filled, ``var' >= 0`` (the published rule) and the
    burn-in is over. Returns ``(past_mean, past_var, keep)``, each (K, C), detached; the
    statistics in float64 (the backends cast them to their accumulation dtype).
    """
    with torch.no_grad():
        mu_dots, var_dots = _window_dots(window.dmu, window.dvar, conv_weight)
        moved = torch.sub(mu_dots, window.dmu_w)  # <dmu_tau, W(t) - W(tau)>, float64
        past_mean = torch.add(window.mean, moved, alpha=rho)
        past_var = torch.add(window.var, torch.sub(var_dots, window.dvar_w), alpha=rho)
        past_var.addcmul_(moved, moved, value=-rho * rho)  # - delta^2
        keep = (past_var >= 0) & window.valid.unsqueeze(1)
        if burnin > 0:  # with burnin 0 the step is always past it (no op spent on it)
            keep &= window.step >= burnin
        return past_mean, past_var, keep


def conv_jacobians(conv_input: Tensor, conv_weight: Tensor, x: Tensor, mu_t: Tensor,
                   geometry: ConvGeometry, mu_is_batch_mean: bool = False) -> Tuple[Tensor, Tensor]:
    """The current step's Jacobians w.r.t. the conv weight, in closed form.

    ``dmu[g] = mean over (n, positions) of the input patch`` and
    ``dvar[c] = 2 * mean((x_c - mu_c) * patch)`` are weight-gradients of the conv with
    ``grad_output = 1/M`` and ``2 (x - mu) / M`` (``aten.convolution_backward``; no
    autograd graph). ``grad_output = 1/M`` is the same for every image, so ``dmu`` is the
    weight-gradient of the batch-summed input: one image instead of N. A 1x1 conv without
    padding takes the route of :func:`_pointwise_jacobians` where that is cheaper:
    ``Cin * (M + C)`` multiply-adds per output instead of ``M * C``; it reads x once for
    its mean unless ``mu_is_batch_mean`` says that ``mu_t`` is x's own per-channel mean
    (not a synchronised group's). Returns ``dmu (Gc, Cin/Gc, kh, kw)`` and
    ``dvar (C, Cin/Gc, kh, kw)`` in float32 (float64 for float64 input).
    """
    with torch.no_grad():
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        N, C, Ho, Wo = x.shape
        G = geometry.groups
        M = N * Ho * Wo
        cin_g, kh, kw = conv_weight.shape[1:]
        if (kh, kw) == (1, 1) and G == 1 and cin_g * (M + C) <= M * C \
                and not any(geometry.padding) and not any(geometry.input_pad):
            return _pointwise_jacobians(conv_input, conv_weight, None if mu_is_batch_mean else x,
                                        mu_t, geometry.stride, acc)
        inp = conv_input.detach().to(acc)
        if any(geometry.input_pad):
            inp = F.pad(inp, geometry.input_pad, mode=geometry.pad_mode)
        centred = x.detach().to(acc) - mu_t.to(acc).view(1, C, 1, 1)
        if N * Ho * Wo * inp.shape[1] * kh * kw <= UNFOLD_ELEMENTS:
            return _unfolded_jacobians(inp, centred, geometry, (kh, kw))
        weight = conv_weight.detach().to(acc)  # only its shape (and layout) matter here

        def weight_grad(grad_out: Tensor, conv_in: Tensor, w: Tensor) -> Tensor:
            return torch.ops.aten.convolution_backward(
                grad_out, conv_in, w, None, list(geometry.stride), list(geometry.padding),
                list(geometry.dilation), False, [0, 0], G, [False, True, False])[1]

        if inp.is_contiguous(memory_format=torch.channels_last) and not inp.is_contiguous():
            # Summed over a view in memory order: sum(0) of a channels_last tensor takes a
            # path ~15x slower on CPU.
            summed = inp.permute(0, 2, 3, 1).sum(0).permute(2, 0, 1).unsqueeze(0)
        else:
            summed = inp.sum(0, keepdim=True)
        dmu = weight_grad(summed.new_full((1, G, Ho, Wo), 1.0 / M), summed, weight[:G])
        if centred.numel() < weight.numel():  # scale whichever of the two is smaller
            return dmu, weight_grad(centred.mul_(2.0 / M), inp, weight)
        return dmu, weight_grad(centred, inp, weight).mul_(2.0 / M)


# Up to this many elements of unfolded input (N x Cin kh kw x positions), the Jacobians are
# products with the unfolded input: on small inputs a convolution_backward call costs far
# more than its arithmetic (about 80 us on CPU for a 3x3 conv of 8 channels at 2x2, against
# 10-20 us for the unfold and the product), and the unfolded copy stays small.
UNFOLD_ELEMENTS = 1 << 16


def _unfolded_jacobians(inp: Tensor, centred: Tensor, geometry: ConvGeometry,
                        kernel: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """:func:`conv_jacobians` as products with the unfolded (im2col) input ``cols``: with
    ``M = N * positions``, ``dmu[g] = sum(cols_g) / M`` and
    ``dvar[c] = 2 / M * sum(centred_c * cols_g(c))`` over images and positions, ``centred``
    being ``x - mu`` (N, C, Ho, Wo)."""
    N, C, Ho, Wo = centred.shape
    G = geometry.groups
    cols = F.unfold(inp, kernel, dilation=geometry.dilation, padding=geometry.padding,
                    stride=geometry.stride)
    cols = cols.view(N, G, -1, Ho * Wo)                       # (N, G, Cin/G kh kw, positions)
    M = N * Ho * Wo
    dmu = cols.sum((0, 3)).div_(M).view(G, -1, *kernel)
    centred = centred.view(N, G, C // G, Ho * Wo)
    dvar = torch.matmul(centred, cols.transpose(2, 3)).sum(0).mul_(2.0 / M)  # (G, C/G, Cin/G kh kw)
    return dmu, dvar.view(C, -1, *kernel)


def _pointwise_jacobians(conv_input: Tensor, conv_weight: Tensor, x: Optional[Tensor], mu_t: Tensor,
                         stride: Tuple[int, int], acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """:func:`conv_jacobians` of a 1x1 conv without padding (groups 1). Each patch is one
    pixel ``p`` of the input's strided grid and ``x_c = <W_c, p> + b_c``, so
    ``x_c - mean(x_c) = <W_c, p - pbar>`` and::

        dmu  = pbar = mean(p)
        dvar = 2 mean((x - mu_t) p^T) = 2 W Sigma + 2 (mean(x) - mu_t) pbar^T

    with ``Sigma`` the covariance of the pixels, taken from centred pixels (stable at large
    offsets). The ``(mean(x) - mu_t)`` term keeps the result exact for a ``mu_t`` that is
    not this batch's mean (synchronised BN passes the group's); ``x=None`` says that
    ``mu_t`` is x's mean, and the term (rounding only) is left out. The reduction over
    the batch is a Cin x Cin product instead of the C x Cin weight-gradient, and x is at
    most read (its mean), not centred into a new x-sized tensor."""
    C = conv_weight.shape[0]
    pix = conv_input.detach()[:, :, ::stride[0], ::stride[1]]
    N, cin = pix.shape[:2]
    M = pix.numel() // cin
    pbar = pix.mean((0, 2, 3), dtype=acc)
    centred = pix.to(acc) - pbar.view(1, cin, 1, 1)
    if centred.is_contiguous(memory_format=torch.channels_last):
        rows = centred.permute(0, 2, 3, 1).reshape(M, cin)  # a view: (pixels, channels)
        sigma = rows.t() @ rows
    else:
        per_image = centred.reshape(N, cin, -1)
        sigma = torch.bmm(per_image, per_image.transpose(1, 2)).sum(0)
    sigma /= M
    w = conv_weight.detach().to(acc).reshape(C, cin)
    dvar = w @ sigma
    if x is not None:
        dvar.addr_(x.detach().mean((0, 2, 3), dtype=acc) - mu_t.to(acc), pbar)
    dvar.mul_(2.0)
    return pbar.view(1, cin, 1, 1), dvar.view(C, cin, 1, 1)


def push_entry(window: CBNWindow, mu_t: Tensor, var_t: Tensor, dmu: Tensor, dvar: Tensor,
               conv_weight: Tensor, burnin: int, dots: Optional[Tuple[Tensor, Tensor]] = None) -> None:
    """Store the current step in the ring buffer once the burn-in is over, then count the
    step. Tensor-only (no host sync). With ``burnin == 0`` every step stores (one
    ``index_copy_`` per field); otherwise, during the burn-in, the slot is rewritten with
    itself."""
    with torch.no_grad():
        slot = window.head.view(1)
        G, C = dmu.shape[0], dvar.shape[0]
        dmu, dvar = dmu.reshape(1, G, -1), dvar.reshape(1, C, -1)
        if dvar.dtype != window.dvar.dtype:
            dmu, dvar = dmu.to(window.dvar.dtype), dvar.to(window.dvar.dtype)
        # <dmu, W>, <dvar, W>: the routine compensated_past uses, unless given (StoreAtBackward)
        dmu_w, dvar_w = _window_dots(dmu, dvar, conv_weight) if dots is None else dots
        fields = ((window.mean, mu_t), (window.var, var_t), (window.dmu, dmu), (window.dvar, dvar),
                  (window.dmu_w, dmu_w), (window.dvar_w, dvar_w))
        if burnin == 0:
            for buf, new in fields:
                buf.index_copy_(0, slot, new.to(buf.dtype).view(1, *buf.shape[1:]))
            window.valid.index_fill_(0, slot, True)
            window.head.add_(1).remainder_(window.slots)
        else:
            store = window.step >= burnin
            fields += ((window.valid, torch.ones((), dtype=torch.bool, device=store.device)),)
            for buf, new in fields:
                old = buf.index_select(0, slot)
                buf.index_copy_(0, slot, torch.where(store, new.to(buf.dtype).view_as(old), old))
            window.head.copy_(torch.where(store, (window.head + 1) % window.slots, window.head))
        window.step.add_(1)


class StoreAtBackward:
    """This step's window entry, stored when the backward reaches CBN's input (docs/DESIGN.md,
    "CBN's step cost"): the Jacobians are one more conv weight-gradient, which the forward
    then does not spend; only later steps read them.

    :meth:`hook` is registered on the CBN input ``x`` (``x.register_hook``): when autograd
    computes x's gradient it calls :meth:`land`, which computes the Jacobians from ``x`` and
    the conv input (references, no copies: the graph keeps both for the conv's and the
    normalisation's backward anyway) and stores the entry with ``store`` (the backend's
    :func:`push_entry`, which also counts the step). The module calls :meth:`land` before
    anything reads the window too (its next forward, its window buffers or ``step`` read as attributes, ``state_dict``,
    ``.to()``, pickling, rebinding), so a forward whose backward never ran (or has not run
    yet: two forwards, then one backward) is stored before the next step reads the window,
    exactly as if stored in its forward. Only once: a second backward (``retain_graph``)
    or a late one finds it landed.

    ``<dmu, W(tau)>`` and ``<dvar, W(tau)>`` need the weight of the step. If the conv weight
    changed in place since the forward (its version counter moved: e.g. a training forward
    whose output got no backward, then an optimiser step), they are taken in closed form
    instead: ``x_c = <W_c(tau), patch> + b_c`` gives ``<dmu, W_c(tau)> = mu_t - b_c`` and
    ``<dvar, W_c(tau)> = 2 var_t`` (``mu_t`` is the batch mean here); equal to the dot
    products up to rounding. If the conv bias changed too (or the conv input or x changed in
    place: autograd would refuse the conv's backward then anyway), the entry is dropped;
    the step still counts."""

    def __init__(self, window: CBNWindow, conv_input: Tensor, conv_weight: Tensor, x: Tensor,
                 mu_t: Tensor, var_t: Tensor, geometry: ConvGeometry, burnin: int,
                 conv_bias: Optional[Tensor] = None, store: Optional[Callable[..., None]] = None):
        self.window, self.geometry, self.burnin = window, geometry, burnin
        self.store = push_entry if store is None else store  # the backend's push_entry
        self.tensors = (conv_input, conv_weight, x, mu_t, var_t, conv_bias)
        self.versions = _versions(conv_input, x, conv_weight, *(() if conv_bias is None else (conv_bias,)))

    def hook(self, grad: Tensor) -> None:
        self.land()

    def land(self) -> None:
        if self.tensors is None:
            return
        (conv_input, conv_weight, x, mu_t, var_t, bias), self.tensors = self.tensors, None
        with torch.no_grad():
            now = _versions(conv_input, x, conv_weight, *(() if bias is None else (bias,)))
            if now[:2] != self.versions[:2] or now[3:] != self.versions[3:]:
                self.window.step.add_(1)
                return
            dmu, dvar = conv_jacobians(conv_input, conv_weight, x, mu_t, self.geometry,
                                       mu_is_batch_mean=True)
            dots = None
            if now[2] != self.versions[2]:  # W(tau) is gone: the closed form of the dot products
                dots = (mu_t.double() - (0 if bias is None else bias.detach().double()), 2 * var_t.double())
            self.store(self.window, mu_t, var_t, dmu, dvar, conv_weight, self.burnin, dots)


def _versions(*tensors: Tensor) -> Tuple[int, ...]:
    """The tensors' version counters (each in-place change bumps them)."""
    return tuple(t._version for t in tensors)
