"""Synchronised statistics across processes (``sync=True``, stochnorm_ext.distributed).

The multi-process tests spawn W processes on this machine (gloo on CPU, rendezvous through
a file in a temporary directory) with uneven batches, an empty one included, and compare
them with one process on the concatenated batch: outputs, input gradients, parameter
gradients (summed over the ranks, as DDP would), running statistics and CBN windows, after
several optimiser steps; eval must run no collective. Two spawns cover every layer, both
BGN groupings and every backend available here, plus DistributedDataParallel training of
converted models. NCCL (GPUs) is not exercised here.
"""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import stochnorm_ext as sx
from sync_plumbing import BACKENDS, close, no_collectives, randomize, rank_slice, spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


# --------------------------------------------------------------------------- layers
# name -> (factory(**kwargs), per-sample input shape, memory format)
LAYERS = {
    "stochnorm1d": (lambda **kw: sx.StochNorm1d(6, p=0.5, momentum=None, **kw), (6,), None),
    "stochnorm2d": (lambda **kw: sx.StochNorm2d(6, p=0.5, **kw), (6, 3, 4), torch.channels_last),
    "stochnorm3d": (lambda **kw: sx.StochNorm3d(4, p=0.5, **kw), (4, 2, 3, 2), None),
    "bgn1d_groups": (lambda **kw: sx.BatchGroupNorm1d(6, 2, **kw), (6, 5), None),
    "bgn2d_groups": (lambda **kw: sx.BatchGroupNorm2d(6, 3, **kw), (6, 3, 4), torch.channels_last),
    "bgn2d_pieces": (lambda **kw: sx.BatchGroupNorm2d(3, 6, **kw), (3, 4, 4), None),
    "bgn3d_pieces": (lambda **kw: sx.BatchGroupNorm3d(2, 6, **kw), (2, 3, 2, 2), torch.channels_last_3d),
    "cbn": (lambda **kw: sx.Conv2dCBN(3, 6, 3, padding=1, window=3, burnin=1, rho=0.8, **kw), (3, 5, 5), None),
}


def _check_layer(rank, sizes, name, backend):
    """3 training steps of one layer on this rank's slice against one process (the reference
    backend, no sync) on the whole batch; then eval without collectives."""
    factory, shape, fmt = LAYERS[name]
    torch.manual_seed(0)
    single = factory(backend="reference").double()
    randomize(single)
    synced = factory(backend=backend, sync=True).double()
    synced.load_state_dict(single.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (single, synced)]
    lo, hi = rank_slice(sizes, rank)
    total = sum(sizes)
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(total, *shape, generator=g, dtype=torch.float64) * 2 + 3
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        xs, xl = x.clone().requires_grad_(), x[lo:hi].detach().requires_grad_()
        torch.manual_seed(7 + step)
        ys = single(xs)
        torch.manual_seed(7 + step + 1000 * rank)  # other ranks draw other masks: rank 0's must win
        yl = synced(xl)
        dy = torch.randn(ys.shape, generator=g, dtype=torch.float64)
        ys.backward(dy)
        yl.backward(dy[lo:hi])
        what = f"{name}/{backend} step {step} rank {rank}"
        close(yl, ys[lo:hi], what + " output")
        if fmt is not None and hi > lo:
            assert yl.is_contiguous(memory_format=fmt), what
        close(xl.grad, xs.grad[lo:hi], what + " input gradient")
        for (pname, ps), pl in zip(single.named_parameters(), synced.parameters()):
            dist.all_reduce(pl.grad)  # what DDP does (it averages; the sum is the same check)
            close(pl.grad, ps.grad, f"{what} gradient of {pname}")
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for (bname, bs), bl in zip(single.state_dict().items(), synced.state_dict().values()):
            if bs.is_floating_point():
                close(bl, bs, f"{what} {bname}")
            else:
                assert torch.equal(bl, bs), f"{what} {bname}"
    single.eval()
    synced.eval()
    x = torch.randn(total, *shape, dtype=torch.float64)
    with no_collectives(), torch.no_grad():
        close(synced(x[lo:hi]), single(x)[lo:hi], f"{name}/{backend} eval")


def _layers_worker(rank, world, sizes, backends):
    for backend in backends:
        for name in LAYERS:
            _check_layer(rank, sizes, name, backend)
    # No process group on a rank's way: a group that leaves this rank out is refused.
    others = dist.new_group([r for r in range(world) if r != 0])
    if rank == 0:
        layer = sx.BatchGroupNorm2d(4, 2, sync=True, process_group=others)
        with pytest.raises(RuntimeError, match="not a member"):
            layer(torch.randn(2, 4, 2, 2))


@pytest.mark.timeout(300)
def test_every_layer_matches_one_process_on_the_whole_batch():
    """3 processes with batches of 3, 1 and 0 samples (a lone sample: one value per statistic
    locally, an empty batch: still a member of every collective)."""
    spawn(3, _layers_worker, (3, 1, 0), BACKENDS)


# --------------------------------------------------------------------------- DDP
def _small_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


KINDS = {
    "stochnorm": ("stochnorm", dict(p=0.5)),
    "bgn_groups": ("bgn", dict(num_groups=4)),
    "bgn_pieces": ("bgn", dict(num_groups=16)),
    "cbn": ("cbn", dict(window=3, burnin=1)),
}


def _ddp_worker(rank, world, sizes, kinds):
    from torch.nn.parallel import DistributedDataParallel as DDP
    lo, hi = rank_slice(sizes, rank)
    total = sum(sizes)
    for key in kinds:
        kind, options = KINDS[key]
        torch.manual_seed(0)
        base = _small_model().double()
        single = sx.convert_model(copy.deepcopy(base), kind, **options)
        synced = sx.convert_sync(sx.convert_model(copy.deepcopy(base), kind, **options))
        assert all(m.sync for m in synced.modules() if hasattr(m, "sync"))
        ddp = DDP(synced)
        opt_s = torch.optim.SGD(single.parameters(), lr=0.1)
        opt_d = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(3):
            g = torch.Generator().manual_seed(50 + step)
            x = torch.randn(total, 3, 6, 6, generator=g, dtype=torch.float64)
            target = torch.randint(0, 4, (total,), generator=g)
            torch.manual_seed(step)
            loss_s = nn.functional.cross_entropy(single(x), target)
            loss_s.backward()
            torch.manual_seed(step + 10 * rank)
            # DDP averages the ranks' gradients: scale the local sum so the average is the mean loss.
            loss_d = nn.functional.cross_entropy(ddp(x[lo:hi]), target[lo:hi], reduction="sum") * world / total
            loss_d.backward()
            summed = loss_d.detach() / world
            dist.all_reduce(summed)
            close(summed, loss_s.detach(), f"DDP {key} loss step {step}")
            opt_s.step()
            opt_d.step()
            opt_s.zero_grad()
            opt_d.zero_grad()
            for (name, a), b in zip(single.state_dict().items(), synced.state_dict().values()):
                close(b.double(), a.double(), f"DDP {key} step {step} {name}")


@pytest.mark.timeout(300)
def test_ddp_training_of_converted_models_matches_one_process():
    """DistributedDataParallel with 2 processes (batches of 2 and 3) trains converted models
    (every kind, sync via convert_sync) exactly like one process on the whole batch."""
    spawn(2, _ddp_worker, (2, 3), list(KINDS))


# --------------------------------------------------------------------------- in this process
@pytest.mark.parametrize("make", [
    lambda: sx.StochNorm2d(4, sync=True),
    lambda: sx.BatchGroupNorm2d(4, 2, sync=True),
    lambda: sx.Conv2dCBN(3, 4, 3, window=3, sync=True),
])
def test_sync_without_a_process_group_raises_and_changes_nothing(make):
    assert not dist.is_initialized()
    layer = make()
    x = torch.randn(2, 3 if isinstance(layer, sx.Conv2dCBN) else 4, 5, 5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="init_process_group"):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer.eval()
    layer(x)  # eval never syncs, so it needs no process group


def test_functional_sync_without_a_process_group_raises():
    x = torch.randn(4, 3, 2, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sx.functional.stoch_norm(x, rm, rv, training=True, sync=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sx.functional.batch_group_norm(x, 3, rm, rv, training=True, sync=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(TypeError, match="sync must be a bool"):
        sx.functional.batch_group_norm(x, 3, rm, rv, training=True, sync="yes")
    sx.functional.batch_group_norm(x, 3, rm, rv, training=False, sync=True)  # eval: no sync


def test_convert_model_and_convert_sync_set_the_option():
    model = _small_model()
    sx.convert_model(model, "bgn", num_groups=4, sync=True, process_group=None)
    layers = [m for m in model.modules() if isinstance(m, sx.BatchGroupNorm2d)]
    assert len(layers) == 2 and all(m.sync and m.process_group is None for m in layers)
    assert "sync=True" in repr(layers[0])
    plain = sx.convert_model(_small_model(), "stochnorm")
    assert not any(m.sync for m in plain.modules() if isinstance(m, sx.StochNorm2d))
    marker = object()
    sx.convert_sync(plain, process_group=marker)
    assert all(m.sync and m.process_group is marker for m in plain.modules() if isinstance(m, sx.StochNorm2d))
    # a SyncBatchNorm does not make the converted layer synchronised by itself
    sync_bn = nn.SyncBatchNorm.convert_sync_batchnorm(_small_model())
    converted = sx.convert_model(sync_bn, "stochnorm")
    assert not any(m.sync for m in converted.modules() if isinstance(m, sx.StochNorm2d))


# --------------------------------------------------------------------------- torch.compile
def _conv2dcbn_model():
    return nn.Sequential(
        sx.Conv2dCBN(3, 8, 3, padding=1, window=3, burnin=1, rho=0.8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


# key -> the model (sync off; convert_sync turns it on for every layer, Conv2dCBN's included)
COMPILED = {
    "stochnorm": lambda: sx.convert_model(_small_model(), "stochnorm", p=0.5),
    "bgn_groups": lambda: sx.convert_model(_small_model(), "bgn", num_groups=4),
    "bgn_pieces": lambda: sx.convert_model(_small_model(), "bgn", num_groups=16),
    # a Conv2dCBN (explicit conv input) and a conv -> BN pair bound by convert_model (a hook)
    "cbn": lambda: sx.convert_model(_conv2dcbn_model(), "cbn", window=3, burnin=1),
}


def _local_loss(model, x, target, total):
    """This rank's share of the mean loss over the whole batch: the ranks' gradients sum to
    the single process's."""
    out = model(x)
    return out, nn.functional.cross_entropy(out, target, reduction="sum") / total


def _compiled_worker(rank, world, sizes, keys):
    lo, hi = rank_slice(sizes, rank)
    total = sum(sizes)
    for key in keys:
        torch._dynamo.reset()
        torch.manual_seed(0)
        single = COMPILED[key]().double()
        randomize(single)
        eager = sx.convert_sync(copy.deepcopy(single))
        assert sum(getattr(m, "sync", False) for m in eager.modules()) == 2, key
        compiled = copy.deepcopy(eager)
        step_fn = torch.compile(_local_loss, fullgraph=True, backend="aot_eager")
        models = (single, eager, compiled)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
        for step in range(3):
            g = torch.Generator().manual_seed(50 + step)
            x = torch.randn(total, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1
            target = torch.randint(0, 4, (total,), generator=g)
            torch.manual_seed(step)
            out_s, loss_s = _local_loss(single, x, target, total)
            loss_s.backward()
            results = []
            for model, fn in ((eager, _local_loss), (compiled, step_fn)):
                torch.manual_seed(step + 10 * rank)  # rank 0's StochNorm mask must win
                out, loss = fn(model, x[lo:hi], target[lo:hi], total)
                loss.backward()
                results.append(out)
            what = f"compiled {key} step {step} rank {rank}"
            close(results[0], out_s[lo:hi], what + " eager output")
            close(results[1], out_s[lo:hi], what + " compiled output")
            for name, ps in single.named_parameters():
                for model, kind in ((eager, "eager"), (compiled, "compiled")):
                    grad = model.get_parameter(name).grad
                    dist.all_reduce(grad)  # what DDP does (it averages: the same check)
                    close(grad, ps.grad, f"{what} {kind} gradient of {name}")
            for opt in opts:
                opt.step()
                opt.zero_grad()
            reference = single.state_dict()
            for model, kind in ((eager, "eager"), (compiled, "compiled")):
                state = model.state_dict()
                assert state.keys() == reference.keys(), what
                for name, expected in reference.items():
                    if expected.is_floating_point():
                        close(state[name], expected, f"{what} {kind} {name}")
                    else:
                        assert torch.equal(state[name], expected), f"{what} {kind} {name}"
        if key == "cbn":  # the window took part: 3 steps after a burn-in of 1 fill both slots
            assert all(bool(m.window_valid.all()) for m in compiled.modules()
                       if isinstance(m, sx.CrossIterationBatchNorm2d)), what


@pytest.mark.timeout(600)
def test_compiled_fullgraph_sync_training_matches_eager_and_one_process():
    """torch.compile(fullgraph=True, backend='aot_eager') of the training step of models with
    synchronised layers of every kind (2 processes, batches of 2 and 3): the collectives are
    traced (forward all-gather, backward all-reduce, CBN's Jacobian all-reduce), and 3 SGD
    steps give the outputs, gradients, running statistics and CBN windows of the eager
    synchronised models and of one process on the whole batch."""
    spawn(2, _compiled_worker, (2, 3), list(COMPILED))


# --------------------------------------------------------------------------- CBN's deferred Jacobian average
WINDOW_FIELDS = ("mean", "var", "dmu", "dvar", "dmu_w", "dvar_w", "valid", "head")


def _deferred_worker(rank, world, sizes):
    """A synchronised Conv2dCBN (its Jacobian all-reduce overlaps the rest of the step) against
    the functional form, whose all-reduce is waited for in the step: same outputs and the same
    window, bitwise, whether the entry lands in state_dict() right after the step or in the
    next forward after the optimiser changed the conv weight in place."""
    lo, hi = rank_slice(sizes, rank)
    total = sum(sizes)
    torch.manual_seed(0)
    layer = sx.Conv2dCBN(3, 6, 3, padding=1, window=3, burnin=1, rho=0.8, sync=True).double()
    randomize(layer)
    conv_w = layer.conv.weight.detach().clone()
    gamma, beta = layer.norm.weight.detach().clone(), layer.norm.bias.detach().clone()
    rm, rv = layer.norm.running_mean.clone(), layer.norm.running_var.clone()
    window = sx.CBNWindow.empty(3, 6, conv_w.shape, dtype=torch.float64)
    for step in range(5):
        g = torch.Generator().manual_seed(200 + step)
        x = (torch.randn(total, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 1)[lo:hi]
        y = layer(x)
        what = f"deferred step {step} rank {rank}"
        assert len(layer.norm._deferred) == 1, what  # in flight (burn-in steps too: the slot keeps itself)
        expected = sx.functional.cross_iteration_batch_norm(
            nn.functional.conv2d(x, conv_w, padding=1), x, conv_w, window, gamma, beta, rm, rv,
            training=True, momentum=0.1, eps=1e-5, rho=0.8, burnin=1, padding=1, sync=True)
        assert torch.equal(y, expected), what
        if step % 2:  # a checkpoint right after the step holds the landed entry
            state = layer.state_dict()
            assert not layer.norm._deferred, what
            for field in WINDOW_FIELDS:
                assert torch.equal(state["norm.window_" + field], getattr(window, field)), f"{what} {field}"
            assert torch.equal(state["norm.step"], window.step), what
        with torch.no_grad():  # what the optimiser does before the next forward lands the entry
            delta = torch.randn(conv_w.shape, generator=g, dtype=torch.float64) * 0.1
            layer.conv.weight.add_(delta)
            conv_w.add_(delta)
    copy.deepcopy(layer)  # lands too
    assert not layer.norm._deferred
    for field in WINDOW_FIELDS:
        assert torch.equal(getattr(layer.norm, "window_" + field), getattr(window, field)), field
    assert bool(window.valid.all())


@pytest.mark.timeout(300)
def test_cbn_jacobian_average_overlaps_the_step_with_no_observable_difference():
    spawn(2, _deferred_worker, (2, 3))
