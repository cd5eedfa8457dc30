#!/usr/bin/env bash
# Build a wheel of stochnorm_ext with the torch in .venv, install it into a brand-new venv
# and run a smoke test there (from outside the source tree, so the installed copy is used).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip wheel -q --disable-pip-version-check \
  --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/stochnorm_ext-*.whl)
echo "built $(basename "$wheel")"
python3 -m venv "$work/venv"
# The wheel pins the torch minor version it was built against; pip resolves it.
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import torch
import stochnorm_ext as sx
assert sx.__file__.find("site-packages") >= 0, sx.__file__
print("stochnorm_ext", sx.__version__, "from", sx.__file__)
print("backends:", sx.backends())
x = torch.randn(4, 8, 3, 3)
for layer in (sx.StochNorm2d(8), sx.BatchGroupNorm2d(8, 4)):
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
import importlib.util
assert importlib.util.find_spec("stochnorm_ext._C") is not None, "compiled extension missing from the wheel"
assert importlib.util.find_spec("stochnorm_ext.triton_kernels") is not None
print("wheel smoke test passed")
PY
