"""Run a workload over backend combinations: cold costs, warm latency, peak memory, accuracy, roofline.

For every case (preset set x batch x Stage B cfg) the eager reference runs first; then every combination
(a runtime backend per stage, optionally with CUDA graphs, or a peer) is built from freshly seeded weights
(identical values for all), run `warmup` times (the first run is timed apart: lazy compilation, autotuning,
graph capture), then `runs` times. A combination that cannot run here is kept in the results with its reason
(status "unavailable"); one that fails while running is kept with its error (status "failed").
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cascade_rt.benchmarks import metrics, roofline
from cascade_rt.benchmarks.harness import STAGE_SECTIONS, StageSet, run_once
from cascade_rt.benchmarks.inputs import make_inputs
from cascade_rt.benchmarks.peers import PEERS, build_peer
from cascade_rt.benchmarks.workloads import Case, Workload
from cascade_rt.errors import BackendUnavailable, ConfigError
from cascade_rt.models import build_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGE_SEEDS = {"c": 2, "b": 3, "a": 4}  # weight seed offsets per stage (as pipeline.build_random_pipeline)
GRID_SIDE = 192  # pixels per image in the sample grid


@dataclass(frozen=True)
class Combo:
    """One thing to benchmark: a backend (or peer) name per stage, with or without CUDA graphs."""

    label: str
    per_stage: dict[str, str]
    kind: str = "backend"  # "reference" | "backend" | "peer"
    graphs: str | None = None  # None | "graph" (CUDA graphs) | "static" (the same static-buffer step, no graphs)
    skip_reason: str | None = None  # set when the combination is known not to run here (listed, not run)


SAMPLER_SUFFIXES = {"+graphs": "graph", "+static": "static"}


def parse_combo(text: str, skip_reason: str | None = None) -> Combo:
    """'onnxruntime' | 'tensorrt+graphs' | 'c=tensorrt,b=tensorrt,a=triton' | a peer name -> Combo.

    '+graphs' samples Stage C and B with the runtime's CUDA-graphed sampler; '+static' with its CPU twin
    (the same static-buffer step without graphs: what the graphs replay, checkable on a CPU).
    """
    text = text.strip()
    body, graphs = text, None
    for suffix, mode in SAMPLER_SUFFIXES.items():
        if text.endswith(suffix):
            body, graphs = text.removesuffix(suffix), mode
    if "=" in body:
        from cascade_rt.runtime.backends import parse_backend_spec

        per_stage = parse_backend_spec(body)
    else:
        per_stage = {s: body for s in "cba"}
    kind = "peer" if body in PEERS else ("reference" if body == "eager" and not graphs else "backend")
    return Combo(text, per_stage, kind, graphs, skip_reason)


def _seed(wl: Workload, stage: str) -> int:
    return wl.seed + STAGE_SEEDS[stage]


def _build_models(case: Case, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    wl = case.workload
    return {s: build_model(case.presets[s], device=device, dtype=dtype, seed=_seed(wl, s)) for s in "cba"}


def _build_runner(name: str, stage: str, case: Case, model: torch.nn.Module, ctx: Any) -> Any:
    if name in PEERS:
        return build_peer(name, stage, case.presets[stage], model, ctx)
    from cascade_rt.runtime.backends import build_runner

    return build_runner(stage, model, name, ctx)


def _samplers(combo: Combo, runners: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The runtime's GraphedSampler for Stage C and B, wired as load_pipeline wires it (one shared pool)."""
    if combo.graphs is None:
        return {}
    if combo.graphs == "graph" and device.type != "cuda":
        raise BackendUnavailable(f"CUDA graphs need a CUDA device (this run is on {device.type})")
    from cascade_rt.runtime.graphs import GraphedSampler

    for s in "cb":
        if not getattr(runners[s], "graph_safe", False):
            raise BackendUnavailable(f"stage {s} backend {runners[s].backend!r} is not CUDA-graph safe")
    pool = torch.cuda.graph_pool_handle() if combo.graphs == "graph" else None
    weights = lambda m: (lambda: [*m.parameters(), *m.buffers()])  # noqa: E731
    return {
        f"sampler_{s}": GraphedSampler(s, mode=combo.graphs, weights=weights(runners[s].model), pool=pool)
        for s in "cb"
    }


def _inductor_counts() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return {}
    return {k: int(v) for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}


def _manifests(engine_dir: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in Path(engine_dir).rglob("*.json")} if Path(engine_dir).is_dir() else {}


def _engine_builds(before: dict[Path, float], engine_dir: Path) -> list[dict[str, Any]]:
    """Engines (re)built since `before`, from their manifests: stage, format, precision, build seconds."""
    builds = []
    for path, mtime in _manifests(engine_dir).items():
        if before.get(path) == mtime:
            continue
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "format" in d and isinstance(d.get("build"), dict):
            builds.append({"stage": d.get("stage"), "format": d["format"], "precision": d.get("precision"),
                           "seconds": d["build"].get("seconds")})  # fmt: skip
    return sorted(builds, key=lambda b: (str(b["stage"]), str(b["format"])))


def _thumbnail(image: torch.Tensor) -> torch.Tensor:
    scale = GRID_SIDE / max(image.shape[-2:])
    small = F.interpolate(image.float(), scale_factor=scale, mode="area") if scale < 1 else image.float()
    return small.cpu()


@dataclass
class Reference:
    """The eager outputs of a case, which every other combination is compared with."""

    latent_c: torch.Tensor
    latent_b: torch.Tensor
    image: torch.Tensor
    e2e_ms: float
    stage_ms: dict[str, float]


def _compare(out: Any, ref: Any) -> dict[str, Any]:
    return {
        "rel_l2_stage_c": metrics.finite_or_none(metrics.relative_l2(out.latent_c, ref.latent_c)),
        "rel_l2_stage_b": metrics.finite_or_none(metrics.relative_l2(out.latent_b, ref.latent_b)),
        "psnr_db": metrics.finite_or_none(metrics.psnr(out.image, ref.image)),
    }


def _accuracy(out: Any, ref: Reference | None, ref32: Any = None) -> dict[str, Any]:
    """Against eager in the run's dtype; with an fp32 eager run, also against that (the tolerance rule: a
    backend's error vs fp32 should stay within ~2x of eager's own error in the same low precision)."""
    acc = _compare(out, ref) if ref is not None else {}
    if ref32 is not None:
        acc["vs_fp32"] = _compare(out, ref32)
    return acc


@torch.inference_mode()
def fp32_reference(case: Case, device: torch.device) -> Any:
    """One eager run of the case with fp32 weights (same seeds, same inputs): the high-precision reference."""
    models = _build_models(case, device, torch.float32)
    try:
        inputs = make_inputs(case, models["c"], models["b"], device)
        out = run_once(StageSet(models["c"], models["b"], models["a"]), case, inputs, device)
        return Reference(out.latent_c.cpu(), out.latent_b.cpu(), out.image.cpu(), out.ms["total"], {})
    finally:
        del models
        _release(device)


def run_combo(combo: Combo, case: Case, device: torch.device, dtype: torch.dtype, ref: Reference | None,
              costs: dict, peak_tflops: float, ctx: Any, ref32: Any = None) -> tuple[dict, Any]:  # fmt: skip
    """Benchmark one combination on one case. Returns (result row, first-run outputs or None)."""
    wl = case.workload
    row: dict[str, Any] = {"label": combo.label, "kind": combo.kind, "per_stage": combo.per_stage,
                           "graphs": combo.graphs, "status": "ok"}  # fmt: skip
    if combo.skip_reason:
        return {**row, "status": "unavailable", "reason": combo.skip_reason}, None
    models = runners = stages = None
    try:
        metrics.reset_peak_memory(device)
        models = _build_models(case, device, dtype)
        setup_ms, runners, before, inductor0 = {}, {}, _manifests(ctx.engine_dir), _inductor_counts()
        for s in "cba":
            metrics.synchronize(device)
            t0 = time.perf_counter()
            runners[s] = _build_runner(combo.per_stage[s], s, case, models[s], ctx)
            metrics.synchronize(device)
            setup_ms[s] = (time.perf_counter() - t0) * 1e3
        builds = _engine_builds(before, ctx.engine_dir)
        stages = StageSet(runners["c"], runners["b"], runners["a"], **_samplers(combo, runners, device))
        inputs = make_inputs(case, models["c"], models["b"], device)
        t0 = time.perf_counter()
        first = run_once(stages, case, inputs, device)
        first_wall_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(wl.warmup - 1):
            run_once(stages, case, inputs, device)
        cold_peak = metrics.peak_memory(device)
        inductor = {k: v - inductor0.get(k, 0) for k, v in _inductor_counts().items() if v - inductor0.get(k, 0)}
        metrics.reset_peak_memory(device)
        runs = [run_once(stages, case, inputs, device) for _ in range(wl.runs)]
        peak = metrics.peak_memory(device)
    except BackendUnavailable as exc:
        return {**row, "status": "unavailable", "reason": str(exc)}, None
    except Exception as exc:  # keep going: one broken backend must not hide the others' numbers
        logger.warning("%s on %s failed: %s: %s", combo.label, case.key, type(exc).__name__, exc, exc_info=True)
        return {**row, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}, None
    finally:
        del models, runners, stages
        _release(device)

    e2e = [r.ms["total"] for r in runs]
    stage_ms = {s: metrics.summarize([r.ms[s] for r in runs]) for s in STAGE_SECTIONS}
    median = metrics.percentile(e2e, 50)
    steps = {"stage_c": case.stage_c.steps, "stage_b": case.stage_b.steps, "stage_a": 1}
    row.update(
        setup_ms=setup_ms,
        cold={
            "setup_ms": sum(setup_ms.values()),  # export / engine build or cache load / module swaps
            "first_run_ms": first_wall_ms,
            "first_run_extra_ms": max(0.0, first_wall_ms - median),  # lazy compile, autotune, graph capture
            "engine_builds": builds,  # exports / engine builds this setup did (none: cache hit or no engines)
            "inductor_cache": inductor,  # Inductor FX-graph cache hits/misses while compiling (warm vs cold)
        },
        e2e_ms=metrics.summarize(e2e),
        stage_ms=stage_ms,
        ms_per_step={s: stage_ms[s]["median"] / steps[s] for s in ("stage_c", "stage_b")},
        images_per_s=case.batch / (median / 1e3),
        peak_memory=peak,
        peak_memory_cold=cold_peak,
        accuracy=_accuracy(first, ref, ref32),
        run_to_run_rel_l2=metrics.finite_or_none(metrics.relative_l2(runs[-1].image, first.image)),
        roofline={
            s: roofline.achieved(costs[s[-1]]["flops_total"], stage_ms[s]["median"], peak_tflops)
            for s in STAGE_SECTIONS
        },
    )
    if ref is not None:
        row["speedup_vs_eager"] = {
            "e2e": ref.e2e_ms / median,
            **{s: ref.stage_ms[s] / stage_ms[s]["median"] for s in STAGE_SECTIONS},
        }
    return row, first


def _release(device: torch.device) -> None:
    gc.collect()
    try:
        torch._dynamo.reset()  # compiled graphs hold weights; each combination starts clean
    except Exception:  # pragma: no cover - dynamo missing or already torn down
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class BenchmarkRun:
    """What `run_workload` produces: the results dict (JSON-ready) and the thumbnails for the image grid."""

    results: dict[str, Any]
    thumbnails: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # case key -> label -> images


def run_workload(
    workload: Workload,
    combos: list[Combo],
    *,
    device: torch.device,
    header: dict[str, Any],
    engine_dir: Path = Path("engines"),
    budget_s: float | None = None,
    on_update: Callable[[BenchmarkRun], None] | None = None,
) -> BenchmarkRun:
    """Every case of `workload` x every combination; eager first (the reference). `header`: environment etc."""
    from cascade_rt.runtime.backends import BuildContext

    dtype = DTYPES[workload.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("this workload runs on a CUDA GPU and none is visible; use --workload tiny (CPU)")
    if not any(c.label == "eager" for c in combos):
        combos = [parse_combo("eager"), *combos]
    combos = sorted(combos, key=lambda c: c.label != "eager")
    peak = roofline.matmul_tflops(device)
    run = BenchmarkRun({**header, "workload": workload.to_json(), "matmul_peak": peak, "cases": []})
    started = time.perf_counter()
    for case in workload.cases():
        costs = roofline.stage_costs(case, dtype)
        entry: dict[str, Any] = {"case": case.to_json(), "roofline": costs, "results": []}
        run.results["cases"].append(entry)
        run.thumbnails[case.key] = {}
        ctx = BuildContext(
            device=device, dtype=dtype, shapes=((case.batch, workload.height, workload.width),),
            engine_dir=Path(engine_dir), model_id=f"random-seed{workload.seed}-{case.preset_set}",
        )  # fmt: skip
        ref, ref32 = None, None
        if workload.fp32_reference and dtype != torch.float32:
            logger.info("case %s: eager fp32 reference", case.key)
            try:
                ref32 = fp32_reference(case, device)
            except Exception as exc:  # e.g. out of memory: the rows keep their comparison with eager
                logger.warning("fp32 reference failed (%s: %s); rows compare with eager only", type(exc).__name__, exc)
                entry["fp32_reference_error"] = f"{type(exc).__name__}: {exc}"
        for combo in combos:
            if budget_s is not None and time.perf_counter() - started > budget_s:
                combo = Combo(combo.label, combo.per_stage, combo.kind, combo.graphs,
                              f"not run: the time budget of {budget_s:.0f} s was used up")  # fmt: skip
            logger.info("case %s: %s", case.key, combo.label)
            row, out = run_combo(combo, case, device, dtype, ref, costs, peak["tflops"], ctx, ref32)
            if combo.label == "eager" and out is not None:
                ref = Reference(out.latent_c, out.latent_b, out.image, row["e2e_ms"]["median"],
                                {s: row["stage_ms"][s]["median"] for s in STAGE_SECTIONS})  # fmt: skip
                row["accuracy"] = _accuracy(out, ref, ref32)
                row["speedup_vs_eager"] = {"e2e": 1.0, **{s: 1.0 for s in STAGE_SECTIONS}}
            if out is not None:
                run.thumbnails[case.key][combo.label] = _thumbnail(out.image)
            entry["results"].append(row)
            if on_update is not None:
                on_update(run)
    run.results["wall_s"] = time.perf_counter() - started
    return run
