"""The checks run before any timing: the reference against ``nn.BatchNorm2d`` where they
coincide, then each layer on each backend against the float64 reference, with the inputs,
training step and error measure of ``stochnorm_ext.selfcheck``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

import stochnorm_ext as sx
from stochnorm_ext import backend as registry, selfcheck
from stochnorm_ext.bench.cases import DTYPES, SELFCHECK_CASES
from stochnorm_ext.bench.environment import scrub_paths


@dataclass
class CheckResult:
    device: str
    backend: str
    layer: str        # the bench layer (stoch_norm, bgn, cbn)
    case: str         # selfcheck's case name
    dtype: str
    ok: bool
    max_rel_err: Optional[float]
    tolerance: float
    error: str = ""

    def line(self) -> str:
        if self.layer == "identity":  # selfcheck's reference == nn.BatchNorm2d checks
            return f"{'PASS' if self.ok else 'FAIL'} {self.case}"
        detail = self.error or f"max rel err {self.max_rel_err:.2e} (tol {self.tolerance:.0e})"
        return (f"{'PASS' if self.ok else 'FAIL'} {self.device:4s} {self.backend:9s} {self.case:10s} "
                f"{self.dtype:8s} {detail}")


def run_checks(device: str, backends: Sequence[str], layers: Sequence[str],
               dtypes: Sequence[str]) -> List[CheckResult]:
    """Each layer on each backend against the float64 reference, with selfcheck's inputs,
    training step and error measure (output, gradients, running statistics, CBN window)."""
    results = []
    for layer in layers:
        for case_name in SELFCHECK_CASES[layer]:
            inputs = selfcheck._case_inputs(case_name, device)
            want = selfcheck._run(case_name, "reference", inputs, torch.float64)
            for backend in backends:
                for dtype_name in dtypes:
                    dtype = DTYPES[dtype_name]
                    if backend in ("reference", "triton") and dtype == torch.float64:
                        continue  # as selfcheck: Triton computes in float32; the reference is the oracle
                    tol = selfcheck.TOLERANCE[dtype]
                    try:
                        got = selfcheck._run(case_name, backend, inputs, dtype)
                        errors = [selfcheck._rel_err(got[k], want[k]) for k in want]
                        # max() would skip a NaN that is not first: look for it explicitly.
                        err = math.nan if any(math.isnan(e) for e in errors) else max(errors)
                        results.append(CheckResult(device, backend, layer, case_name, dtype_name,
                                                   err <= tol, err, tol))
                    except Exception as exc:  # report it, check the rest
                        results.append(CheckResult(device, backend, layer, case_name, dtype_name,
                                                   False, None, tol, scrub_paths(f"{type(exc).__name__}: {exc}")))
    return results


def identity_checks() -> List[CheckResult]:
    """selfcheck's checks of the reference against nn.BatchNorm2d (StochNorm p=1, BGN G=C,
    CBN window 1), so a wrong reference cannot make every backend look right."""
    return [CheckResult("cpu", "reference", "identity", line, "float64", ok, None, 1e-12)
            for ok, line in selfcheck.check_identities()]


def backends_to_check(device: str, requested: Optional[Sequence[str]]) -> List[str]:
    """Every available backend that runs on ``device``, Triton's interpreter on CPU included
    (checked for correctness, not timed)."""
    return [name for name in requested or sx.BACKEND_NAMES
            if sx.backends()[name] is None and registry.runs_on(name, torch.device(device))]
