"""Fine-tuning companions: the L2-SP penalty and BatchNorm scale initialisation.

* :class:`L2SP` / :func:`l2sp_penalty` — L2-SP (Li, Grandvalet & Davoine, 2018): pull the
  parameters shared with the pretrained model towards their pretrained values ``w0`` and
  the new ones (the new head) towards zero::

      alpha/2 * ||w_S - w0_S||^2 + beta/2 * ||w_new||^2

  either as a differentiable penalty added to the loss, or in a decoupled form applied
  next to the optimizer step (like AdamW's decoupled weight decay).
* :func:`bn_scale_init_`, :func:`bn_param_groups`, :class:`InputNorm` — "Revisiting batch
  normalization for training low-latency deep networks" style BN set-up (Davis & Frank,
  2021): BN scale ``gamma`` initialised in (0, 1] (0.1 recommended) with shift 0, gamma's
  learning rate divided by ``c = 100``, no weight decay on norm parameters and biases, and
  a shift-free BN on the raw input channels for input normalisation.

These work with ``nn.BatchNorm*d`` and with this package's layers (``StochNorm*d``,
``BatchGroupNorm*d``, ``CrossIterationBatchNorm2d``), so they compose with
``stochnorm_ext.convert_model``.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import _checks
from ..nn import LAYER_TYPES

__all__ = ["L2SP", "l2sp_penalty", "bn_scale_init_", "bn_param_groups", "InputNorm",
           "BATCH_NORM_TYPES", "NORM_TYPES"]


class InputNorm(nn.Module):
    """BN-based input normalisation: a BatchNorm on the raw input channels with no shift.

    ``y = weight * (x - mean) / sqrt(var + eps)`` per input channel, with the batch
    statistics in training and the running ones in eval (as ``nn.BatchNorm``). The shift is
    fixed at 0: there is no ``bias`` parameter, because no activation follows this layer.
    ``weight`` starts at ``gamma * activation_std``: ``gamma`` is the BN scale used in the
    rest of the network (0.1 recommended, see :func:`bn_scale_init_`) and
    ``activation_std = 0.58`` is the standard deviation of a unit Gaussian after a ReLU,
    standing in for the activation this layer does not have (use another value for
    other activations).

    Args:
        num_channels: C, the input channel count (3 for RGB).
        gamma: the network's BN scale initialisation, in (0, 1].
        activation_std: the activation's output std for a unit Gaussian input (ReLU: 0.58).
        eps, momentum: as in ``nn.BatchNorm*d`` (``momentum=None``: cumulative average).

    Input ``(N, C, *)``: any number of trailing dims. State dict: ``weight``,
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (no ``bias``).
    :func:`bn_scale_init_` re-initialises ``weight`` to ``gamma * activation_std``.
    ``convert_model`` leaves this layer alone (it is not an ``nn.BatchNorm*d``).
    """

    def __init__(self, num_channels: int, gamma: float = 0.1, activation_std: float = 0.58,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1):
        super().__init__()
        _checks.check_hyper("num_channels", num_channels, low=1, integer=True)
        _check_gamma(gamma)
        _checks.check_hyper("activation_std", activation_std, low=0.0, low_open=True)
        _checks.check_hyper("eps", eps, low=0.0)
        _checks.check_momentum(momentum)
        self.num_channels = num_channels
        self.activation_std = float(activation_std)
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.full((num_channels,), gamma * activation_std))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, activation_std={self.activation_std}, eps={self.eps}, "
                f"momentum={self.momentum}")

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"InputNorm: expected input of shape (N, {self.num_channels}, ...), "
                             f"got {tuple(input.shape)}")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.momentum is None:  # cumulative average, this step included
            factor = 1.0 / (float(self.num_batches_tracked) + 1.0)
        y = F.batch_norm(input, self.running_mean, self.running_var, self.weight, None,
                         self.training, factor, self.eps)
        if self.training:
            self.num_batches_tracked.add_(1)  # counted once the call has succeeded
        return y


# BatchNorm-like layers: BN scale initialisation and the gamma learning-rate reduction apply
# to these (their affine ``weight`` is the scale, ``bias`` the shift).
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm) + LAYER_TYPES
# Every normalisation layer whose parameters count as "norm parameters" (no weight decay;
# included in L2-SP only with include_norm=True).
NORM_TYPES = BATCH_NORM_TYPES + (InputNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d,
                                 nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
                                 nn.RMSNorm)


def _check_gamma(gamma) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a real number in (0, 1], got {type(gamma).__name__} {gamma!r}")
    if not (0.0 < float(gamma) <= 1.0):  # also rejects NaN
        raise ValueError(f"gamma (the BN scale initialisation) must be in (0, 1], got {gamma!r}")


def _classified_params(model: nn.Module):
    """Yield ``(name, param, is_norm, is_bias)`` for each trainable parameter once."""
    seen = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES)
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            yield name, p, is_norm, p_name == "bias"


def _sum_of_squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """``sum_i ||t_i||^2`` with one ``_foreach_norm`` over the list; float32 (float64 if any
    tensor is float64), differentiable."""
    norms = torch._foreach_norm(list(tensors))
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    device = norms[0].device
    return torch.stack([n.to(device=device, dtype=dtype) for n in norms]).square().sum()


def l2sp_penalty(shared: Sequence[Tensor], reference: Sequence[Tensor], new: Sequence[Tensor] = (),
                 alpha: float = 0.1, beta: float = 0.01) -> Tensor:
    """The L2-SP penalty ``alpha/2 * sum ||w_S - w0_S||^2 + beta/2 * sum ||w_new||^2``.

    ``shared[i]`` is pulled towards ``reference[i]`` (same shape, device and dtype),
    ``new`` towards zero. Computed with multi-tensor ops (``torch._foreach_sub``,
    ``torch._foreach_norm``) and differentiable: its gradient is ``alpha * (w - w0)`` for
    shared tensors and ``beta * w`` for new ones. Returns a 0-dim float32 tensor (float64
    if any input is float64); 0 when both lists are empty.
    """
    shared, reference, new = list(shared), list(reference), list(new)
    if len(shared) != len(reference):
        raise ValueError(f"l2sp_penalty: {len(shared)} shared tensors but {len(reference)} references")
    for w, w0 in zip(shared, reference):
        if w.shape != w0.shape:
            raise ValueError(f"l2sp_penalty: a shared tensor of shape {tuple(w.shape)} has a "
                             f"reference of shape {tuple(w0.shape)}")
    total = None
    if shared:
        total = alpha / 2 * _sum_of_squared_norms(torch._foreach_sub(shared, reference))
    if new:
        term = beta / 2 * _sum_of_squared_norms(new)
        total = term if total is None else total + term.to(total.device)
    return torch.zeros(()) if total is None else total


class L2SP:
    """L2-SP regularisation of ``model`` towards a pretrained state dict.

    ``alpha/2 * ||w_S - w0_S||^2 + beta/2 * ||w_new||^2`` (Li et al., 2018). A trainable
    parameter is *shared* (``w_S``) when ``pretrained_state_dict`` has an entry with the
    same name and shape, whose value is ``w0`` (copied at construction, on the parameter's
    device and dtype); otherwise it is *new* (``w_new``, e.g. a classifier head with
    another number of classes). A replaced layer whose shape did not change (same number of
    classes) would count as shared: drop its keys from the state dict to make it new.
    Parameters with ``requires_grad=False`` are left out.

    Which parameters are penalised (the literature differs):

    * the authors' code penalises weights only: norm parameters (BN scale and shift,
      also those of this package's layers and :class:`InputNorm`) and biases are left out
      (``include_norm=False, include_bias=False``, the defaults here);
    * TLlib (Transfer-Learning-Library) penalises every parameter of the backbone and the
      head: ``include_norm=True, include_bias=True`` (with ``alpha=0.01, beta=0.01``).

    Defaults ``alpha=0.1, beta=0.01`` are the authors' image-classification runs (beta 0.01
    was always picked by cross-validation; alpha varied per task).

    Two ways to apply it:

    * ``loss = task_loss + l2sp.penalty()`` (the paper's form): differentiable, works with
      any optimizer, goes through its momentum / adaptive scaling.
    * decoupled: call ``l2sp.decay_(optimizer)`` after ``backward()`` and right before
      ``optimizer.step()``. It moves each shared parameter towards ``w0`` by the fraction
      ``lr * alpha`` and scales each new one by ``1 - lr * beta`` (``lr`` of the
      parameter's group, so schedulers and per-group rates are honoured), like AdamW's
      decoupled weight decay. This equals the penalty **only under plain SGD** (no
      momentum, no Nesterov, no ``weight_decay`` in the optimizer, which would then see
      the pulled weights; no adaptive method); otherwise the two differ, as weight decay
      and AdamW do. It is applied even if the step is then skipped (e.g.
      by a ``GradScaler`` that found inf gradients).

    Build it after moving the model to its device and dtype.

    Attributes: ``shared_names``/``shared``/``reference``, ``new_names``/``new``,
    ``excluded_names`` (trainable parameters left out by ``include_norm``/``include_bias``).
    """

    def __init__(self, model: nn.Module, pretrained_state_dict: Mapping[str, Tensor],
                 alpha: float = 0.1, beta: float = 0.01, include_norm: bool = False,
                 include_bias: bool = False):
        _checks.check_hyper("alpha", alpha, low=0.0)
        _checks.check_hyper("beta", beta, low=0.0)
        self.alpha, self.beta = float(alpha), float(beta)
        self.include_norm, self.include_bias = include_norm, include_bias
        self.shared_names: List[str] = []
        self.shared: List[Tensor] = []
        self.reference: List[Tensor] = []
        self.new_names: List[str] = []
        self.new: List[Tensor] = []
        self.excluded_names: List[str] = []
        for name, p, is_norm, is_bias in _classified_params(model):
            if (is_norm and not include_norm) or (is_bias and not include_bias):
                self.excluded_names.append(name)
                continue
            w0 = pretrained_state_dict.get(name)
            if isinstance(w0, Tensor) and w0.shape == p.shape:
                self.shared_names.append(name)
                self.shared.append(p)
                self.reference.append(w0.detach().to(device=p.device, dtype=p.dtype, copy=True))
            else:
                self.new_names.append(name)
                self.new.append(p)

    def __repr__(self) -> str:
        return (f"L2SP(alpha={self.alpha}, beta={self.beta}, shared={len(self.shared)} tensors, "
                f"new={len(self.new)} tensors, excluded={len(self.excluded_names)} tensors)")

    def penalty(self) -> Tensor:
        """``alpha/2 * ||w_S - w0_S||^2 + beta/2 * ||w_new||^2``, differentiable (add it to
        the loss)."""
        return l2sp_penalty(self.shared, self.reference, self.new, self.alpha, self.beta)

    __call__ = penalty

    @torch.no_grad()
    def decay_(self, optimizer: Optional[torch.optim.Optimizer] = None,
               lr: Optional[float] = None) -> None:
        """Decoupled L2-SP: ``w_S += lr*alpha*(w0_S - w_S)``, ``w_new *= 1 - lr*beta``.

        Call after ``backward()`` and right before ``optimizer.step()``. ``lr`` is each
        parameter's group learning rate in ``optimizer`` (parameters it does not train are
        left alone), or the ``lr`` given (then applied to every penalised parameter). Equal
        to a step on :meth:`penalty` only under plain SGD (see the class docstring).
        """
        if (optimizer is None) == (lr is None):
            raise ValueError("L2SP.decay_: pass either the optimizer or lr (not both)")
        if optimizer is None:
            groups = {float(lr): (self.shared, self.reference, self.new)}
        else:
            lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
            groups: Dict[float, tuple] = {}
            for w, w0 in zip(self.shared, self.reference):
                if id(w) in lr_of:
                    s, r, _ = groups.setdefault(lr_of[id(w)], ([], [], []))
                    s.append(w)
                    r.append(w0)
            for w in self.new:
                if id(w) in lr_of:
                    groups.setdefault(lr_of[id(w)], ([], [], []))[2].append(w)
        for group_lr, (shared, reference, new) in groups.items():
            if shared and self.alpha:
                torch._foreach_lerp_(shared, reference, group_lr * self.alpha)
            if new and self.beta:
                torch._foreach_mul_(new, 1.0 - group_lr * self.beta)


def bn_scale_init_(model: nn.Module, gamma: float = 0.1) -> nn.Module:
    """Set the scale of every BatchNorm-like layer of ``model`` to ``gamma`` and its shift
    to 0, in place; returns ``model``.

    Applies to ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and this package's
    ``StochNorm*d``, ``BatchGroupNorm*d`` and ``CrossIterationBatchNorm2d`` with affine
    parameters (``BATCH_NORM_TYPES``); an :class:`InputNorm` gets ``gamma *
    activation_std`` (its shift is always 0). ``gamma`` must be in (0, 1] (0.1 recommended;
    ``ValueError`` otherwise). Running statistics are not touched. Use it with
    :func:`bn_param_groups` (gamma's learning rate divided by 100): the paper finds both
    together necessary. Warns when the model has no such layer.
    """
    _check_gamma(gamma)
    found = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, InputNorm):
                module.weight.fill_(gamma * module.activation_std)
                found += 1
            elif isinstance(module, BATCH_NORM_TYPES) and module.weight is not None:
                module.weight.fill_(gamma)
                if module.bias is not None:
                    module.bias.zero_()
                found += 1
    if not found:
        warnings.warn("bn_scale_init_: the model has no affine BatchNorm-like layer; nothing changed",
                      stacklevel=2)
    return model


def bn_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                    c: float = 100.0) -> List[dict]:
    """Optimizer parameter groups for BN scale initialisation training.

    Returns up to three groups (empty ones are omitted), each with a ``"name"``:

    * ``"weights"``: every other trainable parameter (conv / linear weights): ``lr``,
      ``weight_decay``;
    * ``"bn_scale"``: the scale (``weight``) of the BatchNorm-like layers
      (``BATCH_NORM_TYPES``) and of :class:`InputNorm`: ``lr / c``, no weight decay;
    * ``"no_decay"``: BN shifts, biases and the parameters of the other norm layers
      (GroupNorm, LayerNorm, ...): ``lr``, no weight decay.

    ``c = 100`` is the paper's reduction (``c = 1`` keeps gamma's rate, for a baseline).
    Pass the result to any optimizer: ``torch.optim.SGD(bn_param_groups(model, 0.1, 1e-4),
    momentum=0.9)``.
    """
    _checks.check_hyper("lr", lr, low=0.0)
    _checks.check_hyper("weight_decay", weight_decay, low=0.0)
    _checks.check_hyper("c", c, low=0.0, low_open=True)
    scale_params = {id(m.weight) for m in model.modules()
                    if isinstance(m, BATCH_NORM_TYPES + (InputNorm,)) and m.weight is not None}
    weights, scales, no_decay = [], [], []
    for _, p, is_norm, is_bias in _classified_params(model):
        if id(p) in scale_params:
            scales.append(p)
        elif is_norm or is_bias:
            no_decay.append(p)
        else:
            weights.append(p)
    groups = [
        {"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": scales, "lr": lr / c, "weight_decay": 0.0, "name": "bn_scale"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]
