"""The GPU check: everything the project wants to know from one H100/H200, in priority order, under a time budget.

    bash scripts/gpu_check.sh                     # on a CUDA machine; default budget 480 s wall, imports included
    bash scripts/gpu_check.sh --dry-run           # the same code path on the CPU (tiny presets, 256², fp32)

Parts, in order (each result is appended to ``results.jsonl`` and ``summary.md`` is rewritten the moment it exists,
so a kill at any point keeps everything finished so far; a part that no longer fits the budget is recorded as
"not run"):

1. ``tests``   ``pytest -m gpu``: each kernel against its reference on the GPU, CUDA-graph replay equal to eager,
               memory modes (tests/kernels, tests/runtime, tests/test_sampling.py).
2. ``steps``   one denoiser step of Stage C (3.6B) and Stage B (1.5B) at 1024², CFG batch 2, bf16, random weights
               built on the GPU: eager, triton, compile, each without and with a CUDA graph, and diffusers'
               ``StableCascadeUNet`` eager on the same weights (when diffusers imports); relative L2 error against
               our eager step beside each time; the compute floor = FLOPs of the step / measured bf16 matmul rate.
3. ``e2e``     ``load_pipeline`` at 1024², batch 1: eager without graphs, and the best combination of part 2 (the
               fastest of our backends per stage, with CUDA graphs when they won).
4. ``kernels`` per-kernel µs at the released shapes and % of the DRAM bandwidth a device copy reaches.

Outputs in ``--out`` (default ``benchmarks/results/gpu-check-<UTC stamp>-<device>-<git sha>``; a dry run:
``out/gpu-check/<UTC stamp>-dry-run``): ``results.jsonl`` (one JSON object per line: the
environment first, then one per result), ``summary.md`` (the README's GPU table, with device, driver, versions and
the command), ``pytest-gpu.log``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "steps", "e2e", "kernels")
# (stage, model preset) per mode; the dry run uses the tiny presets on the CPU
STAGE_MODELS = {"gpu": (("c", "stage_c"), ("b", "stage_b")), "dry": (("c", "stage_c_tiny"), ("b", "stage_b_tiny"))}
COMBOS = (("eager", False), ("eager", True), ("triton", False), ("triton", True), ("diffusers", False),
          ("compile", False), ("compile", True))
# seconds a part or an item is expected to need at least on an H100 (it is not started with less time left)
COST_S = {"tests": 60, "stage_build": 20, "combo": 10, "compile": 90, "e2e": 60, "kernels": 30}


class Recorder:
    """Appends each result to results.jsonl (flushed and synced) and rewrites summary.md after each one."""

    def __init__(self, out: Path, budget_s: float, t0: float, env: dict) -> None:
        self.out, self.budget_s, self.t0, self.env = out, budget_s, t0, env
        out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self._jsonl = (out / "results.jsonl").open("a")
        self._write({"kind": "environment", **env})
        self._summary()

    def remaining(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def fits(self, seconds: float) -> bool:
        return self.remaining() >= seconds

    def record(self, part: str, name: str, status: str = "ok", **fields: Any) -> dict:
        row = {"part": part, "name": name, "status": status, "t_s": round(time.time() - self.t0, 1), **fields}
        self.rows.append(row)
        self._write(row)
        self._summary()
        shown = {k: v for k, v in fields.items() if k in ("ms", "rel_l2_vs_eager", "reason", "error", "passed")}
        print(f"[{row['t_s']:6.1f} s] {part}/{name}: {status} {shown}", flush=True)
        return row

    def not_run(self, part: str, name: str, need_s: float) -> dict:
        return self.record(part, name, "not run", reason=f"the time budget ({self.budget_s:.0f} s) was used up: "
                           f"{self.remaining():.0f} s left, about {need_s:.0f} s needed")

    def _write(self, obj: dict) -> None:
        self._jsonl.write(json.dumps(obj, default=_json_default) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())

    def _summary(self) -> None:
        tmp = self.out / "summary.md.tmp"
        tmp.write_text(summary_markdown(self.env, self.rows))
        tmp.replace(self.out / "summary.md")


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


def _fmt(v, spec=".3g") -> str:
    return "" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def summary_markdown(env: dict, rows: list[dict]) -> str:
    """The summary: environment, then one table per part (the README's GPU table is the ``steps`` one)."""
    dry = " (dry run on the CPU: tiny presets, not a GPU measurement)" if env.get("dry_run") else ""
    lines = ["# GPU check" + dry,
             "", f"`{env.get('command', '')}`", "",
             f"device: {env.get('device')} · driver {env.get('driver')} · torch {env.get('torch')} · triton "
             f"{env.get('triton')} · CUDA {env.get('cuda')} · diffusers {env.get('diffusers')} · git "
             f"{env.get('git_sha', '')[:10]}{' (dirty)' if env.get('git_dirty') else ''} · {env.get('created')}", ""]
    by_part: dict[str, list[dict]] = {}
    for r in rows:
        by_part.setdefault(r["part"], []).append(r)
    if "tests" in by_part:
        lines += ["## GPU tests (`pytest -m gpu`)", "", "| run | status | passed | failed | skipped | s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['status']} | {_fmt(r.get('passed'))} | {_fmt(r.get('failed'))} | "
                  f"{_fmt(r.get('skipped'))} | {_fmt(r.get('seconds'), '.0f')} |" for r in by_part["tests"]]
        lines.append("")
    if "steps" in by_part:
        lines += ["## One denoiser step (batch 2 = one prompt with CFG)", "",
                  "| stage | combination | ms / step | × vs eager | rel. L2 vs eager | floor ms | % of floor | "
                  "first call s | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in by_part["steps"]:
            if r["name"].endswith("/model"):
                continue
            lines.append(f"| {r.get('stage', '')} {r.get('preset', '')} | {r.get('combo', r['name'])} | "
                         f"{_fmt(r.get('ms'), '.2f')} | {_fmt(r.get('speedup_vs_eager'), '.2f')} | "
                         f"{_fmt(r.get('rel_l2_vs_eager'), '.2e')} | {_fmt(r.get('floor_ms'), '.2f')} | "
                         f"{_fmt(r.get('pct_of_floor'), '.0f')} | {_fmt(r.get('first_call_s'), '.1f')} | "
                         f"{r['status']}{': ' + r['reason'] if r.get('reason') else ''}"
                         f"{': ' + r['error'][:120] if r.get('error') else ''} |")
        floors = [r for r in by_part["steps"] if r["name"].endswith("/model")]
        for r in floors:
            lines.append(f"\n{r.get('stage')} {r.get('preset')}: {_fmt(r.get('tflop_per_step'), '.3g')} TFLOP per "
                         "step, "
                         f"matmul peak {_fmt(r.get('matmul_tflops'), '.3g')} TFLOP/s ({r.get('matmul_dtype')}), "
                         f"built in {_fmt(r.get('build_s'), '.1f')} s")
        lines.append("")
    if "e2e" in by_part:
        lines += ["## End to end (load_pipeline, batch 1)", "", "| run | backends | graphs | s / image | × vs eager | "
                  "rel. L2 of pixels vs eager | status |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r.get('backends', '')} | {r.get('graphs', '')} | "
                  f"{_fmt(r.get('seconds'), '.2f')} | "
                  f"{_fmt(r.get('speedup_vs_eager'), '.2f')} | {_fmt(r.get('rel_l2_vs_eager'), '.2e')} | {r['status']}"
                  f"{': ' + (r.get('reason') or r.get('error') or '')[:120] if r['status'] != 'ok' else ''} |"
                  for r in by_part["e2e"]]
        lines.append("")
    if "kernels" in by_part:
        lines += ["## Kernels", "", "| case | dtype | µs | GB/s | % of copy bandwidth | µs eager | status |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r.get('dtype', '')} | {_fmt(r.get('us'), '.1f')} | {_fmt(r.get('gbps'), '.0f')} | "
                  f"{_fmt(r.get('pct_bw'), '.0f')} | {_fmt(r.get('eager_us'), '.1f')} | {r['status']}"
                  f"{': ' + (r.get('reason') or r.get('error') or '')[:120] if r['status'] != 'ok' else ''} |"
                  for r in by_part["kernels"]]
        lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- timing, graphs
class Ctx:
    def __init__(self, dry: bool) -> None:
        import torch

        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.res = 256 if dry else 1024
        self.runs = 1 if dry else 10

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def time_ms(ctx: Ctx, fn: Callable[[], Any], runs: int) -> tuple[float, float, Any]:
    """(median ms, p90 ms, last output) over ``runs`` calls; CUDA events on a GPU, perf_counter on the CPU."""
    import torch

    times, out = [], None
    for _ in range(runs):
        if ctx.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(0.9 * len(times)))], out


def graphed(ctx: Ctx, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph (after warm-up on a side stream), returned as its replay; on the CPU (dry
    run) ``fn`` itself. The replay returns the captured output tensor."""
    import torch

    if ctx.device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    replay.graph = graph  # keeps it alive
    return replay


def rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def environment(args, dry: bool) -> dict:
    import torch

    def run(cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=15, check=True).stdout.strip()
        except Exception:
            return ""

    env = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": os.environ.get("GPU_CHECK_COMMAND") or " ".join(["benchmarks/gpu_check.py", *sys.argv[1:]]),
           "dry_run": dry, "budget_s": args.budget_s, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "git_sha": run(["git", "rev-parse", "HEAD"]),
           "git_dirty": bool(run(["git", "status", "--porcelain", "--untracked-files=no"]))}
    from importlib import metadata

    for mod, dist in (("triton", "triton"), ("diffusers", "diffusers"), ("open_clip", "open_clip_torch")):
        try:  # the installed version, without importing it (diffusers takes seconds to import)
            env[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[mod] = "not installed"
    if torch.cuda.is_available() and not dry:
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   compute_capability=f"{p.major}.{p.minor}",
                   driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "unknown")
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", driver="none")
    return env


# ------------------------------------------------------------------------------------------------ parts
def part_tests(rec: Recorder, ctx: Ctx, args) -> None:
    if not rec.fits(COST_S["tests"]):
        rec.not_run("tests", "pytest -m gpu", COST_S["tests"])
        return
    timeout = max(30.0, min(args.tests_cap_s, rec.remaining() - 0.6 * rec.budget_s)) if not ctx.dry else 300.0
    targets = ["tests/kernels", "tests/runtime", "tests/test_sampling.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfE", *targets]
    if ctx.dry:  # no GPU: every gpu test would be skipped; collecting them checks that they import
        cmd.append("--collect-only")
    env = dict(os.environ)
    if not ctx.dry:
        env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    log = rec.out / "pytest-gpu.log"
    with log.open("w") as f:  # streamed: a kill mid-run keeps what pytest printed so far
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
            f.write(f"\n[gpu_check] stopped after {timeout:.0f} s (the tests' share of the budget)\n")
    text = log.read_text()
    counts = _pytest_counts(text)
    status = "ok" if rc == 0 or (ctx.dry and rc == 5) else ("timeout" if rc == "timeout" else "failed")
    failures = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))][:20]
    rec.record("tests", "pytest -m gpu" + (" --collect-only" if ctx.dry else ""), status, rc=rc,
               seconds=time.time() - t0, failures=failures, log=log.name, **counts)


def _pytest_counts(text: str) -> dict:
    import re

    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)\b", text):
        counts[what.rstrip("s")] = int(n)
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", text)  # "13/500 tests collected (487 deselected)"
    if collected:
        counts["collected"] = int(collected.group(1))
    return counts


def _stage_inputs(ctx: Ctx, stage: str, model, batch: int):
    """(x, r, raw conditioning args, prepare kwargs): seeded random inputs at the run's resolution."""
    import torch

    from cascade_rt.stages import latent_shapes

    g = torch.Generator(device=ctx.device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=ctx.device, dtype=ctx.dtype, generator=g)  # noqa: E731
    shapes = latent_shapes(batch, ctx.res, ctx.res)
    r = torch.full((batch,), 0.5, device=ctx.device)
    if stage == "c":
        raw = (rnd(batch, 77, model.clip_txt_mapper.in_features),
               rnd(batch, 1, model.clip_txt_pooled_mapper.in_features),
               rnd(batch, 1, model.clip_img_mapper.in_features))
        return rnd(*shapes["c"]), r, raw, {}
    raw = (rnd(*shapes["c"]), rnd(batch, 1, model.clip_mapper.in_features))
    return rnd(*shapes["b"]), r, raw, {"latent_hw": shapes["b"][-2:]}


def build_on_device(ctx: Ctx, preset: str):
    """The preset's model with seeded random weights created on the device in the run's dtype: the modules
    initialise under that default dtype, so a 3.6B model never exists in fp32 or on the CPU."""
    import torch

    from cascade_rt.models import build_model

    previous = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        return build_model(preset, device=ctx.device, dtype=ctx.dtype, seed=0)
    finally:
        torch.set_default_dtype(previous)


def part_steps(rec: Recorder, ctx: Ctx, args) -> dict:
    """Per stage: {combo label: ms} of the combinations that ran (part 3 picks the best from it)."""
    import torch

    from cascade_rt.benchmarks import roofline
    from cascade_rt.errors import BackendUnavailable
    from cascade_rt.runtime.backends import BuildContext, build_runner

    best: dict[str, dict] = {}
    try:
        peak = roofline.matmul_tflops(ctx.device)
    except Exception as exc:
        peak = {"tflops": float("nan"), "dtype": "?", "error": str(exc)}
    batch = 2
    deferred = []  # compile rows run after both stages' other rows (they cost the most)
    for stage, preset in STAGE_MODELS["dry" if ctx.dry else "gpu"]:
        need = COST_S["stage_build"] + 2 * COST_S["combo"]
        if not rec.fits(need):
            rec.not_run("steps", f"{stage}/model", need)
            continue
        t0 = time.time()
        model = build_on_device(ctx, preset)
        ctx.sync()
        build_s = time.time() - t0
        pooled_preset = "stage_b_tiny" if ctx.dry else "stage_b"
        cost = roofline._stage_cost(stage, preset, pooled_preset, ctx.res, ctx.res, ctx.dtype)
        flops = cost["flops_per_sample"] * batch
        floor_ms = flops / (peak["tflops"] * 1e12) * 1e3 if peak["tflops"] > 0 else None
        rec.record("steps", f"{stage}/model", stage=stage, preset=preset, build_s=build_s, params=cost["params"],
                   tflop_per_step=flops / 1e12, matmul_tflops=peak["tflops"], matmul_dtype=peak.get("dtype"),
                   floor_ms=floor_ms, batch=batch, res=ctx.res, dtype=str(ctx.dtype)[6:])
        x, r, raw, prep_kw = _stage_inputs(ctx, stage, model, batch)
        state = {"ref": None, "eager_ms": None}
        best[stage] = {}

        def run_combo(backend: str, graphs: bool, stage=stage, preset=preset, model=model, x=x, r=r, raw=raw,
                      prep_kw=prep_kw, floor_ms=floor_ms, state=state):
            label = f"{backend}{'+graphs' if graphs else ''}"
            name = f"{stage}/{label}"
            need = COST_S["compile" if backend == "compile" else "combo"]
            if not rec.fits(need):
                rec.not_run("steps", name, need)
                return
            base = dict(stage=stage, preset=preset, combo=label, backend=backend, graphs=graphs, floor_ms=floor_ms)
            if backend == "compile" and ctx.dry:
                rec.record("steps", name, "skipped", **base, reason="dry run: Inductor's C++ build takes minutes on a "
                           "CPU; the GPU run builds it")
                return
            try:
                if ctx.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                if backend == "diffusers":
                    from cascade_rt.benchmarks.peers import build_diffusers

                    runner = build_diffusers(stage, preset, model)
                else:
                    runner = build_runner(stage, model, backend, BuildContext(ctx.device, ctx.dtype))
                cond = runner.prepare_conditioning(*raw, **({} if backend == "diffusers" else prep_kw))
                step = lambda: runner.denoise(x, r, **cond)  # noqa: E731
                with torch.no_grad():
                    step()
                    ctx.sync()
                    first = time.time() - t0
                    if graphs:
                        step = graphed(ctx, step)
                    ms, p90, out = time_ms(ctx, step, ctx.runs)
                out = out.float().clone()
                if state["ref"] is None and label == "eager":
                    state["ref"], state["eager_ms"] = out, ms
                row = dict(base, ms=ms, p90_ms=p90, first_call_s=first, runs=ctx.runs,
                           rel_l2_vs_eager=rel_l2(out, state["ref"]) if state["ref"] is not None else None,
                           speedup_vs_eager=state["eager_ms"] / ms if state["eager_ms"] else None,
                           pct_of_floor=100 * floor_ms / ms if floor_ms else None,
                           peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30
                                            if ctx.device.type == "cuda" else None))
                rec.record("steps", name, **row)
                if backend != "diffusers":
                    best[stage][label] = ms
            except (BackendUnavailable, ImportError) as exc:  # e.g. diffusers not installed: not a failure
                rec.record("steps", name, "skipped", **base, reason=f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                rec.record("steps", name, "failed", **base, error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc()[-3000:])
            finally:
                if backend == "triton":
                    from cascade_rt.kernels.backend import remove_triton_kernels

                    remove_triton_kernels(model)
                ctx.free()

        for backend, graphs in COMBOS:
            if backend == "compile":
                deferred.append((run_combo, backend, graphs))
            else:
                run_combo(backend, graphs)
        del model, x, raw
    for fn, backend, graphs in deferred:  # both stages' compile rows last: they cost the most
        fn(backend, graphs)
    deferred.clear()
    ctx.free()
    return best


def part_e2e(rec: Recorder, ctx: Ctx, args, best: dict) -> None:
    import torch

    import cascade_rt

    preset = "tiny" if ctx.dry else "full"
    choice = {}
    for stage in ("c", "b"):
        ranked = sorted(best.get(stage, {}).items(), key=lambda kv: kv[1])
        choice[stage] = ranked[0][0] if ranked else "eager+graphs"
    backends = {s: lab.split("+")[0] for s, lab in choice.items()}
    graphs = all(lab.endswith("+graphs") for lab in choice.values())
    backends["a"] = "triton" if backends["b"] == "triton" else "eager"
    runs = [("eager", "eager", False), ("best", ",".join(f"{s}={b}" for s, b in backends.items()), graphs)]
    ref, eager_s = None, None
    for name, spec, use_graphs in runs:
        if not rec.fits(COST_S["e2e"]):
            rec.not_run("e2e", name, COST_S["e2e"])
            continue
        try:
            t0 = time.time()
            pipe = cascade_rt.load_pipeline(random_weights=True, preset=preset, device=ctx.device, dtype=ctx.dtype,
                                            backend=spec, cuda_graphs=use_graphs)
            setup_s = time.time() - t0
            kw = dict(height=ctx.res, width=ctx.res, seed=0)
            with torch.no_grad():
                t0 = time.time()
                pipe("a photograph of a cat", **kw)  # warm-up: autotuning, compilation, graph capture
                ctx.sync()
                first_s = time.time() - t0
                t0 = time.time()
                out = pipe("a photograph of a cat", **kw)
                ctx.sync()
                seconds = time.time() - t0
            pixels = out.pixels.float().cpu() if hasattr(out, "pixels") else None
            if name == "eager":
                ref, eager_s = pixels, seconds
            rec.record("e2e", name, backends=spec, graphs=use_graphs, seconds=seconds, setup_s=setup_s,
                       first_call_s=first_s, speedup_vs_eager=eager_s / seconds if eager_s else None,
                       rel_l2_vs_eager=rel_l2(pixels, ref) if ref is not None and pixels is not None else None,
                       timings=getattr(out, "timings", None), preset=preset, res=ctx.res, batch=1)
            del pipe, out
        except ImportError as exc:  # the text encoder needs open_clip: ship its wheel in ./wheels
            rec.record("e2e", name, "skipped", backends=spec, graphs=use_graphs,
                       reason=f"{type(exc).__name__}: {exc} (put its wheel in ./wheels)")
        except Exception as exc:
            rec.record("e2e", name, "failed", backends=spec, graphs=use_graphs, error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc()[-3000:])
        ctx.free()


def _kernel_ms(ctx: Ctx, fn: Callable[[], Any]) -> float:
    """Median ms of one kernel call: triton.testing.do_bench on a GPU (L2 flushed between calls), else a timer."""
    if ctx.device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    return time_ms(ctx, fn, ctx.runs)[0]


def part_kernels(rec: Recorder, ctx: Ctx, args) -> None:
    import torch

    from cascade_rt.benchmarks import bench_kernels as bk

    if not rec.fits(COST_S["kernels"]):
        rec.not_run("kernels", "all", COST_S["kernels"])
        return
    nbytes = (64 << 20) if ctx.dry else (1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(ctx, functools.partial(dst.copy_, src), 5 if ctx.dry else 50)
    bandwidth = 2 * nbytes / ms / 1e6
    src = dst = None
    rec.record("kernels", "copy bandwidth", gbps=bandwidth, bytes=nbytes)
    if ctx.dry:
        cases = [bk.KernelCase(op, "tiny", 1, 3, 4, 64, 2 if op == "attention" else 0, 5 if op == "attention" else 0)
                 for op in bk.OPS]
    else:
        cases = bk.kernel_cases(1024, 1024, batch=2)
    for case in cases:
        if not rec.fits(3):
            rec.not_run("kernels", case.label, 3)
            continue
        try:
            fn, ref, a, kw, nb, flops = bk._inputs(case, ctx.device, ctx.dtype)
            fn(*a, **kw)  # autotuning
            ctx.sync()
            us = _kernel_ms(ctx, functools.partial(fn, *a, **kw)) * 1e3
            eager_us = _kernel_ms(ctx, functools.partial(ref, *a, **kw)) * 1e3
            gbps = nb / (us / 1e6) / 1e9
            rec.record("kernels", case.label, op=case.op, dtype=str(ctx.dtype)[6:], us=us, eager_us=eager_us,
                       gbps=gbps, pct_bw=100 * gbps / bandwidth, tflops=flops / (us / 1e6) / 1e12 if flops else None)
        except Exception as exc:
            rec.record("kernels", case.label, "failed", error=f"{type(exc).__name__}: {exc}")
        ctx.free()


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run the same code path on the CPU with the tiny presets")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", "480")),
                   help="wall-clock budget in seconds, counted from GPU_CHECK_T0 (set by gpu_check.sh) or start")
    p.add_argument("--parts", default=",".join(PARTS), help="comma list, in this order: " + ", ".join(PARTS))
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/"
                   "gpu-check-<UTC stamp>-<device>-<sha>; dry run: out/gpu-check/<UTC stamp>-dry-run)")
    p.add_argument("--tests-cap-s", type=float, default=150, help="most seconds the GPU tests may take")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in PARTS]
    if bad:
        p.error(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    return args


def main(argv=None) -> int:
    t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels through the interpreter
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch. Run it on a CUDA machine, or pass --dry-run to run the "
              "same code path on the CPU with the tiny presets.", file=sys.stderr)
        return 2
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    env = environment(args, args.dry_run)
    if args.out is not None:
        out = args.out
    elif args.dry_run:  # not a measurement: kept out of benchmarks/results
        out = ROOT / "out" / "gpu-check" / f"{stamp}-dry-run"
    else:
        device = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-")
        out = ROOT / "benchmarks" / "results" / f"gpu-check-{stamp}-{device}-{env['git_sha'][:7] or 'nogit'}"
    ctx = Ctx(args.dry_run)
    rec = Recorder(out, args.budget_s, t0, env)
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    best: dict = {}
    for part in args.parts:
        try:
            if part == "tests":
                part_tests(rec, ctx, args)
            elif part == "steps":
                best = part_steps(rec, ctx, args)
            elif part == "e2e":
                part_e2e(rec, ctx, args, best)
            elif part == "kernels":
                part_kernels(rec, ctx, args)
        except Exception as exc:  # one broken part must not cost the others
            rec.record(part, "part", "failed", error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc()[-3000:])
    failed = [r for r in rec.rows if r["status"] in ("failed", "timeout")]
    print(f"\n{rec.out / 'summary.md'}\n")
    print((rec.out / "summary.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
