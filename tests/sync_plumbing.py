"""Process plumbing of the synchronised-statistics tests (test_distributed*.py): W processes
spawned on this machine (gloo on CPU, rendezvous through a file in a temporary directory)."""
import contextlib
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import available

BACKENDS = [b for b in ("reference", "cpu", "triton") if available(b, "cpu")]
TOL = dict(rtol=1e-9, atol=1e-9)


def _entry(rank, world, path, fn, args):
    torch.set_num_threads(1)  # W processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(world, fn, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; a failure in any of them
    fails the test with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, os.path.join(tmp, "rendezvous"), fn, args), nprocs=world, join=True)


def rank_slice(sizes, rank):
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


@contextlib.contextmanager
def no_collectives():
    """Any collective inside raises (eval must never sync)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective ran in eval")
    from torch.distributed import _functional_collectives as funcol
    saved = {(module, name): getattr(module, name)
             for module, names in ((dist, ("all_gather", "all_reduce", "broadcast")),
                                   (funcol, ("all_gather_single", "all_gather_tensor", "all_reduce")))
             for name in names}
    for module, name in saved:
        setattr(module, name, forbidden)
    try:
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def randomize(module):
    with torch.no_grad():
        for name, t in module.named_parameters():
            t.copy_(torch.rand_like(t) + 0.5 if name.endswith("norm.weight") or name == "weight"
                    else torch.randn_like(t) * 0.3)
        for name, t in module.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(torch.randn_like(t))
            elif name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")
