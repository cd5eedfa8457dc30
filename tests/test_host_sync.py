"""No host synchronisation on any training path (issue 13, CUDA graphs): a training step of
every layer reads no tensor value on the host, ``momentum=None`` included (its factor comes
from ``num_batches_tracked`` on the device), so a CUDA graph can capture it. On a GPU the
step is captured and replayed: fresh masks each replay, state updated exactly as eager.

The synchronised path (``sync=True``) is covered in tests/test_distributed_passes.py."""
import copy

import pytest
import torch

import stochnorm_ext as sx
from conftest import available
from host_reads import HostReads

CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if available(b, "cpu")]
GPU_BACKENDS = ["cuda", "triton"]




def make_layer(kind: str, backend: str, momentum):
    if kind == "stochnorm":
        return sx.StochNorm2d(6, momentum=momentum, backend=backend)
    if kind == "bgn":
        return sx.BatchGroupNorm2d(6, 3, momentum=momentum, backend=backend)
    if kind == "bgn_pieces":
        return sx.BatchGroupNorm2d(6, 12, momentum=momentum, backend=backend)
    return sx.Conv2dCBN(4, 6, 3, padding=1, bias=False, window=3, momentum=momentum, backend=backend)


def layer_input(kind: str, device="cpu", generator=None):
    channels = 4 if kind == "cbn" else 6
    return torch.randn(3, channels, 6, 6, device=device, generator=generator) * 2 + 1


KINDS = ["stochnorm", "bgn", "bgn_pieces", "cbn"]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_training_step_reads_nothing_on_the_host(kind, backend, momentum):
    torch.manual_seed(0)
    layer = make_layer(kind, backend, momentum)
    for step in range(3):  # CBN fills its window over the first steps
        x = layer_input(kind).requires_grad_()
        with HostReads() as mode:
            y = layer(x)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        assert not mode.reads, f"step {step}: host reads {mode.reads}"
    # The detector sees a host read when there is one.
    with HostReads() as mode:
        float(layer_input(kind).sum())
    assert mode.reads


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_replays_a_training_step_as_eager(kind, backend, momentum):
    """Capture forward + backward + SGD step, replay it: parameters, running statistics,
    num_batches_tracked and CBN's window follow eager step for step (StochNorm with p=1, so
    both draw the same branch), and StochNorm's masks are fresh on every replay."""
    if sx.backends()[backend] is not None:
        pytest.skip(f"{backend}: {sx.backends()[backend]}")
    torch.manual_seed(0)
    model = make_layer(kind, backend, momentum).cuda()
    if kind == "stochnorm":
        model.p = 1.0
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = [layer_input(kind, "cuda", g) for _ in range(8)]
    static_x = inputs[0].clone()

    def step(m, o, x):
        o.zero_grad(set_to_none=False)
        y = m(x)
        (y * y).mean().backward()
        o.step()
        return y

    # Warm up on a side stream (allocations, lazy initialisation), as CUDA graphs require;
    # the twin takes the same eager steps.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in inputs[:3]:
            step(model, opt, x)
            step(twin, twin_opt, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(model, opt, static_x)
    # Capture ran nothing: replay the remaining inputs, eager twin alongside.
    for x in inputs[3:]:
        static_x.copy_(x)
        graph.replay()
        y = step(twin, twin_opt, x)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, y, rtol=1e-5, atol=1e-5)
        got, want = _state(model), _state(twin)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_draws_fresh_masks_on_every_replay(backend):
    if sx.backends()[backend] is not None:
        pytest.skip(f"{backend}: {sx.backends()[backend]}")
    torch.manual_seed(0)
    layer = sx.StochNorm2d(64, momentum=0.0, backend=backend).cuda()  # state stays as it is
    with torch.no_grad():
        layer.running_mean.fill_(5.0)  # the moving branch is far from the batch branch
    x = torch.randn(4, 64, 4, 4, device="cuda")
    layer(x)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    outs = []
    for _ in range(4):
        graph.replay()
        outs.append(y.clone())
    torch.cuda.synchronize()
    assert any(not torch.equal(outs[0], o) for o in outs[1:]), "every replay drew the same mask"
