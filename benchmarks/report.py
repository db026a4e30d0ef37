"""Render a benchmark results JSON as markdown (and CSV rows); also a script:

    python benchmarks/report.py out/bench/results.json            # markdown to stdout
    python -m cascade_rt.benchmarks.report RESULTS.json -o report.md

The header names the device, versions, git SHA, dtype, seed, runs and the command; when the weights were random
it says so before anything else. Every requested combination appears: measured ones in the table, the others
below it with the reason they did not run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from cascade_rt.benchmarks.metrics import as_float
from cascade_rt.stages import STAGES

RANDOM_WEIGHTS_NOTE = (
    "**Random weights.** Every model here has random (seeded) weights: the timings are those of the real "
    "architecture at these shapes (cost does not depend on weight values), the images are not meaningful, and "
    "accuracy compares each backend with the eager reference on the same random weights and inputs."
)

CSV_FIELDS = (
    "created", "device", "torch", "onnxruntime", "tensorrt", "triton", "diffusers", "git_sha", "workload", "case",
    "dtype", "backend", "kind", "status", "e2e_median_ms", "e2e_p90_ms", "stage_c_ms", "stage_b_ms", "stage_a_ms",
    "images_per_s", "peak_memory_bytes", "setup_ms", "first_run_extra_ms", "rel_l2_stage_c", "rel_l2_stage_b",
    "psnr_db", "random_weights", "reason",
)


def _num(x: Any, digits: int = 3) -> str:
    """Significant-digit formatting that keeps large numbers whole (1234 -> '1234', 0.01234 -> '0.0123')."""
    x = as_float(x)
    if x is None:
        return "–"
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x == 0 or abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def _sci(x: Any) -> str:
    x = as_float(x)
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    return "0" if x == 0 else f"{x:.1e}"


def _bytes(n: Any) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def _busy(env: dict[str, Any]) -> str | None:
    """A warning when other work shared the CPU at the start (load average above the core count)."""
    try:
        load, cores = float(str(env.get("load_avg", "")).split()[0]), int(env.get("cpu_count") or 0)
    except (ValueError, IndexError):
        return None
    if cores and load > cores:
        return (f"The load average was {load:.1f} on {cores} cores when the run started: other processes shared "
                "the CPU, so CPU timings are inflated and noisy (the min column is the least disturbed; with 2 or more "
                "torch threads a preempted thread stalls the others, `--threads 1` degrades more gracefully).")
    return None


def _delta(n: Any) -> str:
    return f" (+{_bytes(max(0, n))})" if n is not None else ""


def header_lines(results: dict[str, Any]) -> list[str]:
    env, wl = results.get("environment", {}), results.get("workload", {})
    peak = results.get("matmul_peak", {})
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "onnxruntime", "onnx", "tensorrt", "triton", "diffusers")
                         if env.get(k))
    sha = env.get("git_sha", "?")[:10] + (" (uncommitted changes)" if env.get("git_dirty") else "")
    lines = [
        f"## cascade-rt benchmark: `{wl.get('name')}` on {env.get('device', '?')}"
        + (" (random weights)" if results.get("random_weights") else ""),
        "",
    ]
    if results.get("random_weights"):
        lines += [f"> {RANDOM_WEIGHTS_NOTE}", ""]
    busy = _busy(env)
    if busy:
        lines += [f"> **Busy machine.** {busy}", ""]
    lines += [
        f"* Device: {env.get('device', '?')} ({env.get('device_detail', '')}); {versions}; git {sha}",
        f"* Workload: {wl.get('description', '')}; dtype {wl.get('dtype')}, seed {wl.get('seed')}, "
        f"{wl.get('runs')} timed runs after {wl.get('warmup')} warm-up run(s), "
        f"{results.get('timed_runs', 'sequential')}; median and p90 over the timed runs",
        f"* Timing: {results.get('timing', '')}",
        f"* Matmul rate measured in this run: {_num(peak.get('tflops'))} TFLOP/s ({peak.get('dtype')} "
        f"{peak.get('size')}³, {peak.get('threads')} threads): the roofline column's 100 %",
        f"* Command: `{results.get('command', '?')}`; {results.get('created', '')}; "
        f"load average at start {env.get('load_avg', '?')}",
        "",
    ]
    return lines


def case_title(case: dict[str, Any]) -> str:
    c, b = case["stage_c"], case["stage_b"]
    b_cfg = f"cfg {b['cfg']:g}" if b["cfg"] > 0 and b["cfg"] != 1 else "no CFG"
    presets = "/".join(case["presets"][s] for s in STAGES)
    return (
        f"### {case['key']}: {case['width']}×{case['height']}, batch {case['batch']}, {presets}; "
        f"Stage C {c['steps']} steps cfg {c['cfg']:g} shift {c['shift']:g}, Stage B {b['steps']} steps {b_cfg}, "
        "Stage A decode"
    )


TABLE_HEAD = (
    "| backend | C ms/step | B ms/step | A ms | e2e ms (median / p90 / min) | img/s | speed-up | peak mem | "
    "cold: setup s / 1st-run extra s | rel err C / B | PSNR dB | C: TFLOP/s (% of matmul) |",
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
)
FP32_HEAD = (" vs fp32: rel err B / PSNR dB |", "--:|")
ENGINE_BACKENDS = ("onnxruntime", "tensorrt", "aoti")


def table_row(row: dict[str, Any], with_fp32: bool = False) -> str:
    acc, cold, roof = row.get("accuracy", {}), row["cold"], row["roofline"]["stage_c"]
    e2e = row["e2e_ms"]
    label = f"**{row['label']}**" if row["kind"] == "reference" else row["label"]
    if row["kind"] == "peer":
        label += " (peer)"
    line = (
        f"| {label} | {_num(row['ms_per_step']['stage_c'])} | {_num(row['ms_per_step']['stage_b'])} | "
        f"{_num(row['stage_ms']['stage_a']['median'])} | {_num(e2e['median'])} / {_num(e2e['p90'])} / "
        f"{_num(e2e.get('min'))} | "
        f"{_num(row['images_per_s'])} | {_num(row.get('speedup_vs_eager', {}).get('e2e'))}× | "
        f"{_bytes(row['peak_memory']['bytes'])}{_delta(row['peak_memory'].get('run_delta_bytes'))} | "
        f"{_num(cold['setup_ms'] / 1e3)} / "
        f"{_num(cold['first_run_extra_ms'] / 1e3)} | {_sci(acc.get('rel_l2_stage_c'))} / "
        f"{_sci(acc.get('rel_l2_stage_b'))} | {_num(acc.get('psnr_db'))} | "
        f"{_num(roof['tflops'])} ({_num(roof['pct_of_matmul'], 2)} %) |"
    )
    if with_fp32:
        v = acc.get("vs_fp32", {})
        line += f" {_sci(v.get('rel_l2_stage_b'))} / {_num(v.get('psnr_db'))} |"
    return line


def cold_line(row: dict[str, Any]) -> str | None:
    """What the setup did for engine backends: which exports/builds ran (and for how long), or a cache hit."""
    cold = row["cold"]
    parts = []
    builds = cold.get("engine_builds") or []
    if builds:
        parts.append("built " + ", ".join(f"{b['stage']} {b['format']} ({b['precision']}) {_num(b['seconds'])} s"
                                          for b in builds))
    elif any(name in ENGINE_BACKENDS for name in row.get("per_stage", {}).values()):
        parts.append(f"engines reused from the cache (setup {_num(cold['setup_ms'] / 1e3)} s)")
    cache = cold.get("inductor_cache") or {}
    if cache:
        hits, misses = cache.get("fxgraph_cache_hit", 0), cache.get("fxgraph_cache_miss", 0)
        parts.append(f"first run {_num(cold['first_run_extra_ms'] / 1e3)} s over steady state, compiling "
                     f"{hits + misses} graph(s): {hits} from Inductor's on-disk cache, {misses} compiled")
    return f"* `{row['label']}`: " + "; ".join(parts) if parts else None


def roofline_line(costs: dict[str, Any]) -> str:
    parts = []
    for s, name in (("c", "Stage C"), ("b", "Stage B"), ("a", "Stage A")):
        k = costs[s]
        parts.append(
            f"{name} {k['flops_per_call'] / 1e12:.4g} TFLOP per call at batch {k['batch']} (x{k['calls']}), "
            f"weights {_bytes(k['weight_bytes'])}, activations written {_bytes(k['activation_bytes_per_call'])}/call"
        )
    return "Counted on `meta` (FlopCounterMode; activations unfused): " + "; ".join(parts) + "."


def render_markdown(results: dict[str, Any]) -> str:
    lines = header_lines(results)
    memory_kind = None
    for entry in results.get("cases", []):
        ok = [r for r in entry["results"] if r["status"] == "ok"]
        missing = [r for r in entry["results"] if r["status"] != "ok"]
        fp32 = any("vs_fp32" in r.get("accuracy", {}) for r in ok)
        head = [h + (extra if fp32 else "") for h, extra in zip(TABLE_HEAD, FP32_HEAD)]
        lines += [case_title(entry["case"]), "", *head]
        for row in ok:
            lines.append(table_row(row, fp32))
            memory_kind = row["peak_memory"]["kind"]
        lines.append("")
        colds = [c for c in (cold_line(r) for r in ok) if c]
        if colds:
            lines += ["Cold costs (apart from the table's steady state):", *colds, ""]
        if missing:
            lines.append("Not measured:")
            lines += [f"* `{r['label']}` ({r['status']}): {r.get('reason', '')}" for r in missing]
            lines.append("")
        if entry.get("roofline"):
            lines += [roofline_line(entry["roofline"]), ""]
    lines += [
        "Columns: ms/step = the stage's median time / its steps (conditioning and sampler included); e2e = "
        "Stage C + B + A (text encoder not included); speed-up = eager e2e median / this e2e median; peak mem = "
        f"{memory_kind or 'peak memory'} during this row's timed runs (device/process-wide, so it includes whatever "
        "else was resident), in parentheses its rise over what was in use when a run started; cold costs are apart "
        "from the steady-state numbers "
        "(setup = export + engine build or cache load + module swaps; 1st-run extra = first run minus the median: "
        "lazy compilation, autotuning, CUDA-graph capture); rel err = ||x - x_eager|| / ||x_eager|| of the stage's "
        "output latent; PSNR of the final image against eager's (inf = identical); vs fp32 (when shown) = the same "
        "against eager run once with fp32 weights, eager's own row being the low-precision baseline; TFLOP/s = "
        "counted FLOPs of Stage C / its median time.",
        "",
    ]
    return "\n".join(lines)


def csv_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (case, combination), Liger-style, for appending to benchmarks/results/results.csv."""
    env, wl = results.get("environment", {}), results.get("workload", {})
    out = []
    for entry in results.get("cases", []):
        for row in entry["results"]:
            ok = row["status"] == "ok"
            acc = row.get("accuracy", {})
            out.append({
                "created": results.get("created"), "device": env.get("device"), "torch": env.get("torch"),
                "onnxruntime": env.get("onnxruntime"), "tensorrt": env.get("tensorrt"), "triton": env.get("triton"),
                "diffusers": env.get("diffusers"), "git_sha": env.get("git_sha"), "workload": wl.get("name"),
                "case": entry["case"]["key"], "dtype": wl.get("dtype"), "backend": row["label"], "kind": row["kind"],
                "status": row["status"],
                "e2e_median_ms": row["e2e_ms"]["median"] if ok else None,
                "e2e_p90_ms": row["e2e_ms"]["p90"] if ok else None,
                **{f"{s}_ms": row["stage_ms"][s]["median"] if ok else None for s in ("stage_c", "stage_b", "stage_a")},
                "images_per_s": row.get("images_per_s"),
                "peak_memory_bytes": row["peak_memory"]["bytes"] if ok else None,
                "setup_ms": row["cold"]["setup_ms"] if ok else None,
                "first_run_extra_ms": row["cold"]["first_run_extra_ms"] if ok else None,
                "rel_l2_stage_c": acc.get("rel_l2_stage_c"), "rel_l2_stage_b": acc.get("rel_l2_stage_b"),
                "psnr_db": acc.get("psnr_db"), "random_weights": results.get("random_weights"),
                "reason": row.get("reason"),
            })
    return out


def latest(results_dir: Path, gpu: bool = True) -> Path | None:
    """The newest recorded results JSON (by its `created`) made on a GPU (gpu=True) or on a CPU."""
    found = []
    for path in Path(results_dir).glob("*/results.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (data.get("environment", {}).get("device", "CPU") != "CPU") == gpu:
            found.append((data.get("created", ""), path))
    return max(found)[1] if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render a cascade-rt benchmark results JSON as markdown")
    parser.add_argument("results", type=Path, nargs="?", help="results JSON written by `cascade-rt bench`")
    parser.add_argument("--latest-gpu", action="store_true", help="the newest GPU run recorded in benchmarks/results/")
    parser.add_argument("-o", "--output", type=Path, help="write the markdown here instead of stdout")
    args = parser.parse_args(argv)
    path = args.results or (latest(Path("benchmarks/results")) if args.latest_gpu else None)
    if path is None:
        parser.error("give a results JSON, or --latest-gpu (none recorded yet in benchmarks/results/)")
    text = render_markdown(json.loads(path.read_text()))
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
