"""torch.func transforms (grad, vmap) over the layers, as over nn.BatchNorm*d.

Inside a transform every backend computes with the reference's plain PyTorch ops (the
kernels' custom ops have no functorch rules), so results equal eager autograd's. Under
vmap, training that would update unbatched running statistics from a batched input raises
(nn.BatchNorm*d refuses it too), before anything changes.
"""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import stochnorm_ext as sx
from conftest import available, randomize_bn_

BACKENDS = ["reference", "cpu", "triton"]
KINDS = {
    "stochnorm": lambda b: sx.StochNorm2d(4, p=0.5, backend=b),
    "bgn": lambda b: sx.BatchGroupNorm2d(4, 2, backend=b),
    "bgn_pieces": lambda b: sx.BatchGroupNorm2d(4, 8, backend=b),
    "cbn": lambda b: sx.CrossIterationBatchNorm2d(4, window=1, backend=b),
}


def _skip_unavailable(backend):
    if not available(backend, "cpu"):
        pytest.skip(f"{backend} does not run on CPU tensors here")


def _layer(kind, backend):
    return randomize_bn_(KINDS[kind](backend).double(), 3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_over_functional_call(backend, kind, training):
    _skip_unavailable(backend)
    layer = _layer(kind, backend).train(training)
    eager = copy.deepcopy(layer)
    eager.backend = "reference"  # the specification (each backend is tested against it elsewhere)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = dict(layer.named_buffers())

    def loss(p, b, x):
        return functional_call(layer, (p, b), (x,)).pow(2).sum()

    torch.manual_seed(1)
    grads = grad(loss, argnums=(0, 2))(params, buffers, x)
    torch.manual_seed(1)  # the same StochNorm mask
    xe = x.clone().requires_grad_()
    eager(xe).pow(2).sum().backward()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, getattr(eager, name).grad, msg=name)
    torch.testing.assert_close(grads[1], xe.grad)
    for (k, a), (_, b) in zip(layer.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)  # running statistics moved as in eager


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_over_a_bound_cbn_with_a_window(backend):
    _skip_unavailable(backend)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    model = nn.Sequential(conv, randomize_bn_(sx.CrossIterationBatchNorm2d(4, window=3, backend=backend)
                                              .double(), 3).bind(conv))
    eager = copy.deepcopy(model)
    for step in range(3):
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())
        grads = grad(lambda p, b, x: functional_call(model, (p, b), (x,)).pow(2).sum())(params, buffers, x)
        eager.zero_grad()
        eager(x).pow(2).sum().backward()
        for name, p in eager.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, msg=f"step {step} {name}")
    for (k, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert int(model[1].window_valid.sum()) == 2


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_in_eval_and_without_running_stats(backend, kind):
    _skip_unavailable(backend)
    layer = _layer(kind, backend).eval()
    xs = torch.randn(5, 3, 4, 4, 4, dtype=torch.float64)
    want = torch.stack([layer(x) for x in xs])
    torch.testing.assert_close(vmap(layer)(xs), want)
    if kind.startswith("bgn"):  # batch statistics per slice, as BatchNorm2d(track_running_stats=False)
        free = sx.BatchGroupNorm2d(4, layer.num_groups, track_running_stats=False, backend=backend).double()
        free.train()
        torch.testing.assert_close(vmap(free)(xs), torch.stack([free(x) for x in xs]))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_training_with_running_stats_raises_untouched(backend, kind):
    # nn.BatchNorm2d raises here too; the failed call changes no state (the triton backend's
    # statistics op used to update the running statistics before the failure).
    _skip_unavailable(backend)
    layer = _layer(kind, backend).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="torch.func.vmap"):
        vmap(layer, randomness="same")(torch.randn(5, 3, 4, 4, 4, dtype=torch.float64))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
