"""Compile every Triton kernel for real GPU targets on this machine (no GPU needed) and record the table.

    .venv/bin/python -m cascade_rt.benchmarks.kernel_compile_report                 # full matrix, 5 targets
    .venv/bin/python -m cascade_rt.benchmarks.kernel_compile_report --ci            # what CI compiles
    .venv/bin/python -m cascade_rt.benchmarks.kernel_compile_report --targets 90 --docs

Every config each kernel's prune keeps at the released models' launch shapes (1024², model batch 2, bf16 and
fp32; traced by ``cascade_rt.kernels.gpu_compile``) is compiled for each target with Triton's own pipeline and
bundled ptxas; ``--ci`` compiles what tests/kernels/test_gpu_compile.py does (every kept config for sm_90, one
per kernel, dtype and specialisation for the others). Writes ``benchmarks/results/kernel-compile.json`` (one
row per compile, with versions) and ``kernel-compile.md`` (per kernel and target: launch shapes, configs kept,
registers, spills, shared memory); ``--docs`` also replaces the table in docs/kernels.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "kernels.md"
BEGIN, END = "<!-- kernel-compile table: begin -->", "<!-- kernel-compile table: end -->"


def versions() -> dict:
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas, get_ptxas_version

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    ptxas = get_ptxas_version(90).strip().splitlines()[-1]
    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "triton": triton.__version__,
            "torch": torch.__version__, "ptxas": ptxas, "ptxas_path": os.path.basename(get_ptxas(90).path),
            "git_sha": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "python": sys.version.split()[0]}


def table(rows: list[dict]) -> str:
    """Markdown: one line per (kernel, target)."""
    from cascade_rt.kernels.gpu_compile import TARGETS

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["target"]), []).append(r)
    order = {k: i for i, k in enumerate(TARGETS)}
    lines = ["| kernel | target | launch shapes | configs compiled | registers | spilling configs (max spill B) | "
             "shared memory max | over the target's shared memory | compile errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (kernel, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        ok = [r for r in rs if r["ok"]]
        shapes = {s for r in rs for s in r["shapes"]}
        spills = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
        regs = f"{min(r['registers'] for r in ok)}–{max(r['registers'] for r in ok)}" if ok else "–"
        limit = TARGETS[target][1]
        over = sum(r["shared"] > limit for r in ok)
        worst = max((r["spill_stores"] for r in spills), default=0)
        lines.append(f"| {kernel} | sm_{target} | {len(shapes)} | {len(rs)} | {regs} | "
                     f"{len(spills)}{f' ({worst})' if spills else ''} | "
                     f"{max((r['shared'] for r in ok), default=0) / 1024:.1f} KiB | {over} | {len(rs) - len(ok)} |")
    return "\n".join(lines)


def markdown(meta: dict, rows: list[dict]) -> str:
    v = meta["versions"]
    scope = ("every kept config for sm_90; one config per kernel, dtype and specialisation for the other targets"
             if meta["ci"] else "every kept config for every target")
    return (f"Compiled on the CPU ({scope}) at the released launch shapes (1024², model batch 2, bf16 and fp32), "
            f"{len(rows)} compiles in {meta['seconds']:.0f} s with {meta['workers']} workers ({meta['triton_cache']} "
            f"Triton cache); Triton {v['triton']}, "
            f"torch {v['torch']}, ptxas {v['ptxas']}, git {v['git_sha'][:10]}{' (dirty)' if v['git_dirty'] else ''}, "
            f"{v['created']}. Command: `{meta['command']}`.\n\n" + table(rows) + "\n")


def update_docs(md: str) -> None:
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOCS} has no {BEGIN} ... {END} markers to put the table between")
    head, rest = text.split(BEGIN, 1)
    DOCS.write_text(head + BEGIN + "\n" + md + END + rest.split(END, 1)[1])


def main(argv=None) -> int:
    from cascade_rt.kernels import gpu_compile as gc

    p = argparse.ArgumentParser(prog="kernel_compile_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(str(t) for t in gc.TARGETS),
                   help="compute capabilities, comma separated (default: %(default)s)")
    p.add_argument("--ci", action="store_true", help="only what CI compiles (all configs for sm_90 only)")
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--cache-dir", default=None, help="Triton cache (default: a folder under the temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--docs", action="store_true", help="also put the table into docs/kernels.md")
    args = p.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(","))
    unknown = [t for t in targets if t not in gc.TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(map(str, gc.TARGETS))}")
    cache = args.cache_dir or gc.default_cache_dir()
    warm = os.path.isdir(cache) and bool(os.listdir(cache))
    t0 = time.time()
    if args.ci:
        jobs = gc.compile_jobs(targets_all=tuple(t for t in targets if t == 90),
                               targets_one=tuple(t for t in targets if t != 90))
    else:
        jobs = gc.compile_jobs(targets_all=targets, targets_one=())
    print(f"{len(jobs)} compiles for {', '.join(f'sm_{t}' for t in targets)}", flush=True)
    results = gc.run_jobs(jobs, workers=args.workers, cache_dir=cache)
    rows = [{"kernel": j.kernel, "target": j.target, "dtype": next(iter(j.signature.values())), "config": j.config,
             "shapes": j.shapes, **{k: v for k, v in r.items() if k != "key"}}
            for j, r in zip(jobs, results)]
    command = " ".join(["kernel_compile_report", *(argv or sys.argv[1:])])
    meta = {"schema": "cascade-rt-kernel-compile/1", "command": command,
            "ci": args.ci, "targets": targets, "workers": args.workers, "seconds": time.time() - t0,
            "triton_cache": "warm" if warm else "cold",
            "versions": versions(), "all_spilling_shapes_sm90": gc.all_spilling_shapes(jobs, results, 90)
            if not args.ci or 90 in targets else None}
    args.out.mkdir(parents=True, exist_ok=True)
    shape_ids = sorted({s for r in rows for s in r["shapes"]})
    index = {s: i for i, s in enumerate(shape_ids)}
    slim = [{**r, "shapes": [index[s] for s in r["shapes"]]} for r in rows]  # indices into "launch_shapes"
    (args.out / "kernel-compile.json").write_text(  # one compile per line
        json.dumps({**meta, "launch_shapes": shape_ids, "compiles": "ROWS"}, indent=1, default=str).replace(
            '"ROWS"', "[\n" + ",\n".join(json.dumps(r, default=str) for r in slim) + "\n]"))
    md = markdown(meta, rows)
    (args.out / "kernel-compile.md").write_text("# Triton kernels compiled for GPU targets\n\n" + md)
    if args.docs:
        update_docs(md)
    print(md)
    failed = sum(not r["ok"] for r in rows)
    return 1 if failed or meta["all_spilling_shapes_sm90"] else 0


if __name__ == "__main__":
    sys.exit(main())
