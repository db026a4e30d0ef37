"""`cascade-rt bench`: every backend against the eager reference and against peers, accuracy beside speed.

With no arguments: the embedded default, the `tiny` workload (random tiny presets, 512², CPU), eager against every
backend and peer that can run here; engines are built once and cached under engines/ (a second run reuses them).
Writes results.json, report.md, timings_*.png and samples_*.png into --out (default out/bench/) and prints the
table. `--record` also copies the run into benchmarks/results/ and appends its rows to benchmarks/results/results.csv.

On a GPU (one command; see benchmarks/README.md):
    cascade-rt bench --workload standard --presets big,lite --batch 1,4 \
        --backends eager,compile,triton,tensorrt,aoti,onnxruntime --graphs --record
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ALL_BACKENDS = ("eager", "compile", "triton", "onnxruntime", "aoti", "tensorrt")
ALL_PEERS = ("diffusers", "diffusers-compile", "max-autotune")
CPU_DEFAULT_SKIPS = {
    "diffusers-compile": (
        "skipped by default on the CPU: Inductor compiles diffusers' two UNets and the VQGAN for minutes on 2 cores "
        "(its C++ build dominates the default benchmark); include it with --peers diffusers,diffusers-compile"
    ),
}
TRITON_CPU_SKIP = (
    "skipped on the CPU: Triton kernels run there only through Triton's interpreter (TRITON_INTERPRET=1), which "
    "executes every program instance in Python, orders of magnitude slower than eager: a correctness tool "
    "(the kernel tests use it), not something to time"
)
RESULTS_DIR = Path("benchmarks/results")  # relative to the repository root, where --record is run
logger = logging.getLogger(__name__)


def _csv(kind):
    return lambda text: tuple(kind(x.strip()) for x in text.split(",") if x.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark backends and peers against the eager reference (default: tiny random CPU run)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workload", default="tiny", help="named workload (benchmarks/workloads.py); default: tiny")
    p.add_argument("--backends", type=_csv(str),
                   help=f"comma list of backends, each on all stages (default: {','.join(ALL_BACKENDS)})")
    p.add_argument("--combo", action="append", default=[],
                   help="a per-stage combination, e.g. c=tensorrt,b=tensorrt,a=triton (repeatable)")
    p.add_argument("--peers", type=_csv(str),
                   help=f"comma list of peers (default: {','.join(ALL_PEERS)}); 'none' for none")
    p.add_argument("--graphs", action="store_true",
                   help="also run each CUDA-graph-safe backend with CUDA graphs (+graphs)")
    p.add_argument("--presets", type=_csv(str),
                   help="preset sets to run: big, lite, chart, tiny (default: the workload's)")
    p.add_argument("--batch", type=_csv(int), help="batch sizes, e.g. 1,4 (default: the workload's)")
    p.add_argument("--b-cfg", type=_csv(float), help="Stage B cfg values, e.g. 1.1,0 (default: the workload's)")
    p.add_argument("--runs", type=int, help="timed runs per combination (default: the workload's)")
    p.add_argument("--warmup", type=int, help="untimed warm-up runs, >= 1 (default: the workload's)")
    p.add_argument("--seed", type=int, help="seed of weights, inputs and noise (default: the workload's)")
    p.add_argument("--device", help="cpu or cuda (default: the workload's)")
    p.add_argument("--threads", type=int, help="torch intra-op threads on the CPU (default: torch's choice)")
    p.add_argument("--engines-dir", type=Path, default=Path("engines"), help="engine cache (default: ./engines/)")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder (default: out/bench/)")
    p.add_argument("--order", choices=("interleaved", "sequential"),
                   help="timed runs round robin over all combinations (default on CPU) or one combination at a time "
                        "(default on GPU: only one is resident)")
    p.add_argument("--budget-s", type=float, help="stop starting new combinations after this many seconds")
    p.add_argument("--record", action="store_true", help="also copy the run into benchmarks/results/ (+ results.csv)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots and the image grid")
    p.add_argument("--list", action="store_true",
                   help="list workloads, backends (with availability) and peers, then exit")
    p.set_defaults(func=run)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:  # not a checkout, or no git: recorded as unknown
        return None


def _device_detail(device) -> str:
    import torch

    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        return f"{prop.total_memory / 2**30:.0f} GiB, {prop.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def environment_header(device, argv: list[str]) -> dict:
    import torch

    from cascade_rt.commands.info import environment

    env = environment()
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    env.update(
        device_detail=_device_detail(device), platform=platform.platform(),
        git_sha=_git("rev-parse", "HEAD") or "unknown",
        git_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
        cpu_count=os.cpu_count(),
        load_avg=" ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    timing = ("CUDA events around each stage, read after one synchronize per run" if device.type == "cuda"
              else "time.perf_counter around each stage")
    return {
        "schema": "cascade-rt-bench/1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["cascade-rt", "bench", *argv]),
        "environment": env,
        "timing": timing,
        "random_weights": True,
    }


def build_combos(args: argparse.Namespace, device) -> list:
    from cascade_rt.benchmarks.combos import parse_combo

    backends = args.backends or ALL_BACKENDS
    peers = () if args.peers == ("none",) else (args.peers or ALL_PEERS)
    combos, skipped = [], []
    if args.peers is None and device.type == "cpu":
        skipped = [parse_combo(p, CPU_DEFAULT_SKIPS[p]) for p in peers if p in CPU_DEFAULT_SKIPS]
        peers = tuple(p for p in peers if p not in CPU_DEFAULT_SKIPS)
    for name in backends:
        skip = TRITON_CPU_SKIP if name.split("+")[0] == "triton" and device.type != "cuda" else None
        combos.append(parse_combo(name, skip))
        if args.graphs and "+" not in name:
            combos.append(parse_combo(name + "+graphs"))
    combos += [parse_combo(c) for c in args.combo]
    combos += [parse_combo(p) for p in peers]
    return combos + skipped


def _write(run, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run.results, indent=1))
    tmp.replace(path)
    return path


def record(results: dict, out: Path, files: list[Path]) -> Path:
    """Copy the run into benchmarks/results/<run id>/ and append its rows to benchmarks/results/results.csv."""
    from cascade_rt.benchmarks.report import CSV_FIELDS, csv_rows
    from cascade_rt.errors import ConfigError

    env = results["environment"]
    device = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()
    stamp = results["created"].replace(":", "").replace("-", "")[:15]
    run_id = f"{stamp}-{device}-{results['workload']['name']}-{env['git_sha'][:7]}"
    if not RESULTS_DIR.is_dir():
        raise ConfigError(f"--record writes into {RESULTS_DIR}/ of the repository: run it from the repository root")
    dest = RESULTS_DIR / run_id
    dest.mkdir(parents=True, exist_ok=True)
    for f in [out / "results.json", out / "report.md", *files]:
        if f.exists():
            shutil.copy2(f, dest / f.name)
    table = RESULTS_DIR / "results.csv"
    new = not table.exists()
    with table.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(csv_rows(results))
    return dest


def _list(device) -> int:
    from cascade_rt.benchmarks.peers import PEERS
    from cascade_rt.benchmarks.workloads import WORKLOADS
    from cascade_rt.runtime.backends import available_backends

    print("workloads:")
    for w in WORKLOADS.values():
        print(f"  {w.name:12s} {w.device:5s} {w.description}")
    print(f"backends on {device}:")
    for name, st in available_backends(device).items():
        print(f"  {name:12s} {'yes' if st.available else 'no: ' + str(st.reason)}")
    print("peers:")
    for name, text in PEERS.items():
        print(f"  {name:18s} {text}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from cascade_rt.benchmarks import plots
    from cascade_rt.benchmarks.report import render_markdown
    from cascade_rt.benchmarks.runner import run_workload
    from cascade_rt.benchmarks.workloads import get_workload
    from cascade_rt.errors import ConfigError

    wl = get_workload(args.workload).with_overrides(
        preset_sets=args.presets, batches=args.batch, stage_b_cfgs=args.b_cfg, runs=args.runs, warmup=args.warmup,
        seed=args.seed, device=args.device,
    )
    if wl.runs < 1 or wl.warmup < 1:
        raise ConfigError("--runs and --warmup must be >= 1 (the first run is the cold one, timed apart)")
    device = torch.device(wl.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        return _list(device)
    argv = sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv[1:] else []  # for the report
    header = environment_header(device, argv)
    combos = build_combos(args, device)
    print(f"cascade-rt bench: workload {wl.name} on {header['environment']['device']}, "
          f"{len(wl.cases())} case(s) x {len(combos)} combination(s), RANDOM weights; writing {args.out}/", flush=True)
    run_ = run_workload(
        wl, combos, device=device, header=header, engine_dir=args.engines_dir, budget_s=args.budget_s,
        interleave=None if args.order is None else args.order == "interleaved", on_update=lambda r: _write(r, args.out),
    )
    _write(run_, args.out)
    markdown = render_markdown(run_.results)
    (args.out / "report.md").write_text(markdown)
    files = [] if args.no_plots else plots.write_plots(run_.results, run_.thumbnails, args.out)
    print(markdown)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'report.md'}" + "".join(f", {f}" for f in files))
    if args.record:
        print(f"recorded in {record(run_.results, args.out, files)}")
    return 0
