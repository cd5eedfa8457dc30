#!/usr/bin/env bash
# Package check: build an sdist of stochnorm_ext, then a wheel *from that sdist* (so a file
# missing from the sdist fails here), with the torch in .venv; install the wheel into a
# brand-new venv and run a smoke test there, from outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# `python -m build` makes the sdist first and builds the wheel from its unpacked copy.
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m build --no-isolation --outdir "$work/dist" . >"$work/build.log" 2>&1 \
  || { tail -n 60 "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/stochnorm_ext-*.tar.gz)
wheel=$(ls "$work"/dist/stochnorm_ext-*.whl)
echo "built $(basename "$sdist") and, from it, $(basename "$wheel")"
# The sdist carries the headers, CUDA sources and tests (MANIFEST.in).
listing=$(tar -tzf "$sdist")
for f in csrc/common.h csrc/coefficients.h csrc/cuda/segment_walk.h csrc/cuda/register_cuda.cu \
         stochnorm_ext/backend/triton/kernels.py tests/conftest.py; do
  grep -q "/$f\$" <<<"$listing" || { echo "sdist lacks $f"; exit 1; }
done
python3 -m venv "$work/venv"
# The wheel pins the torch minor version it was built against; pip resolves it.
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import stochnorm_ext as sx
assert sx.__file__.find("site-packages") >= 0, sx.__file__
assert md.version("stochnorm_ext") == sx.__version__, (md.version("stochnorm_ext"), sx.__version__)
requires = md.requires("stochnorm_ext")
torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
assert any(r.startswith("torch") and torch_minor in r for r in requires), (requires, torch.__version__)
print("stochnorm_ext", sx.__version__, "from", sx.__file__, "requires", requires)
backends = sx.backends()
print("backends:", backends)
# The compiled C++ backend must load from the wheel (not fall back to the reference).
assert backends["cpu"] is None, backends["cpu"]
# The wheel's C++ kernels against the reference, forward and input gradient.
x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
for make in (lambda b: sx.StochNorm2d(8, backend=b), lambda b: sx.BatchGroupNorm2d(8, 4, backend=b)):
    outs = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)  # same mask, same state
        layer = make(backend).double()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, layer.running_mean))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
import importlib.util
assert importlib.util.find_spec("stochnorm_ext.backend.triton.kernels") is not None
# The main job ships in the wheel: python -m stochnorm_ext.bench. This venv has no numpy (an
# extra, "bench"), so it must stop with an error that says how to install it.
import importlib.resources, subprocess, sys
assert (importlib.resources.files("stochnorm_ext") / "bench" / "__main__.py").is_file()
run = subprocess.run([sys.executable, "-m", "stochnorm_ext.bench", "--help"], capture_output=True, text=True)
if importlib.util.find_spec("numpy") is None:
    assert run.returncode != 0 and "stochnorm_ext[bench]" in run.stderr, run.stderr[-800:]
else:
    assert run.returncode == 0, run.stderr[-800:]
print("wheel smoke test passed")
PY
