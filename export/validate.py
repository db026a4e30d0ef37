"""Numerical validation of a built engine against the eager stage graph, on fresh random inputs.

Both sides run the same graph in the same precision; the documented tolerance per precision bounds the
relative L2 error of every output (||engine - eager|| / ||eager||) and the max-abs error relative to the
output's largest magnitude. The errors are stored in the manifest; beyond tolerance a `NumericsError` is
raised. fp32 is tight (different kernels and summation orders only; the denoisers' r embedding sets their
bound, see DENOISER_FP32); bf16/fp16 allow the rounding of a deep network evaluated twice in 8-/11-bit mantissas.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

import torch

from cascade_rt.errors import NumericsError
from cascade_rt.export.specs import Dims, StageSpec

logger = logging.getLogger(__name__)

TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"rel_l2": 1e-5, "max_abs_rel": 1e-4},
    "fp16": {"rel_l2": 1e-2, "max_abs_rel": 5e-2},
    "bf16": {"rel_l2": 5e-2, "max_abs_rel": 2e-1},
}
# The denoisers embed r as sin/cos(10^4 * r * f) (docs/reference.md §1.2) in fp32: near r = 1 the phase carries
# an error of ~ulp(10^4) = 1e-3 in ANY fp32 implementation, so two correct ones (torch, ONNX Runtime) differ by up
# to ~1e-4 (measured on stage_c_tiny: 3e-7 at r = 0, 9e-5 at r = 0.99). Their fp32 bound is set by that, not by the
# engine.
DENOISER_FP32 = {"rel_l2": 5e-4, "max_abs_rel": 2e-3}


def tolerance_for(spec: StageSpec, precision: str) -> dict[str, float]:
    if precision == "fp32" and "r" in spec.input_names:
        return dict(DENOISER_FP32)
    return dict(TOLERANCES[precision])

Runner = Callable[..., Mapping[str, torch.Tensor]]


def output_errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return {"max_abs": float("inf"), "rel_l2": float("inf"), "max_abs_rel": float("inf"), "finite": False}
    diff = out - ref
    scale = ref.abs().max().item() or 1.0
    return {
        "max_abs": diff.abs().max().item(),
        "rel_l2": (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
        "max_abs_rel": diff.abs().max().item() / scale,
        "finite": bool(torch.isfinite(out).all()),
    }


def validate(
    engine: Runner,
    reference: Runner,
    spec: StageSpec,
    dims: Dims,
    precision: str,
    *,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    tolerance: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Run engine and eager reference on the same fresh inputs; return the report stored in the manifest."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
    tol = dict(tolerance or tolerance_for(spec, precision))
    inputs = spec.sample_inputs(dims, precision, seed=seed, device=device)
    start = time.perf_counter()
    got = engine(**inputs)
    engine_s = time.perf_counter() - start
    want = reference(**inputs)
    report: dict[str, Any] = {
        "status": "passed", "seed": seed, "shapes": {k: list(v.shape) for k, v in inputs.items()},
        "tolerance": tol, "outputs": {}, "errors": [], "engine_seconds": round(engine_s, 4),
    }
    for name in spec.output_names:
        if name not in got:
            report["errors"].append(f"{name}: missing from the engine's outputs")
            continue
        err = output_errors(got[name], want[name])
        report["outputs"][name] = err
        if not err["finite"]:
            report["errors"].append(f"{name}: NaN/Inf in the engine output")
        for key, limit in tol.items():
            if not err[key] <= limit:
                report["errors"].append(f"{name}: {key} {err[key]:.3g} > tolerance {limit:.3g}")
    if report["errors"]:
        report["status"] = "failed"
    logger.info(
        "validation %s: %s", report["status"],
        ", ".join(f"{n} rel_l2={e['rel_l2']:.2e} max_abs={e['max_abs']:.2e}" for n, e in report["outputs"].items()),
    )
    return report


def raise_if_failed(report: Mapping[str, Any], what: str) -> None:
    if report.get("status") == "failed":
        raise NumericsError(f"{what} failed validation against the eager model: " + "; ".join(report["errors"]))
