"""GPU checks of the runtime, with timings: run this in a session that has a CUDA GPU.

    .venv/bin/python benchmarks/gpu_runtime_check.py                 # lite models, ~5 min on an H100
    .venv/bin/python benchmarks/gpu_runtime_check.py --presets lite,full --pytest

Checks (each records pass/fail and its numbers; the script exits 1 if any failed):
  graphs_equal    GraphedSampler replay (per step and whole loop) vs the eager sampler, same noise, per stage
  addresses       debug mode over repeated calls (static buffers never move) and no host sync inside replays
  backends        compile / triton stages captured in graphs, vs eager within their tolerance
  step_timing     per-step time: eager loop vs graph replay vs whole-loop graph; capture (cold) time apart
  pipeline        load_pipeline per preset: per-stage warm timings with and without graphs, images vs eager
  memory          resident / sequential / offload peaks (torch.cuda.max_memory_allocated per stage) vs the
                  meta-device estimate; the edge preset (C lite + B lite, bf16, sequential) under 8 GiB
  throughput      batched prompts, Stage B/A of batch k overlapped with Stage C of batch k+1, vs no overlap
  pytest          (--pytest) `pytest -m gpu tests/runtime`
Weights are random (seeded): speed and equality only, no image quality. Results: benchmarks/results/
runtime-<gpu>-<date>-<sha>.json, with device, versions, git SHA, command, dtype.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3
PRESET_MODELS = {"tiny": ("stage_c_tiny", "stage_b_tiny"), "lite": ("stage_c_lite", "stage_b_lite"),
                 "full": ("stage_c", "stage_b")}  # fmt: skip
SIZES = {"tiny": 512, "lite": 1024, "full": 1024}
DEVICE = "cuda"  # --device cpu: a smoke run of this script's code paths (tiny presets; no GPU claims)
MODE = "graph"  # GraphedSampler mode; "static" (the CPU twin) in a smoke run
LITE, LITE_C = "lite", "stage_c_lite"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # not a checkout
        return ""


def environment(args: argparse.Namespace) -> dict[str, Any]:
    env = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join([sys.executable, *sys.argv]),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
           "dtype": "bf16", "presets": args.presets}  # fmt: skip
    for mod in ("triton", "tensorrt", "onnxruntime"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / GiB, 1))
    return env


def cuda_ms(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Median milliseconds of `fn` over `repeat` warm runs, with CUDA events (one sync per run, after it)."""
    times, out = [], None
    for _ in range(repeat):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], out


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def stage_inputs(model: torch.nn.Module, stage: str, batch: int, size: int, seed: int = 0):
    """(x, cond, uncond) with the model's conditioning widths at image size `size` (shapes from the specs)."""
    from cascade_rt.pipeline import latent_shapes

    g = torch.Generator().manual_seed(seed)
    shapes = latent_shapes(batch, size, size)
    dt = model.dtype
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dt)  # noqa: E731
    if stage == "c":
        enc = lambda: model.prepare_conditioning(  # noqa: E731
            rnd(batch, 77, model.clip_txt_mapper.in_features), rnd(batch, 1, model.clip_txt_pooled_mapper.in_features),
            torch.zeros(batch, 1, model.clip_img_mapper.in_features, device=DEVICE, dtype=dt))
    else:
        effnet = rnd(*shapes["c"])
        enc = lambda: model.prepare_conditioning(effnet, rnd(batch, 1, model.clip_mapper.in_features),  # noqa: E731
                                                 latent_hw=shapes["b"][-2:])
    return torch.randn(shapes[stage], generator=g).to(DEVICE), enc(), enc()


SETTINGS = {"c": dict(steps=20, cfg=4.0, shift=2.0), "b": dict(steps=10, cfg=1.1, shift=1.0)}


def check_graphs_equal(presets: list[str]) -> dict[str, Any]:
    from cascade_rt.models import build_model
    from cascade_rt.runtime.cuda_graphs import GraphedSampler
    from cascade_rt.sampling import sample_stage

    out, ok = {}, True
    pool = torch.cuda.graph_pool_handle() if DEVICE == "cuda" else None
    for preset in presets:
        for stage, name in zip("cb", PRESET_MODELS[preset]):
            model = build_model(name, device=DEVICE, dtype=torch.bfloat16, seed=1)
            x, cond, uncond = stage_inputs(model, stage, 1, SIZES[preset])
            for whole in (False, True):
                sampler = GraphedSampler(stage, mode=MODE, pool=pool, whole_loop=whole, debug=True,
                                         weights=lambda m=model: list(m.parameters()))  # fmt: skip
                rows = []
                for seed in (1, 2):  # first call captures, second replays
                    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
                    ref = sample_stage(model.denoise, x, cond, uncond, generator=gen(), **SETTINGS[stage])
                    got = sampler.sample_stage(model.denoise, x, cond, uncond, generator=gen(), **SETTINGS[stage])
                    rows.append({"rel": rel(got, ref), "bitwise_equal": bool(torch.equal(got, ref))})
                passed = all(r["rel"] <= 1e-3 for r in rows) and sampler.stats["fallbacks"] == 0
                ok &= passed
                out[f"{name}-{'loop' if whole else 'step'}"] = {"passed": passed, "runs": rows, **sampler.stats}
            del model
            empty_cache()
    return {"passed": ok, **out}


def check_addresses() -> dict[str, Any]:
    from cascade_rt.models import build_model
    from cascade_rt.runtime.cuda_graphs import GraphedSampler

    model = build_model("stage_c_tiny", device=DEVICE, dtype=torch.bfloat16, seed=0)
    x, cond, uncond = stage_inputs(model, "c", 2, 1024)
    sampler = GraphedSampler("c", mode=MODE, debug=True, weights=lambda: list(model.parameters()))
    run = lambda: sampler.sample_stage(model.denoise, x, cond, uncond,  # noqa: E731
                                       generator=torch.Generator(DEVICE).manual_seed(0), **SETTINGS["c"])
    run()
    entry = next(iter(sampler.entries.values()))
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the replays raises
    try:
        for _ in range(5):
            run()
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    stable = entry.static.addresses() == entry.addresses
    return {"passed": stable, "calls": 6, "buffers": len(entry.addresses), "no_sync_in_replay": True, **sampler.stats}


def check_backends() -> dict[str, Any]:
    from cascade_rt.models import build_model
    from cascade_rt.runtime import BuildContext, available_backends, build_runner
    from cascade_rt.runtime.cuda_graphs import GraphedSampler
    from cascade_rt.sampling import sample_stage

    out, ok = {}, True
    ref_model = build_model(LITE_C, device=DEVICE, dtype=torch.bfloat16, seed=1)
    x, cond, uncond = stage_inputs(ref_model, "c", 1, 1024)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ref = sample_stage(ref_model.denoise, x, cond, uncond, generator=gen(), **SETTINGS["c"])
    for name, status in available_backends(DEVICE).items():
        if not status.graph_safe or name == "eager":
            continue
        if not status.available:
            out[name] = {"skipped": status.reason}
            continue
        model = build_model(LITE_C, device=DEVICE, dtype=torch.bfloat16, seed=1)
        runner = build_runner("c", model, name, BuildContext(torch.device(DEVICE), torch.bfloat16))
        sampler = GraphedSampler("c", mode=MODE, weights=lambda m=model: list(m.parameters()))
        t0 = time.perf_counter()
        sampler.sample_stage(runner.denoise, x, cond, uncond, generator=gen(), **SETTINGS["c"])
        sync()
        cold = time.perf_counter() - t0
        ms, got = cuda_ms(lambda: sampler.sample_stage(runner.denoise, x, cond, uncond, generator=gen(), **SETTINGS["c"]))
        err = rel(got, ref)
        passed = err <= 10 * runner.tolerance.bf16 and sampler.stats["captures"] == 1
        ok &= passed
        out[name] = {"passed": passed, "rel_vs_eager": err, "tolerance": runner.tolerance.bf16, "cold_s": cold,
                     "stage_c_20_steps_ms": ms, **sampler.stats}  # fmt: skip
        del model, runner, sampler
        empty_cache()
    return {"passed": ok, **out}


def check_step_timing(presets: list[str]) -> dict[str, Any]:
    from cascade_rt.models import build_model
    from cascade_rt.runtime.cuda_graphs import GraphedSampler
    from cascade_rt.sampling import build_plan, run_plan

    out = {}
    for preset in presets:
        for stage, name in zip("cb", PRESET_MODELS[preset]):
            model = build_model(name, device=DEVICE, dtype=torch.bfloat16, seed=1)
            x, cond, uncond = stage_inputs(model, stage, 1, SIZES[preset])
            s = SETTINGS[stage]
            plan = build_plan(s["steps"], shift=s["shift"], device=DEVICE)
            gen = lambda: torch.Generator(DEVICE).manual_seed(0)  # noqa: E731
            row = {"steps": s["steps"], "size": SIZES[preset]}
            eager = lambda: run_plan(model.denoise, x, plan, cond, uncond, cfg=s["cfg"], generator=gen())  # noqa: E731
            eager()
            row["eager_ms_per_step"] = cuda_ms(eager)[0] / s["steps"]
            for label, whole in (("graph", False), ("graph_loop", True)):
                sampler = GraphedSampler(stage, mode=MODE, whole_loop=whole, weights=lambda m=model: list(m.parameters()))
                call = lambda: sampler(model.denoise, x, plan, cond, uncond, cfg=s["cfg"], generator=gen())  # noqa: E731
                t0 = time.perf_counter()
                call()
                sync()
                row[f"{label}_capture_s"] = time.perf_counter() - t0
                row[f"{label}_ms_per_step"] = cuda_ms(call)[0] / s["steps"]
            row["speedup"] = row["eager_ms_per_step"] / row["graph_ms_per_step"]
            out[name] = row
            del model
            empty_cache()
    return {"passed": True, **out}


def check_pipeline(presets: list[str]) -> dict[str, Any]:
    import cascade_rt

    out, ok = {}, True
    for preset in presets:
        size = SIZES[preset]
        kw = dict(height=size, width=size, seed=0)
        runs = {}
        for graphs in (False, True):
            pipe = cascade_rt.load_pipeline(random_weights=True, preset=preset, device=DEVICE, cuda_graphs=graphs)
            pipe("warm-up", **kw)  # captures / lazy init
            t0 = time.perf_counter()
            res = pipe("a cat", **kw)
            runs[graphs] = {"wall_s": time.perf_counter() - t0, "timings": res.timings, "graphs": res.graphs,
                            "pixels": res.pixels.cpu()}  # fmt: skip
            del pipe
            empty_cache()
        err = rel(runs[True]["pixels"], runs[False]["pixels"])
        passed = err <= 1e-2
        ok &= passed
        out[preset] = {"passed": passed, "pixels_rel_graphs_vs_eager": err, "size": size,
                       **{("graphs" if g else "eager"): {k: v for k, v in r.items() if k != "pixels"}
                          for g, r in runs.items()}}  # fmt: skip
    return {"passed": ok, **out}


def check_memory() -> dict[str, Any]:
    import cascade_rt
    from cascade_rt.runtime.estimate import estimate_memory

    out, ok = {}, True
    size = 1024 if DEVICE == "cuda" else 256
    for preset, mode in ((LITE, "resident"), (LITE, "sequential"), (LITE, "offload"), ("edge", None)):
        empty_cache()
        if DEVICE != "cuda" and preset == "edge":
            preset, mode = "tiny", "sequential"
        pipe = cascade_rt.load_pipeline(random_weights=True, preset=preset, memory=mode, device=DEVICE)
        t0 = time.perf_counter()
        res = pipe("a cat", height=size, width=size, seed=0)
        wall = time.perf_counter() - t0
        mode = pipe.memory.mode
        est = estimate_memory(height=1024, width=1024, mode=mode)
        peak = max((v for v in res.peak_memory.values() if v is not None), default=0)
        row = {"mode": mode, "wall_s": wall, "peak_gib": peak / GiB,
               "peaks_gib": {k: (v or 0) / GiB for k, v in res.peak_memory.items()},
               "estimate_peak_allocated_gib": est.peak_allocated / GiB, "estimate_peak_device_gib": est.peak_device / GiB,
               "measured_over_estimate": peak / est.peak_allocated, "size": size}  # fmt: skip
        if preset == "edge" and DEVICE == "cuda":
            row["fits_8gib"] = peak + (est.overhead_bytes) <= 8 * GiB
            ok &= row["fits_8gib"]
        out[f"{preset}-{mode}"] = row
        del pipe, res
    return {"passed": ok, **out}


def check_throughput() -> dict[str, Any]:
    import cascade_rt
    from cascade_rt.runtime.throughput import ThroughputRunner

    pipe = cascade_rt.load_pipeline(random_weights=True, preset=LITE, device=DEVICE)
    prompts = [f"prompt {i}" for i in range(8)]
    kw = dict(height=1024, width=1024, seed=0) if DEVICE == "cuda" else dict(height=256, width=256, seed=0)
    out, outputs = {}, {}
    for overlap in (False, True):
        runner = ThroughputRunner(pipe, max_batch=2, overlap=overlap)
        runner(prompts[:4], **kw)  # warm-up: captures both batch sizes' graphs
        outputs[overlap] = runner(prompts, **kw)
        out["overlap" if overlap else "sequential"] = dict(runner.last)
    err = max(rel(a.pixels, b.pixels) for a, b in zip(outputs[True], outputs[False]))
    out["speedup"] = out["overlap"]["images_per_s"] / out["sequential"]["images_per_s"]
    return {"passed": err <= 1e-2, "pixels_rel_overlap_vs_sequential": err, **out}


def run_pytest() -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/runtime", "-p", "no:cacheprovider"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return {"passed": res.returncode == 0, "command": " ".join(cmd), "rc": res.returncode, "tail": res.stdout[-3000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="lite", help="comma list of tiny, lite, full")
    parser.add_argument("--only", default=None, help="comma list of checks to run")
    parser.add_argument("--pytest", action="store_true", help="also run `pytest -m gpu tests/runtime`")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device", default="cuda", help="cpu: smoke-run the script itself (tiny models, results "
                        "marked smoke, not GPU evidence)")  # fmt: skip
    args = parser.parse_args()
    global DEVICE, MODE, LITE, LITE_C
    if args.device == "cpu":
        DEVICE, MODE, LITE, LITE_C = "cpu", "static", "tiny", "stage_c_tiny"
        args.presets = "tiny"
    elif not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to check (run this in a GPU session)", file=sys.stderr)
        return 2
    presets = args.presets.split(",")
    checks: dict[str, Callable[[], dict]] = {
        "graphs_equal": lambda: check_graphs_equal(presets), "addresses": check_addresses,
        "backends": check_backends, "step_timing": lambda: check_step_timing(presets),
        "pipeline": lambda: check_pipeline(presets), "memory": check_memory, "throughput": check_throughput,
    }  # fmt: skip
    if args.pytest:
        checks["pytest"] = run_pytest
    only = set(args.only.split(",")) if args.only else set(checks)
    result: dict[str, Any] = {"environment": {**environment(args), "smoke_run_on_cpu": DEVICE != "cuda"},
                              "checks": {}}
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, fn in checks.items():
        if name not in only:
            continue
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                result["checks"][name] = fn()
        except Exception as exc:  # record and go on: one failing check must not hide the others
            result["checks"][name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
        result["checks"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {'ok' if result['checks'][name]['passed'] else 'FAILED'} ({result['checks'][name]['seconds']} s)")
    env = result["environment"]
    gpu = env.get("gpu", "gpu").replace(" ", "_")
    args.out.mkdir(parents=True, exist_ok=True)
    if DEVICE != "cuda":
        gpu = "cpu-smoke"
    path = args.out / f"runtime-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}-{env['git_sha'][:7] or 'nogit'}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")
    return 0 if all(c["passed"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
