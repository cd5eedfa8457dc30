"""Launches and times of one training step per layer on a CUDA device (run by gpu_validate.sh).

For each (layer, backend, shape, dtype, memory format): the CUDA kernels of one training
forward and of its backward (torch.profiler; the names printed once per layer/backend), the
eager fwd+bwd step time with the host in the loop (what small-batch training sees), the
CUDA-graph replay time of the same step (device time only), and against that the bandwidth of
the step's minimum traffic (forward reads x and writes y, backward reads x and dy and writes
dx: 5 tensors of x's size). ``nn.BatchNorm2d`` (cuDNN) runs the same cases as the baseline;
CBN runs as conv + norm against conv + BatchNorm. JSON rows go to argv[1].
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import stochnorm_ext as sx

DEV = "cuda"
OUT = sys.argv[1] if len(sys.argv) > 1 else "probe_perf.json"
DEADLINE = time.time() + float(os.environ.get("PROBE_SECONDS", "60"))
BACKENDS = [b for b in ("cuda", "triton") if sx.backends()[b] is None]
SHAPES = [(2, 8, 2, 2), (2, 64, 56, 56), (8, 2048, 7, 7), (32, 256, 56, 56)]
PROFILED = {(2, 8, 2, 2), (8, 2048, 7, 7)}


def make(kind, C, backend):
    if kind == "bn":
        return nn.BatchNorm2d(C)
    if kind == "stoch":
        return sx.StochNorm2d(C, p=0.5, backend=backend)
    if kind == "bgn":
        return sx.BatchGroupNorm2d(C, num_groups=max(1, C // 4), backend=backend)
    if kind == "bgn_G1":
        return sx.BatchGroupNorm2d(C, num_groups=1, backend=backend)
    if kind == "conv+bn":
        return nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C))
    if kind == "conv+cbn":
        return sx.Conv2dCBN(C, C, 1, window=4, backend=backend)
    raise ValueError(kind)


def kernels(fn):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]


def eager_us(step, iters=30):
    for _ in range(3):
        step()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / iters * 1e6)
    return statistics.median(times)


def graph_us(step, iters=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def short(name):
    name = name.split("(")[0].split("<")[0]
    for prefix in ("void ", "stochnorm_ext::cuda::", "(anonymous namespace)::", "at::native::"):
        name = name.replace(prefix, "")
    return name[:60]


def main():
    rows, listed = [], set()
    cases = [(k, None) for k in ("bn", "conv+bn")]
    cases += [(k, b) for b in BACKENDS for k in ("stoch", "bgn", "conv+cbn")]
    for shape in SHAPES:
        for dtype, fmt in ((torch.float32, "nchw"), (torch.bfloat16, "cl")):
            extra = [("bgn_G1", b) for b in BACKENDS] if shape == (8, 2048, 7, 7) else []
            for kind, backend in cases + extra:
                if time.time() > DEADLINE:
                    print("deadline: stopped", flush=True)
                    json.dump(rows, open(OUT, "w"), indent=1)
                    return
                try:
                    torch.manual_seed(0)
                    C = shape[1]
                    mf = torch.channels_last if fmt == "cl" else torch.contiguous_format
                    m = make(kind, C, backend).to(DEV).to(memory_format=mf)
                    x = torch.randn(shape, device=DEV).contiguous(memory_format=mf)
                    x = x.to(dtype).requires_grad_() if kind != "conv+bn" and kind != "conv+cbn" else x.requires_grad_()
                    dy = torch.randn(shape, device=DEV).contiguous(memory_format=mf)
                    ctx = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 and kind.startswith("conv") \
                        else torch.autocast("cuda", enabled=False)

                    def step():
                        with ctx:
                            y = m(x)
                        y.backward(dy.to(y.dtype))

                    kf = kb = []
                    if shape in PROFILED:
                        with ctx:
                            y = m(x)
                        kf = kernels(lambda: m(x))
                        kb = kernels(lambda: torch.autograd.grad(y, [x] + list(m.parameters()), dy.to(y.dtype),
                                                                 retain_graph=True))
                        del y  # its graph holds AccumulateGrad nodes made on this stream: capture breaks
                        key = (kind, backend, fmt)
                        if key not in listed:
                            listed.add(key)
                            print(f"# {kind}/{backend} {fmt}: fwd {[short(n) for n in kf]}")
                            print(f"# {kind}/{backend} {fmt}: bwd {[short(n) for n in kb]}")
                    eager = eager_us(step)
                    for t in [x] + list(m.parameters()):
                        t.grad = None
                    try:
                        graphed = graph_us(step)
                    except Exception as exc:  # noqa: BLE001  (reported, the probe goes on)
                        graphed = float("nan")
                        print(f"graph capture failed for {kind}/{backend}: {type(exc).__name__}: {exc}"[:300])
                    floor_bytes = 5 * x.numel() * torch.empty((), dtype=dtype).element_size()
                    row = dict(kind=kind, backend=backend or "torch", shape="x".join(map(str, shape)),
                               dtype=str(dtype)[6:], fmt=fmt, fwd_kernels=len(kf) or None, bwd_kernels=len(kb) or None,
                               eager_step_us=round(eager, 1), graph_step_us=round(graphed, 1),
                               GBps_of_floor=round(floor_bytes / (graphed * 1e-6) / 1e9, 1) if graphed == graphed else None)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"ERROR {kind}/{backend} {shape} {dtype} {fmt}: {type(exc).__name__}: {str(exc)[:300]}",
                          flush=True)
    json.dump(rows, open(OUT, "w"), indent=1)
    print("probe_perf rows:", len(rows))


if __name__ == "__main__":
    main()
