"""Compile every kernel variant the triton backend launches, for an NVIDIA GPU, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, but it does not type-check
them the way the compiler does (loop-carried types, int1-specialised arguments,
constexpr branches). This script runs the backend's real host code on small CPU tensors
with a stand-in driver whose launches only compile (through ptxas to a cubin) for the
target architecture, so every (dtype, layout, grouping, flag) specialisation the backend
produces is compiled exactly as on a GPU. Nothing runs and the outputs are meaningless.

    python -m stochnorm_ext.backend.triton.compile_check [--arch 90]

Run it without TRITON_INTERPRET. Exits non-zero on the first compile error. From a source
checkout, run it from the repository root.
"""
import argparse
import os
import sys


def _install_compile_only_driver(arch: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    triton.runtime.driver.set_active(CompileOnlyDriver())
    original_run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return original_run(self, *args, grid=grid, warmup=True, **kwargs)

    jit.JITFunction.run = compile_only


def cases(quick=False):
    """(layer, dtype, memory format, shape, extra) covering every specialisation. ``quick``:
    each constexpr branch, storage dtype and layout at least once (about a third of the
    time); the full set crosses them all."""
    import torch
    nchw, cl = torch.contiguous_format, torch.channels_last
    if quick:
        yield "stoch", torch.float32, nchw, (4, 8, 6, 6), {}
        yield "cbn", torch.bfloat16, cl, (4, 8, 6, 6), {}
        yield "bgn", torch.float16, cl, (4, 8, 6, 6), {"num_groups": 16}
        yield "bgn", torch.float64, nchw, (4, 8, 6, 6), {"num_groups": 2}
    else:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for fmt, shape in ((nchw, (4, 8, 6, 6)), (cl, (4, 8, 6, 6)), (nchw, (4, 8)),
                               (torch.channels_last_3d, (2, 8, 2, 3, 3))):
                yield "stoch", dtype, fmt, shape, {}
                yield "cbn", dtype, fmt, shape, {}
                for groups in (2, 8, 16):
                    if groups <= 8 or len(shape) > 2:
                        yield "bgn", dtype, fmt, shape, {"num_groups": groups}
    # one channel block, one split, one piece: arguments equal to 1 become constexprs
    yield "bgn", torch.float32, nchw, (2, 1, 4), {"num_groups": 1}
    yield "stoch", torch.float32, nchw, (2, 3, 1, 1), {}


def run_case(T, layer, dtype, fmt, shape, extra) -> None:
    import torch
    x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    C = shape[1]
    G = extra.get("num_groups", C)
    rm, rv = torch.zeros(G), torch.ones(G)
    for affine in (True, False):
        w = torch.ones(C, requires_grad=True) if affine else None
        b = torch.zeros(C, requires_grad=True) if affine else None
        for training in (True, False):
            if layer == "stoch":
                y = T.stoch_norm(x, w, b, rm, rv, torch.ones(C, dtype=torch.bool), training, 0.1, 1e-5)
            elif layer == "bgn":
                y = T.batch_group_norm(x, G, w, b, rm, rv, training, 0.1, 1e-5)
            else:
                past = torch.zeros(2, C, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                y = T.cross_iteration_norm(x, w, b, rm, rv, past, past, past > 0, training, 0.1, 1e-5)[0]
            y.backward(torch.ones_like(y))
    # momentum=None: the finalize kernels read the cumulative factor from the step count
    steps = torch.zeros((), dtype=torch.long)
    if layer == "stoch":
        T.stoch_norm(x, None, None, rm, rv, torch.ones(C, dtype=torch.bool), True, None, 1e-5, True, steps)
    elif layer == "bgn":
        T.batch_group_norm(x, G, None, None, rm, rv, True, None, 1e-5, True, steps)
    else:
        past = torch.zeros(0, C, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        T.cross_iteration_norm(x, None, None, rm, rv, past, past, past > 0, True, None, 1e-5, True, steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90")
    parser.add_argument("--quick", action="store_true", help="each branch, dtype and layout once, not every combination")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    _install_compile_only_driver(args.arch)
    from stochnorm_ext.backend import triton as T
    if T.UNAVAILABLE:
        print(f"compile_check: triton backend unavailable: {T.UNAVAILABLE}", file=sys.stderr)
        return 2
    # GPU launch heuristics (the CPU defaults are the interpreter's).
    T.TUNING.update(tile=1024, max_block_c=128, programs=8 * 132, gpu_blocks=True)
    count = 0
    for case in cases(args.quick):
        run_case(T, *case)
        count += 1
    import triton
    print(f"compile_check: sm_{args.arch}, triton {triton.__version__}: all kernel variants of "
          f"{count} cases compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
