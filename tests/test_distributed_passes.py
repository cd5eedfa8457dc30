"""The synchronised path's parts (stochnorm_ext.distributed): the backend's four passes it
runs, its layer functions with the backend interface v2 arguments (``momentum=None`` with
``num_batches_tracked``), its errors, and no host synchronisation in a training step.
Multi-process checks spawn gloo processes on CPU (tests/sync_plumbing.py)."""
import copy
import types

import pytest
import torch
import torch.distributed as dist

import stochnorm_ext as sx
from sync_plumbing import BACKENDS, close, no_collectives, rank_slice, spawn
from host_reads import HostReads

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


# --------------------------------------------------------------------------- the passes
def test_sync_runs_the_passes_of_the_backend_it_is_given():
    """distributed takes the backend module's ``PASSES``: the cpu (and cuda) backends'
    segment_* kernels, the reference's plain-PyTorch passes for reference and triton; a
    backend is never told apart by its module's name."""
    from stochnorm_ext import distributed, reference
    from stochnorm_ext.backend import compiled as _backend_cpu
    from stochnorm_ext.backend.compiled import cuda as _backend_cuda
    from stochnorm_ext.backend import resolve
    for backend in BACKENDS:
        expected = _backend_cpu.PASSES if backend == "cpu" else reference.PASSES
        assert distributed._passes(resolve(backend, torch.device("cpu"))) is expected, backend
    assert _backend_cuda.PASSES is _backend_cpu.PASSES  # the segment_* ops dispatch on the device
    impl = types.SimpleNamespace(__name__="stochnorm_ext.backend.compiled", PASSES=object())
    assert distributed._passes(impl) is impl.PASSES


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape, fmt, pieces", [
    ((2, 3, 4), None, 2), ((3, 2, 4, 2), torch.channels_last, 4), ((2, 3, 5), None, 1), ((0, 3, 4), None, 2)])
def test_the_cpu_passes_agree_with_the_reference_passes(dtype, tol, shape, fmt, pieces):
    """The kernels' four passes (empty inputs included, which they hand to the reference's)
    against reference.PASSES, outputs in the input's dtype and memory format."""
    from stochnorm_ext import reference
    from stochnorm_ext.backend import compiled as _backend_cpu
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 3
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=fmt or torch.contiguous_format)
    center, scale, shift, k_x, k_0 = (torch.randn(shape[1], pieces, generator=g, dtype=dtype) for _ in range(5))
    for name, args in (("stats", (x, pieces)), ("apply", (x, center, scale, shift)),
                       ("grad_sums", (dy, x, center)), ("grad_apply", (dy, x, center, scale, k_x, k_0))):
        a = getattr(_backend_cpu.PASSES, name)(*args)
        b = getattr(reference.PASSES, name)(*args)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
        if name in ("apply", "grad_apply"):
            assert a.dtype == dtype and a.is_contiguous(memory_format=fmt or torch.contiguous_format), name
        else:
            assert all(t.shape == (shape[1], pieces) for t in a), name


# --------------------------------------------------------------------------- momentum=None, errors, the passes used
def _counting(impl, calls):
    """``impl`` with its PASSES counted in ``calls`` (what distributed runs, by name)."""
    from stochnorm_ext import distributed
    passes = distributed._passes(impl)

    def counted(name):
        def run(*args):
            calls[name] = calls.get(name, 0) + 1
            return getattr(passes, name)(*args)
        return run
    return types.SimpleNamespace(**{name: getattr(impl, name) for name in
                                    ("stoch_norm", "batch_group_norm", "cross_iteration_norm")},
                                 PASSES=types.SimpleNamespace(**{name: counted(name) for name in
                                                                 ("stats", "apply", "grad_sums", "grad_apply")}))


# name -> (per-sample shape, num_groups or None, layer function name)
FUNCTIONS = {
    "stoch_norm": ((5, 3), None, "stoch_norm"),
    "bgn_groups": ((6, 2, 2), 3, "batch_group_norm"),
    "bgn_pieces": ((2, 2, 2), 4, "batch_group_norm"),
    "cbn": ((4, 3, 3), None, "cross_iteration_norm"),
}


def _call(module, key, x, state, nbt, momentum, training=True, **kw):
    """One layer function of ``module`` (reference or distributed) on x with ``state``."""
    shape, groups, fn = FUNCTIONS[key]
    weight, bias, rm, rv, mask, past = state
    if fn == "stoch_norm":
        args = (x, weight, bias, rm, rv, mask)
    elif fn == "batch_group_norm":
        args = (x, groups, weight, bias, rm, rv)
    else:
        args = (x, weight, bias, rm, rv, *past)
    step = (nbt,) if nbt is not None else ()  # the backends' functions may predate the argument
    out = getattr(module, fn)(*args, training, momentum, 1e-5, True, *step, **kw)
    return out[0] if fn == "cross_iteration_norm" else out


def _state(key, g):
    shape, groups, fn = FUNCTIONS[key]
    C, S = shape[0], groups or shape[0]
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(S, generator=g, dtype=torch.float64), torch.rand(S, generator=g, dtype=torch.float64) + 0.5
    mask = torch.rand(C, generator=g) < 0.5
    past = (torch.randn(2, C, generator=g, dtype=torch.float64) + 3, torch.rand(2, C, generator=g, dtype=torch.float64),
            torch.rand(2, C, generator=g) < 0.7)
    return weight, bias, rm, rv, mask, past


def _cumulative_worker(rank, world, sizes, backends):
    from stochnorm_ext import distributed, reference
    from stochnorm_ext.backend import resolve
    lo, hi = rank_slice(sizes, rank)
    for backend in backends:
        for key, (shape, _, fn) in FUNCTIONS.items():
            what = f"{key}/{backend} rank {rank}"
            g = torch.Generator().manual_seed(11)
            x = torch.randn(sum(sizes), *shape, generator=g, dtype=torch.float64) * 2 + 3
            dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
            single = _state(key, g)
            synced = tuple(t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                           else tuple(p.clone() for p in t) for t in single)
            nbt_s, nbt_l = torch.tensor(4), torch.tensor(4)
            calls = {}
            impl = _counting(resolve(backend, x.device), calls)
            xs, xl = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
            ys = _call(reference, key, xs, single, nbt_s, None)
            yl = _call(distributed, key, xl, synced, nbt_l, None, impl=impl)
            # momentum=None: the factor 1/5 read from the tensor, the count advanced by one
            assert int(nbt_s) == 5 and int(nbt_l) == 5, what
            close(synced[2], single[2], what + " running_mean")
            close(synced[3], single[3], what + " running_var")
            close(yl, ys[lo:hi], what + " output")
            ys.backward(dy)
            yl.backward(dy[lo:hi])
            close(xl.grad, xs.grad[lo:hi], what + " input gradient")
            assert calls == dict(stats=1, apply=1, grad_sums=1, grad_apply=1), f"{what}: {calls}"
            # momentum=None without a step count: refused before any collective, nothing changed
            before = [t.clone() for t in synced[2:4]]
            with no_collectives(), pytest.raises(RuntimeError, match="needs num_batches_tracked"):
                _call(distributed, key, xl, synced, None, None, impl=impl)
            assert all(torch.equal(a, b) for a, b in zip(before, synced[2:4])), what
            # eval is the backend's own function: no collective, the running statistics
            with no_collectives(), torch.no_grad():
                expected = _call(resolve(backend, x.device), key, xl, synced, None, 0.1, training=False)
                close(_call(distributed, key, xl, synced, nbt_l, 0.1, training=False, impl=impl),
                       expected, what + " eval")
            assert int(nbt_l) == 5, what
    # Fewer than 2 values per statistic over the whole group (one sample on rank 0, none
    # elsewhere): ValueError on every rank, nothing changed.
    layer = sx.BatchGroupNorm1d(4, 4, momentum=None, sync=True)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match="expected more than 1 value per statistic.* got 1 summed"):
        layer(torch.randn(1 if rank == 0 else 0, 4))
    for name, t in layer.state_dict().items():
        assert torch.equal(t, before[name]), name


@pytest.mark.timeout(300)
def test_sync_with_momentum_none_updates_like_one_process_and_counts_the_step():
    """The layer functions of distributed (2 processes, batches of 2 and 3) with
    ``momentum=None``: running statistics exactly those of the reference on the whole batch
    with the same ``num_batches_tracked``, which advances by 1; each of the backend's four
    passes runs once per forward + backward; momentum=None without a step count and too few
    values over the group raise on every rank with nothing changed; eval runs no collective."""
    spawn(2, _cumulative_worker, (2, 3), BACKENDS)




def _host_sync_worker(rank, world, backends):
    from stochnorm_ext import distributed, reference
    from stochnorm_ext.backend import resolve
    g = torch.Generator().manual_seed(5)
    for backend in backends:
        impl = resolve(backend, torch.device("cpu"))
        for key, (shape, _, fn) in FUNCTIONS.items():
            x = (torch.randn(3, *shape, generator=g, dtype=torch.float64) * 2 + 3).requires_grad_()
            state = _state(key, g)
            # Eager checks the value count on the host (its ValueError): the detector sees that...
            with HostReads() as mode:
                _call(distributed, key, x, state, torch.tensor(2), None, impl=impl)
            assert mode.reads, "the host-read detector saw nothing"
            # ...and, with that one check on the device (as under CUDA graph capture), nothing else
            # of a step reads the host: not the cumulative factor, not the backward.
            saved = distributed._host_may_sync
            distributed._host_may_sync = lambda x: False
            try:
                with HostReads() as mode:
                    y = _call(distributed, key, x, state, torch.tensor(2), None, impl=impl)
                    y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64))
            finally:
                distributed._host_may_sync = saved
            assert not mode.reads, f"{key}/{backend}: host reads {mode.reads}"
    # torch.compile(fullgraph=True) traces the momentum=None step (against the reference).
    x = torch.randn(3, 5, 3, generator=g, dtype=torch.float64) * 2 + 3
    single = _state("stoch_norm", g)
    synced = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in single)
    nbt_s, nbt_l = torch.tensor(2), torch.tensor(2)
    impl = resolve("reference", x.device)
    fn = torch.compile(lambda *a: _call(distributed, "stoch_norm", *a, impl=impl), fullgraph=True,
                       backend="aot_eager")
    for step in range(2):
        ys = _call(reference, "stoch_norm", x + step, single, nbt_s, None)
        yl = fn(x + step, synced, nbt_l, None)
        close(yl, ys, f"compiled step {step} output")
        close(synced[2], single[2], f"compiled step {step} running_mean")
        close(synced[3], single[3], f"compiled step {step} running_var")
        assert int(nbt_l) == int(nbt_s) == 3 + step


@pytest.mark.timeout(300)
def test_a_sync_step_reads_nothing_on_the_host_but_the_eager_count_check():
    """No host synchronisation on a synchronised training step (issue: CUDA graphs), with
    ``momentum=None`` (the factor read from ``num_batches_tracked`` on the device) and the
    backward included: the only host read is eager's "fewer than 2 values" check, which
    compiled and CUDA-graph-captured steps make on the device. A world of 1 (gloo); then
    the same step compiled with fullgraph=True."""
    spawn(1, _host_sync_worker, BACKENDS)
