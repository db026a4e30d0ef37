"""Run a workload over backend combinations: cold costs, warm latency, peak memory, accuracy, roofline.

For every case (preset set x batch x Stage B cfg) the eager reference is prepared first; then every combination
(`combos.py`: a runtime backend per stage, optionally with CUDA graphs, or a peer). Timed runs are either
sequential (one combination at a time: only it is resident, the default on a GPU, where memory is the limit) or
interleaved round robin over all prepared combinations (the default on a CPU, where other processes' load comes
and goes: interleaving spreads it over every row alike). A combination that cannot run here is kept with its
reason (status "unavailable"); one that fails is kept with its error (status "failed").
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from cascade_rt.benchmarks import roofline
from cascade_rt.benchmarks.combos import Combo, Prepared, build_models, finish, measure, parse_combo, prepare, thumbnail
from cascade_rt.benchmarks.harness import StageSet, run_once
from cascade_rt.benchmarks.inputs import make_inputs
from cascade_rt.benchmarks.workloads import Case, Workload
from cascade_rt.errors import BackendUnavailable, ConfigError
from cascade_rt.runtime.backends import BuildContext

logger = logging.getLogger(__name__)

INTERLEAVE_PAUSE_S = 0.2  # between interleaved runs: OpenMP / ONNX Runtime pools spin for a while after work
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["BenchmarkRun", "Combo", "parse_combo", "run_workload"]


@torch.inference_mode()
def fp32_reference(case: Case, device: torch.device) -> Any:
    """One eager run of the case with fp32 weights (same seeds, same inputs): the high-precision reference."""
    models = build_models(case, device, torch.float32)
    try:
        inputs = make_inputs(case, models["c"], models["b"], device)
        out = run_once(StageSet(models["c"], models["b"], models["a"]), case, inputs, device)
        return SimpleNamespace(latent_c=out.latent_c.cpu(), latent_b=out.latent_b.cpu(), image=out.image.cpu())
    finally:
        del models
        _release(device)


def _release(device: torch.device) -> None:
    gc.collect()
    try:
        torch._dynamo.reset()  # compiled graphs hold weights; each combination starts clean
    except Exception:  # pragma: no cover - dynamo missing or already torn down
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _not_run(combo: Combo, status: str, reason: str) -> dict[str, Any]:
    return {**combo.row(), "status": status, "reason": reason}


def _try(combo: Combo, case: Case, what: str, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any] | None]:
    """(result, None) or (None, row saying why not): one broken backend must not hide the others' numbers."""
    try:
        return fn(), None
    except BackendUnavailable as exc:
        return None, _not_run(combo, "unavailable", str(exc))
    except Exception as exc:
        logger.warning("%s on %s failed while %s: %s: %s", combo.label, case.key, what, type(exc).__name__, exc,
                       exc_info=logger.isEnabledFor(logging.DEBUG))
        return None, _not_run(combo, "failed", f"{type(exc).__name__} while {what}: {exc}")


@dataclass
class BenchmarkRun:
    """What `run_workload` produces: the results dict (JSON-ready) and the thumbnails for the image grid."""

    results: dict[str, Any]
    thumbnails: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # case key -> label -> images


def run_case(case: Case, combos: list[Combo], *, device: torch.device, dtype: torch.dtype, ctx: Any, costs: dict,
             peak_tflops: float, ref32: Any, interleave: bool, deadline: float | None,
             on_row: Callable[[list[dict]], None] = lambda rows: None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Rows (in `combos` order, eager first) and first-run thumbnails of one case. `on_row(rows so far)` after
    every finished row (the caller saves partial results)."""
    rows: dict[str, dict] = {}
    prepared: dict[str, Prepared] = {}
    thumbs: dict[str, torch.Tensor] = {}
    ref: Prepared | None = None  # eager's, once prepared; None if eager could not run

    def ordered() -> list[dict]:
        return [rows[c.label] for c in combos if c.label in rows]

    def done(label: str, row: dict, p: Prepared | None = None) -> None:
        rows[label] = row
        if p is not None:
            p.release()
        _release(device)
        on_row(ordered())

    def measured(p: Prepared) -> None:
        thumbs[p.combo.label] = thumbnail(p.first.image)
        done(p.combo.label, finish(p, case, ref, ref32, costs, peak_tflops), p)

    for combo in combos:
        if deadline is not None and time.perf_counter() > deadline:
            done(combo.label, _not_run(combo, "unavailable", "not run: the time budget (--budget-s) was used up"))
            continue
        logger.info("case %s: %s", case.key, combo.label)
        p, failed = _try(combo, case, "building and warming up", lambda: prepare(combo, case, device, dtype, ctx))
        if failed is not None:
            done(combo.label, failed)
            continue
        if combo.label == "eager":
            ref = p
        if interleave:
            prepared[combo.label] = p
            continue
        _, failed = _try(combo, case, "timing", lambda: [measure(p, case, device) for _ in range(case.workload.runs)])
        if failed is not None:
            ref = None if p is ref else ref
            done(combo.label, failed, p)
        else:
            measured(p)

    if prepared:
        logger.info("case %s: %d timed rounds over %d combinations", case.key, case.workload.runs, len(prepared))
        for _ in range(case.workload.runs):
            for label, p in list(prepared.items()):
                time.sleep(INTERLEAVE_PAUSE_S)  # let the previous backend's spinning worker threads go idle
                _, failed = _try(p.combo, case, "timing", lambda p=p: measure(p, case, device))
                if failed is not None:
                    ref = None if p is ref else ref
                    del prepared[label]
                    done(label, failed, p)
        for p in prepared.values():
            measured(p)
    return ordered(), thumbs


def run_workload(
    workload: Workload,
    combos: list[Combo],
    *,
    device: torch.device,
    header: dict[str, Any],
    engine_dir: Path = Path("engines"),
    budget_s: float | None = None,
    interleave: bool | None = None,
    on_update: Callable[[BenchmarkRun], None] | None = None,
) -> BenchmarkRun:
    """Every case of `workload` x every combination; eager first (the reference). `header`: environment etc.
    `interleave` None: round robin on a CPU, sequential on a GPU."""
    dtype = DTYPES[workload.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("this workload runs on a CUDA GPU and none is visible; use --workload tiny (CPU)")
    if not any(c.label == "eager" for c in combos):
        combos = [parse_combo("eager"), *combos]
    combos = sorted(combos, key=lambda c: c.label != "eager")
    interleave = device.type == "cpu" if interleave is None else interleave
    peak = roofline.matmul_tflops(device)
    run = BenchmarkRun({**header, "workload": workload.to_json(), "matmul_peak": peak, "cases": [],
                        "timed_runs": "interleaved round robin" if interleave else "sequential"})
    started = time.perf_counter()
    deadline = started + budget_s if budget_s is not None else None
    for case in workload.cases():
        entry: dict[str, Any] = {"case": case.to_json(), "roofline": roofline.stage_costs(case, dtype), "results": []}
        run.results["cases"].append(entry)
        ctx = BuildContext(
            device=device, dtype=dtype, shapes=((case.batch, workload.height, workload.width),),
            engine_dir=Path(engine_dir), model_id=f"random-seed{workload.seed}-{case.preset_set}",
        )
        ref32 = None
        if workload.fp32_reference and dtype != torch.float32:
            logger.info("case %s: eager fp32 reference", case.key)
            try:
                ref32 = fp32_reference(case, device)
            except Exception as exc:  # e.g. out of memory: the rows keep their comparison with eager
                logger.warning("fp32 reference failed (%s: %s); rows compare with eager only", type(exc).__name__, exc)
                entry["fp32_reference_error"] = f"{type(exc).__name__}: {exc}"
        def on_row(rows: list[dict], entry: dict = entry) -> None:
            entry["results"] = rows
            if on_update is not None:
                on_update(run)

        _, run.thumbnails[case.key] = run_case(
            case, combos, device=device, dtype=dtype, ctx=ctx, costs=entry["roofline"], peak_tflops=peak["tflops"],
            ref32=ref32, interleave=interleave, deadline=deadline, on_row=on_row,
        )
    run.results["wall_s"] = time.perf_counter() - started
    return run
