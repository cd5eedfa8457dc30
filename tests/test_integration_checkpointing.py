"""Converted ResNet blocks under activation checkpointing (both reentrant modes) train
exactly like without it.

Every check runs on each backend available here for CPU tensors (reference, the C++ cpu
backend when built and enabled, triton under its interpreter); CUDA variants skip without
a GPU.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import stochnorm_ext as sx

from integration_helpers import RESNET_KINDS


# --------------------------------------------------------------------------- activation checkpointing
class _Checkpointed(nn.Module):
    """Runs ``block`` under torch.utils.checkpoint."""

    def __init__(self, block, use_reentrant):
        super().__init__()
        self.block, self.use_reentrant = block, use_reentrant

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=self.use_reentrant)


def _resnet_block(key):
    """ResNet-18's first layer2 block (a BasicBlock with a downsampling conv -> BN branch,
    built as torchvision builds it) behind a stem conv, converted: three norm layers, for
    CBN each bound to its conv."""
    from torchvision.models.resnet import BasicBlock, conv1x1
    kind, options = RESNET_KINDS[key]
    torch.manual_seed(0)
    block = BasicBlock(64, 128, stride=2, downsample=nn.Sequential(conv1x1(64, 128, 2), nn.BatchNorm2d(128)))
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), block)
    return sx.convert_model(model, kind, **options)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("key", list(RESNET_KINDS))
def test_checkpointing_converted_resnet_block(key, use_reentrant):
    """A converted ResNet block under activation checkpointing trains exactly like without
    it (3 steps): one training forward is one step although checkpointing recomputes it."""
    plain = _resnet_block(key)
    ckpt = copy.deepcopy(plain)
    ckpt[1] = _Checkpointed(ckpt[1], use_reentrant)
    runs = []
    for model in (plain, ckpt):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        losses, grads = [], []
        for step in range(3):
            x = torch.randn(2, 3, 8, 8, generator=g)
            torch.manual_seed(step)
            loss = model(x).square().mean()
            torch.manual_seed(1234)  # the recomputation must not depend on the RNG state
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
        state = {k.replace("block.", ""): v.clone() for k, v in model.state_dict().items()}
        runs.append((losses, grads, state))
    (la, ga, sa), (lb, gb, sb) = runs
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), rtol=0, atol=0)
    for step_a, step_b in zip(ga, gb):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert sa.keys() == sb.keys()
    for key_ in sa:
        torch.testing.assert_close(sa[key_], sb[key_], rtol=0, atol=0, msg=key_)
