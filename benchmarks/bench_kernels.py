"""GPU benchmark of the Triton kernels (cascade_rt.kernels) against torch eager and torch.compile of their
references, on the real Stage C / B / A shapes, plus the Stage C / B step time of the triton backend vs eager.

    .venv/bin/python -m cascade_rt.benchmarks.bench_kernels [--ops attention,gelu_grn] [--no-stages] [--graphs]

Per kernel case: median µs (triton.testing.do_bench, L2 flushed between runs), effective GB/s (= unique bytes
read + written once, the algorithmic minimum; see `CASES`), % of the DRAM bandwidth measured in the same run by
a 1 GiB device-to-device copy, and TFLOP/s for attention. Stage step: median ms of `model.denoise` at 1024²
(full-size models, random weights, bf16), eager vs triton backend, optionally both inside CUDA graphs.
Writes benchmarks/results/kernels-<stamp>-<sha>.json and appends to benchmarks/results/kernels.csv (GPU name,
versions, git SHA on every row). Needs a CUDA GPU: refuses to run without one.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import inspect
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from cascade_rt.models.presets import get_preset
from cascade_rt.stages import stage_b_latent_hw, stage_c_latent_hw

log = logging.getLogger("cascade_rt.bench_kernels")
RESULTS = Path(__file__).resolve().parent / "results"
OPS = ("dwconv_layernorm", "gelu_grn", "modulation", "attention", "layernorm_modulate", "dwconv_replicate_residual")


@dataclass(frozen=True)
class KernelCase:
    op: str
    stage: str  # where the shape occurs, e.g. "c", "b-l2"
    batch: int
    h: int
    w: int
    c: int  # the op's channel count (4C for gelu_grn)
    heads: int = 0
    cond_tokens: int = 0

    @property
    def label(self) -> str:
        extra = f" heads={self.heads} S={self.cond_tokens}" if self.op == "attention" else ""
        return f"{self.op} stage_{self.stage} {self.batch}x{self.h}x{self.w}x{self.c}{extra}"


def _ctor(name: str) -> dict:
    """The constructor arguments of a preset: the class defaults overridden by the preset's kwargs."""
    preset = get_preset(name)
    sig = inspect.signature(preset.cls.__init__)
    return {**{k: p.default for k, p in sig.parameters.items() if k != "self"}, **preset.kwargs}


def kernel_cases(height: int = 1024, width: int = 1024, batch: int = 2) -> list[KernelCase]:
    """Every (op, shape) pair of one Stage C 3.6B / Stage B 3B step and a Stage A decode at ``height x width``;
    ``batch`` 2 = one prompt with CFG."""
    cases: list[KernelCase] = []
    sc, sb = _ctor("stage_c"), _ctor("stage_b")
    hc, wc = stage_c_latent_hw(height, width)
    levels = [("c", hc, wc, c, n, 77 + 2 * sc["c_clip_seq"]) for c, n in zip(sc["c_hidden"], sc["nhead"])][:1]
    hb, wb = stage_b_latent_hw(height, width)
    hb, wb = hb // sb["patch_size"], wb // sb["patch_size"]
    for i, (c, n) in enumerate(zip(sb["c_hidden"], sb["nhead"])):
        levels.append((f"b-l{i}", hb >> i, wb >> i, c, n, sb["c_clip_seq"]))
    for stage, h, w, c, heads, s in levels:
        cases += [KernelCase("dwconv_layernorm", stage, batch, h, w, c),
                  KernelCase("gelu_grn", stage, batch, h, w, 4 * c),
                  KernelCase("modulation", stage, batch, h, w, c)]
        if heads > 0:
            cases.append(KernelCase("attention", stage, batch, h, w, c, heads, s))
    sa = _ctor("stage_a")
    for i, c in enumerate((sa["c_hidden"], sa["c_hidden"] // 2)):  # decode: 256² at 384, then 512² at 192
        ha, wa = stage_b_latent_hw(height, width)
        cases += [KernelCase(op, f"a-l{i}", 1, ha << i, wa << i, c)
                  for op in ("layernorm_modulate", "dwconv_replicate_residual")]
    return cases


def _inputs(case: KernelCase, device, dtype):
    """(triton fn, reference fn, args, kwargs, unique bytes moved, flops)."""
    from cascade_rt.kernels import attention, dwconv_layernorm, gelu_grn, modulation, stage_a_block

    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    b, h, w, c = case.batch, case.h, case.w, case.c
    act = b * h * w * c * torch.finfo(dtype).bits // 8
    if case.op == "dwconv_layernorm":
        return (dwconv_layernorm.dwconv_layernorm, dwconv_layernorm.dwconv_layernorm_ref,
                (rnd(b, h, w, c), rnd(c, 1, 3, 3), rnd(c)), {}, 2 * act, 0)
    if case.op == "gelu_grn":
        return (gelu_grn.gelu_grn, gelu_grn.gelu_grn_ref,
                (rnd(b, h, w, c), rnd(1, 1, 1, c), rnd(1, 1, 1, c)), {}, 2 * act, 0)
    if case.op == "modulation":  # the fused form used between blocks: residual + modulate + LayerNorm
        ab = rnd(b, 2 * c)
        args = (rnd(b, h, w, c), ab[:, :c], ab[:, c:], rnd(b, h, w, c))
        return modulation.modulation, modulation.modulation_ref, args, {"return_norm": True}, 4 * act, 0
    if case.op == "attention":
        n, s, d = h * w, case.cond_tokens, c // case.heads
        kv = rnd(b, s, 2 * c)
        args = (rnd(b, n, 3 * c), case.heads, kv[..., :c], kv[..., c:])
        nbytes = (4 * n + 2 * s) * b * c * torch.finfo(dtype).bits // 8
        return attention.attention, attention.attention_ref, args, {}, nbytes, 4 * b * case.heads * n * (n + s) * d
    if case.op == "layernorm_modulate":
        return (stage_a_block.layernorm_modulate, stage_a_block.layernorm_modulate_ref,
                (rnd(b, h, w, c), rnd(6), 0), {}, 2 * act, 0)
    if case.op == "dwconv_replicate_residual":
        args = (rnd(b, h, w, c), rnd(b, h, w, c), rnd(c, 1, 3, 3), rnd(c), rnd(6), 2)
        return (stage_a_block.dwconv_replicate_residual, stage_a_block.dwconv_replicate_residual_ref,
                args, {}, 3 * act, 0)
    raise ValueError(f"unknown op {case.op!r}; choose from {', '.join(OPS)}")


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Achievable DRAM bandwidth (GB/s): a device-to-device copy of ``nbytes`` (read + write counted)."""
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=200, return_mode="median")
    return 2 * nbytes / ms / 1e6


def bench_kernel(case: KernelCase, device, dtype, bandwidth: float, use_compile: bool) -> list[dict]:
    from triton.testing import do_bench

    fn, ref, args, kwargs, nbytes, flops = _inputs(case, device, dtype)
    impls = {"triton": fn, "eager": ref}
    if use_compile:
        impls["compile"] = torch.compile(ref, dynamic=False)
    rows = []
    for impl, f in impls.items():
        ms = do_bench(lambda: f(*args, **kwargs), warmup=25, rep=200, return_mode="median")
        gbps = nbytes / ms / 1e6
        rows.append(dict(op=case.op, case=case.label, stage=case.stage, impl=impl, dtype=str(dtype).split(".")[-1],
                         us=ms * 1e3, gbps=gbps, pct_bw=100 * gbps / bandwidth,
                         tflops=flops / ms / 1e9 if flops else None))
    base = {r["impl"]: r["us"] for r in rows}
    for r in rows:
        r["speedup_vs_eager"] = base["eager"] / r["us"]
    return rows


def _stage_inputs(stage: str, model, batch: int, height: int, width: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    r = torch.full((batch,), 0.5, device=device)
    if stage == "c":
        x = rnd(batch, 16, *stage_c_latent_hw(height, width))
        cond = model.prepare_conditioning(rnd(batch, 77, model.clip_txt_mapper.in_features),
                                          rnd(batch, 1, model.clip_txt_pooled_mapper.in_features),
                                          rnd(batch, 1, model.clip_img_mapper.in_features))
    else:
        x = rnd(batch, 4, *stage_b_latent_hw(height, width))
        cond = model.prepare_conditioning(rnd(batch, 16, *stage_c_latent_hw(height, width)),
                                          rnd(batch, 1, model.clip_mapper.in_features), latent_hw=x.shape[-2:])
    return x, r, cond


def _time_step(step, runs: int, graphs: bool) -> float:
    """Median ms of ``step()``; with ``graphs`` the step is captured once in a CUDA graph and replayed."""
    from cascade_rt.kernels.backend import warmup

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs and weights were made on the current stream
    with torch.cuda.stream(side):
        warmup(step, runs=3)  # autotuning, weight caches, cuBLAS handles: all before any capture
    torch.cuda.current_stream().wait_stream(side)
    if graphs:
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            step()
        step = graph.replay
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.no_grad():
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_stages(device, dtype, batch: int, height: int, width: int, runs: int, graphs: bool) -> list[dict]:
    from cascade_rt.kernels.backend import apply_triton_kernels
    from cascade_rt.models import build_model

    rows = []
    for stage, preset in (("c", "stage_c"), ("b", "stage_b")):
        model = build_model(preset, device=device, dtype=dtype, seed=0)
        x, r, cond = _stage_inputs(stage, model, batch, height, width, device, dtype)
        step = functools.partial(model.denoise, x, r, **cond)
        modes = [False, True] if graphs else [False]
        for backend in ("eager", "triton"):
            if backend == "triton":
                apply_triton_kernels(model)
            for g in modes:
                ms = _time_step(step, runs, g)
                rows.append(dict(stage=stage, preset=preset, backend=backend, cuda_graph=g, batch=batch,
                                 height=height, width=width, dtype=str(dtype).split(".")[-1], step_ms=ms))
        del model, cond
        torch.cuda.empty_cache()
    return rows


def environment() -> dict:
    import triton

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=RESULTS.parent.parent, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except Exception:
            return "unknown"

    prop = torch.cuda.get_device_properties(0)
    return dict(gpu=torch.cuda.get_device_name(0), sms=prop.multi_processor_count,
                gpu_mem_gib=round(prop.total_memory / 2**30),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                git_sha=git("rev-parse", "HEAD"),
                git_dirty=bool(git("status", "--porcelain", "--untracked-files=no")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of: " + ", ".join(OPS))
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2, help="2 = one prompt with CFG (default)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-stages", action="store_true", help="skip the full Stage C / B step timings")
    p.add_argument("--graphs", action="store_true", help="also time the steps captured in CUDA graphs")
    p.add_argument("--runs", type=int, default=20, help="timed step runs (median)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        p.error(f"unknown op(s) {', '.join(bad)}; choose from {', '.join(OPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("bench_kernels needs a CUDA GPU (H100/H200 for the recorded numbers); none is visible here. "
                  "Kernel correctness on a CPU: TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/kernels")
        return 2
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    env = environment()
    bandwidth = copy_bandwidth(device)
    log.info("%s: measured copy bandwidth %.0f GB/s", env["gpu"], bandwidth)
    rows = []
    for case in kernel_cases(args.height, args.width, args.batch):
        if case.op in args.ops:
            rows += bench_kernel(case, device, dtype, bandwidth, not args.no_compile)
            for r in rows[-(2 if args.no_compile else 3):]:
                log.info("%-60s %-8s %9.1f us %7.0f GB/s %5.1f%% BW  x%.2f vs eager", r["case"], r["impl"], r["us"],
                         r["gbps"], r["pct_bw"], r["speedup_vs_eager"])
    stages = ([] if args.no_stages
              else bench_stages(device, dtype, args.batch, args.height, args.width, args.runs, args.graphs))
    for s in stages:
        log.info("stage %s %-6s graph=%-5s %8.2f ms/step", s["stage"], s["backend"], s["cuda_graph"], s["step_ms"])
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = dict(schema="cascade-rt-bench-kernels/1", created=created,
                  command=" ".join(["bench_kernels", *(argv or sys.argv[1:])]),
                  environment=env, copy_bandwidth_gbps=bandwidth, kernels=rows, stages=stages)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = created.replace(":", "").replace("-", "")[:15]
    (args.out / f"kernels-{stamp}-{env['git_sha'][:7]}.json").write_text(json.dumps(result, indent=1))
    csv_path = args.out / "kernels.csv"
    fields = ["created", "gpu", "torch", "triton", "cuda", "git_sha", "op", "case", "impl", "dtype", "us", "gbps",
              "pct_bw", "tflops", "speedup_vs_eager"]
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**r, "created": created,
                             **{k: env[k] for k in ("gpu", "torch", "triton", "cuda", "git_sha")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
