"""One backend combination's life in a benchmark: prepare (build + warm up), measure (timed runs), finish (a row).

A `Combo` names a backend (or peer) per stage, with an optional sampler mode: '+graphs' samples Stage C and B
with the runtime's CUDA-graphed sampler, '+static' with its CPU twin (the same static-buffer step, no graphs).
`prepare` builds freshly seeded weights (identical values for every combination), the stage runners (timed:
export / engine build or cache load / module swaps) and runs the warm-up (the first run timed apart: lazy
compilation, autotuning, graph capture). `measure` adds one timed run; `finish` turns the runs into a result row.
The runner may interleave `measure` calls of several prepared combinations (round robin), so that whatever else
loads the machine is spread over all of them alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from cascade_rt.benchmarks import metrics, roofline
from cascade_rt.benchmarks.harness import STAGE_SECTIONS, RunOutput, StageSet, run_once
from cascade_rt.benchmarks.inputs import CaseInputs, make_inputs
from cascade_rt.benchmarks.peers import PEERS, build_peer
from cascade_rt.benchmarks.workloads import Case
from cascade_rt.errors import BackendUnavailable
from cascade_rt.models import build_model
from cascade_rt.runtime.backends import build_runner, parse_backend_spec
from cascade_rt.runtime.cuda_graphs import GraphedSampler
from cascade_rt.stages import RANDOM_SEED_OFFSETS, STAGES

SAMPLER_SUFFIXES = {"+graphs": "graph", "+static": "static"}
GRID_SIDE = 192  # pixels per image in the sample grid


@dataclass(frozen=True)
class Combo:
    """One thing to benchmark: a backend (or peer) name per stage, with or without CUDA graphs."""

    label: str
    per_stage: dict[str, str]
    kind: str = "backend"  # "reference" | "backend" | "peer"
    graphs: str | None = None  # None | "graph" (CUDA graphs) | "static" (the same static-buffer step, no graphs)
    skip_reason: str | None = None  # set when the combination is known not to run here (listed, not run)

    def row(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "per_stage": self.per_stage, "graphs": self.graphs,
                "status": "ok"}


def parse_combo(text: str, skip_reason: str | None = None) -> Combo:
    """'onnxruntime' | 'tensorrt+graphs' | 'eager+static' | 'c=tensorrt,b=tensorrt,a=triton' | a peer -> Combo."""
    text = text.strip()
    body, graphs = text, None
    for suffix, mode in SAMPLER_SUFFIXES.items():
        if text.endswith(suffix):
            body, graphs = text.removesuffix(suffix), mode
    if "=" in body:
        per_stage = parse_backend_spec(body)
    else:
        per_stage = {s: body for s in STAGES}
    kind = "peer" if body in PEERS else ("reference" if body == "eager" and graphs is None else "backend")
    return Combo(text, per_stage, kind, graphs, skip_reason)


def build_models(case: Case, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    wl = case.workload
    return {
        s: build_model(case.presets[s], device=device, dtype=dtype, seed=wl.seed + RANDOM_SEED_OFFSETS[s])
        for s in STAGES
    }


def _build_runner(name: str, stage: str, case: Case, model: torch.nn.Module, ctx: Any) -> Any:
    if name in PEERS:
        return build_peer(name, stage, case.presets[stage], model, ctx)

    return build_runner(stage, model, name, ctx)


def _samplers(combo: Combo, runners: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The runtime's GraphedSampler for Stage C and B, wired as load_pipeline wires it (one shared pool)."""
    if combo.graphs is None:
        return {}
    if combo.graphs == "graph" and device.type != "cuda":
        raise BackendUnavailable(f"CUDA graphs need a CUDA device (this run is on {device.type})")

    for s in "cb":
        if not getattr(runners[s], "graph_safe", False):
            raise BackendUnavailable(f"stage {s} backend {runners[s].backend!r} is not CUDA-graph safe")
    pool = torch.cuda.graph_pool_handle() if combo.graphs == "graph" else None
    weights = lambda m: (lambda: [*m.parameters(), *m.buffers()])  # noqa: E731
    return {
        f"sampler_{s}": GraphedSampler(s, mode=combo.graphs, weights=weights(runners[s].model), pool=pool).sample_stage
        for s in "cb"
    }


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
                           "seconds": d["build"].get("seconds")})
    return sorted(builds, key=lambda b: (str(b["stage"]), str(b["format"])))


def _inductor_counts() -> dict[str, int]:
    return {k: int(v) for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}


def thumbnail(image: torch.Tensor) -> torch.Tensor:
    scale = GRID_SIDE / max(image.shape[-2:])
    small = F.interpolate(image.float(), scale_factor=scale, mode="area") if scale < 1 else image.float()
    return small.cpu()


@dataclass
class Prepared:
    """A combination ready to be timed: its runners, inputs, first-run output and cold costs."""

    combo: Combo
    stages: StageSet
    inputs: CaseInputs
    models: dict[str, torch.nn.Module]
    first: RunOutput
    cold: dict[str, Any]
    setup_ms: dict[str, float]
    peak_cold: dict[str, Any]
    runs: list[RunOutput] = field(default_factory=list)
    peak: dict[str, Any] = field(default_factory=dict)

    def release(self) -> None:
        """Drop weights, engines and inputs; keep the outputs and timings (the reference needs them)."""
        self.stages = self.models = self.inputs = None  # type: ignore[assignment]


def prepare(combo: Combo, case: Case, device: torch.device, dtype: torch.dtype, ctx: Any) -> Prepared:
    """Build and warm up; raises BackendUnavailable (cannot run here) or the error that stopped it."""
    if combo.skip_reason:
        raise BackendUnavailable(combo.skip_reason)
    metrics.reset_peak_memory(device)
    models = build_models(case, device, dtype)
    setup_ms, runners, before, inductor0 = {}, {}, _manifests(ctx.engine_dir), _inductor_counts()
    for s in STAGES:
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
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(case.workload.warmup - 1):
        run_once(stages, case, inputs, device)
    inductor = {k: v - inductor0.get(k, 0) for k, v in _inductor_counts().items() if v != inductor0.get(k, 0)}
    cold = {
        "setup_ms": sum(setup_ms.values()),  # export / engine build or cache load / module swaps
        "first_run_ms": first_ms,
        "engine_builds": builds,  # exports / engine builds this setup did (none: cache hit or no engines)
        "inductor_cache": inductor,  # Inductor FX-graph cache hits/misses while compiling (warm vs cold)
    }
    return Prepared(combo, stages, inputs, models, first, cold, setup_ms, metrics.peak_memory(device))


def measure(p: Prepared, case: Case, device: torch.device) -> None:
    """One timed run. Peak memory: the window is this run; it is device- or process-wide (it includes whatever
    else is resident), so `run_delta_bytes` = peak minus what was in use when the run started is kept too."""
    base = metrics.current_memory(device)
    metrics.reset_peak_memory(device)
    p.runs.append(run_once(p.stages, case, p.inputs, device))
    peak = metrics.peak_memory(device)
    peak["run_delta_bytes"] = peak["bytes"] - base if base is not None else None
    if not p.peak or peak["bytes"] > p.peak["bytes"]:
        p.peak = peak


def _compare(out: Any, ref: Any) -> dict[str, Any]:
    return {
        "rel_l2_stage_c": metrics.finite_or_none(metrics.relative_l2(out.latent_c, ref.latent_c)),
        "rel_l2_stage_b": metrics.finite_or_none(metrics.relative_l2(out.latent_b, ref.latent_b)),
        "psnr_db": metrics.finite_or_none(metrics.psnr(out.image, ref.image)),
    }


def accuracy(out: Any, ref: Any, ref32: Any = None) -> dict[str, Any]:
    """Against eager in the run's dtype; with an fp32 eager run, also against that (the tolerance rule: a
    backend's error vs fp32 should stay within ~2x of eager's own error in the same low precision)."""
    acc = _compare(out, ref) if ref is not None else {}
    if ref32 is not None:
        acc["vs_fp32"] = _compare(out, ref32)
    return acc


def finish(
    p: Prepared, case: Case, ref: Prepared | None, ref32: Any, costs: dict, peak_tflops: float
) -> dict[str, Any]:
    """The result row of a measured combination. `ref`: eager's Prepared (p itself for eager's row), None when
    eager could not run (then no accuracy against it and no speed-up)."""
    e2e = [r.ms["total"] for r in p.runs]
    stage_ms = {s: metrics.summarize([r.ms[s] for r in p.runs]) for s in STAGE_SECTIONS}
    median = metrics.percentile(e2e, 50)
    steps = {"stage_c": case.stage_c.steps, "stage_b": case.stage_b.steps, "stage_a": 1}
    speedup = {}
    if ref is not None and ref.runs:
        speedup = {"e2e": metrics.percentile([r.ms["total"] for r in ref.runs], 50) / median}
        speedup.update({s: metrics.percentile([r.ms[s] for r in ref.runs], 50) / stage_ms[s]["median"]
                        for s in STAGE_SECTIONS})
    return {
        **p.combo.row(),
        "setup_ms": p.setup_ms,
        "cold": {**p.cold, "first_run_extra_ms": max(0.0, p.cold["first_run_ms"] - median)},
        "e2e_ms": metrics.summarize(e2e),
        "stage_ms": stage_ms,
        "ms_per_step": {s: stage_ms[s]["median"] / steps[s] for s in ("stage_c", "stage_b")},
        "images_per_s": case.batch / (median / 1e3),
        "peak_memory": p.peak,
        "peak_memory_cold": p.peak_cold,
        "accuracy": accuracy(p.first, ref.first if ref is not None else None, ref32),
        "run_to_run_rel_l2": metrics.finite_or_none(metrics.relative_l2(p.runs[-1].image, p.first.image)),
        "roofline": {
            s: roofline.achieved(costs[s[-1]]["flops_total"], stage_ms[s]["median"], peak_tflops)
            for s in STAGE_SECTIONS
        },
        "speedup_vs_eager": speedup,
    }
