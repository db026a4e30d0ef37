"""Load time and resident memory of one full-size checkpoint file, loaded the way the pipeline loads it.

    python -m cascade_rt.benchmarks.load_weights --preset stage_c_lite --dir /tmp/ckpt

Writes a random-weight bf16 checkpoint of the preset (official key names, safetensors) unless it exists, then,
in a fresh process each: `weights.load_stage` (owned, aligned copies of every tensor: what the pipeline does)
and, for comparison, safetensors' `load_file` (tensors that stay views of the memory-mapped file, read from disk
only when first used). Prints one JSON line per method: seconds, peak RSS (VmHWM) and RSS after the load, in
MiB, and for `load_stage` the time of the full weights fingerprint the engine cache keys engines by.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cascade_rt.export.sources import model_fingerprint
from cascade_rt.models.presets import build_model
from cascade_rt.weights import load_stage


def _status_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(method: str, path: Path, preset: str) -> dict:
    before = _status_mib()
    t0 = time.perf_counter()
    extra = {}
    if method == "load_stage":
        model = load_stage(preset, path, dtype=torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        model_fingerprint(model)  # what an engine backend computes once per model (the engine cache key)
        extra["fingerprint_seconds"] = round(time.perf_counter() - t1, 2)
    else:
        state = load_file(str(path))
        n = sum(t.numel() for t in state.values())
        seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")  # this process's own peak (ru_maxrss would include the parent's, kept across exec)
    return {"method": method, "preset": preset, "params": n, "seconds": round(seconds, 2),
            "rss_before_mib": round(before), "rss_after_mib": round(_status_mib()), "peak_rss_mib": round(peak),
            **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stage_c_lite")
    parser.add_argument("--dir", type=Path, default=Path("out/load_weights"))
    parser.add_argument("--measure", choices=("load_stage", "load_file"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    path = args.dir / f"{args.preset}_bf16.safetensors"
    if args.measure:
        print(json.dumps(measure(args.measure, path, args.preset)))
        return 0
    if not path.is_file():
        args.dir.mkdir(parents=True, exist_ok=True)
        model = build_model(args.preset, dtype=torch.bfloat16, seed=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        del model
    for method in ("load_stage", "load_file"):
        cmd = [sys.executable, "-m", "cascade_rt.benchmarks.load_weights", "--preset", args.preset,
               "--dir", str(args.dir), "--measure", method]
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
