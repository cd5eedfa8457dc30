"""``python -m stochnorm_ext.selfcheck``: check every available backend against the reference.

For each device here (CPU, and CUDA when present), each backend available on it and each
layer, the backend runs a training step on random data and is compared with the float64
reference: output, gradients of input/weight/bias, running statistics (and CBN's window).
The reference itself is checked against ``torch.nn.BatchNorm2d`` on the identities of
docs/SPEC.md (StochNorm p=1, BGN G=C, CBN window 1). Without a GPU the Triton backend runs under
Triton's interpreter.

Prints one line per check, then which backends were checked and which were not, and why.
Exit status: 1 if a check fails; 2 if no compiled kernels (``cpu``/``cuda`` backends) could
be checked, e.g. a source tree without its build, so that only the pure-PyTorch reference
(and Triton) ran, unless ``--allow-reference-only`` says that is fine; else 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # must precede any Triton kernel definition
    os.environ.setdefault("TRITON_INTERPRET", "1")

import stochnorm_ext as sx  # noqa: E402
from stochnorm_ext import backend as registry, functional as F  # noqa: E402
from stochnorm_ext.cbn_window import CBNWindow  # noqa: E402

# Max error relative to the reference's largest magnitude, per input dtype (float64: every
# backend is exact to float64 rounding, ~1e-15).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# The backends that run the compiled extension stochnorm_ext._C.
COMPILED = ("cpu", "cuda")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if torch.isnan(got).any():
        return float("nan")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _case_inputs(layer: str, device, shape=(4, 16, 6, 6)):
    """Random float64 inputs of one layer's training step (never zeros)."""
    N, C, H, W = shape
    g = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    case = {
        "x": r(N, C, H, W) * 2 + 0.5, "dy": r(N, C, H, W),
        "weight": 1 + 0.3 * r(C), "bias": 0.2 * r(C),
    }
    groups = {"stoch_norm": C, "bgn_G|C": C // 4, "bgn_G=2C": 2 * C, "cbn": C}[layer]
    case["running_mean"] = 0.1 * r(groups)
    case["running_var"] = 1 + 0.2 * r(groups).abs()
    if layer == "stoch_norm":
        case["mask"] = torch.rand(C, generator=g) < 0.5
    if layer == "cbn":
        K, cin = 2, 3
        conv_w = 0.3 * r(C, cin, 3, 3)
        conv_in = r(N, cin, H, W)
        case["x"] = torch.nn.functional.conv2d(conv_in, conv_w, padding=1) + 0.5
        case["conv_input"], case["conv_weight"] = conv_in, conv_w
        win = CBNWindow.empty(K + 1, C, conv_w.shape, 1, dtype=torch.float64, device=device)
        win.mean.copy_(case["x"].mean((0, 2, 3)) + 0.05 * r(K, C))
        win.var.copy_(case["x"].var((0, 2, 3)) * (1 + 0.1 * r(K, C).abs()))
        win.dmu.copy_(0.01 * r(*win.dmu.shape))
        win.dvar.copy_(0.01 * r(*win.dvar.shape))
        win.valid.fill_(True)
        case["window"] = win
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _run(layer: str, backend: str, case: dict, dtype: torch.dtype):
    """One training step: returns the tensors to compare (output, grads, state)."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # autocast-style
    x = case["x"].to(dtype, copy=True).requires_grad_()
    w = case["weight"].to(param_dtype, copy=True).requires_grad_()
    b = case["bias"].to(param_dtype, copy=True).requires_grad_()
    rm, rv = case["running_mean"].clone().to(w.dtype), case["running_var"].clone().to(w.dtype)
    extra = {}
    if layer == "stoch_norm":
        y = F.stoch_norm(x, rm, rv, w, b, training=True, mask=case["mask"], backend=backend)
    elif layer.startswith("bgn"):
        y = F.batch_group_norm(x, rm.numel(), rm, rv, w, b, training=True, backend=backend)
    else:
        win = CBNWindow(*(t.clone() for t in case["window"]))
        y = F.cross_iteration_batch_norm(x, case["conv_input"].to(dtype), case["conv_weight"].to(w.dtype),
                                         win, w, b, rm, rv, training=True, padding=1, backend=backend)
        extra = {"window.mean": win.mean, "window.var": win.var}
    y.backward(case["dy"].to(dtype))
    return {"y": y, "dx": x.grad, "dweight": w.grad, "dbias": b.grad, "running_mean": rm,
            "running_var": rv, **extra}


def backends_to_check(devices) -> list:
    """The (device, backend) pairs checked: every backend usable here, on each device it runs on."""
    return [(device, backend) for device in devices for backend in sx.available_backends()
            if registry.runs_on(backend, torch.device(device))]


def check_backends(devices, dtypes) -> list:
    results = []
    layers = ("stoch_norm", "bgn_G|C", "bgn_G=2C", "cbn")
    for device, backend in backends_to_check(devices):
        for layer in layers:
            case = _case_inputs(layer, device)
            want = _run(layer, "reference", case, torch.float64)
            for dtype in dtypes:
                if backend == "reference" and dtype == torch.float64:
                    continue  # the float64 reference is the oracle itself
                start = time.perf_counter()
                try:
                    got = _run(layer, backend, case, dtype)
                    errors = [_rel_err(got[k], want[k]) for k in want]
                    # max() would drop a NaN that is not first: any NaN fails the check
                    err = float("nan") if any(e != e for e in errors) else max(errors)
                    ok = err <= TOLERANCE[dtype]
                    detail = f"max rel err {err:.2e} (tol {TOLERANCE[dtype]:.0e})"
                except Exception as exc:  # report, keep checking the rest
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
                ms = (time.perf_counter() - start) * 1e3
                results.append((ok, f"{device:4s} {backend:9s} {layer:10s} {str(dtype)[6:]:8s} {detail} [{ms:.0f} ms]"))
    return results


def check_identities() -> list:
    """The reference against torch.nn.BatchNorm2d where docs/SPEC.md says they coincide."""
    results = []
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64) * 3 + 1
    layers = {
        "StochNorm2d(p=1)": sx.StochNorm2d(8, p=1.0, backend="reference"),
        "BatchGroupNorm2d(G=C)": sx.BatchGroupNorm2d(8, 8, backend="reference"),
        "CrossIterationBatchNorm2d(window=1)": sx.CrossIterationBatchNorm2d(8, window=1, backend="reference"),
    }
    for name, layer in layers.items():
        bn = torch.nn.BatchNorm2d(8).double()
        layer.double()
        err = 0.0
        for _ in range(3):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = layer(xa), bn(xb)
            dy = torch.randn_like(ya)
            ya.backward(dy)
            yb.backward(dy)
            err = max(err, _rel_err(ya, yb), _rel_err(xa.grad, xb.grad),
                      _rel_err(layer.running_var, bn.running_var))
        results.append((err < 1e-12, f"reference {name} == nn.BatchNorm2d: max rel err {err:.1e}"))
    return results


def coverage(devices) -> tuple:
    """Lines saying which backends were checked and which were not (and why), and the names
    of those checked."""
    pairs = backends_to_check(devices)
    lines, said = [], {}
    for name, reason in sx.backends().items():
        on = [device for device, backend in pairs if backend == name]
        if on:
            lines.append(f"checked      {name:9s} on {', '.join(on)}")
            continue
        why = reason or f"runs on none of the devices checked ({', '.join(devices)})"
        lines.append(f"NOT checked  {name:9s} {f'(same reason as {said[why]})' if why in said else why}")
        said.setdefault(why, name)
    return lines, list(dict.fromkeys(backend for _, backend in pairs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="devices to check (default: cpu, and cuda when present)")
    parser.add_argument("--allow-reference-only", action="store_true",
                        help="exit 0 even if no compiled kernels could be checked (only the pure-PyTorch "
                             "reference, and Triton, ran): for a copy of the package without its build")
    args = parser.parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    print(f"stochnorm_ext {sx.__version__} from {os.path.dirname(sx.__file__)}, torch {torch.__version__}, "
          f"devices {devices}")
    results = check_identities()
    dtypes = [torch.float64, torch.float32, torch.bfloat16]
    results += check_backends(devices, dtypes)
    for ok, line in results:
        print(("PASS " if ok else "FAIL ") + line)
    failed = sum(not ok for ok, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    lines, checked = coverage(devices)
    print("\n".join(lines))
    if failed:
        return 1
    if not set(checked) & set(COMPILED):
        print(f"NO COMPILED KERNELS CHECKED: only {', '.join(checked)} ran; the compiled kernels (backends "
              f"{' and '.join(COMPILED)}) could not be checked, see why above. Exit status 2; pass "
              "--allow-reference-only if that is what you want.")
        return 0 if args.allow_reference_only else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
