"""Full-size export check: Stage C lite (1B params) with random weights -> bf16 ONNX with external data.

Too long for CI on a 2-core machine (minutes, several GB), so it runs here once and its result is recorded:

    .venv/bin/python benchmarks/export_full.py [--preset stage_c_lite] [--precision bf16] [--engine-dir DIR]

It exports the per-prompt conditioning graph and the denoiser through the engine cache (so the graphs are
checked with onnx.checker on the path, strict shape inference and the spec, and get manifests), then records
time, peak memory and file sizes in benchmarks/results/export_full.json. ONNX Runtime's CPU provider cannot run
bf16 graphs, so bf16 graphs are recorded 'unvalidated'; `--precision fp32` (results in export_full_fp32.json)
also runs them in ONNX Runtime against the eager model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cascade_rt.export.build import EngineRequest
from cascade_rt.export.cache import EngineCache
from cascade_rt.export.manifest import Manifest, cpu_name, library_versions
from cascade_rt.export.sources import random_source
from cascade_rt.export.specs import GRAPH_COMPONENT, Dims

logger = logging.getLogger("export_full")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="stage_c_lite")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--engine-dir", default=None, help="default: a temporary directory, removed afterwards")
    p.add_argument("--out", default=None, help="default: benchmarks/results/export_full[_fp32].json")
    args = p.parse_args(argv)
    suffix = "" if args.precision == "bf16" else f"_{args.precision}"
    args.out = args.out or str(Path(__file__).parent / "results" / f"export_full{suffix}.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


    family = "c" if args.preset.startswith("stage_c") else "b"
    stages = [f"stage_{family}_cond", f"stage_{family}"]
    tmp = None if args.engine_dir else tempfile.TemporaryDirectory(prefix="export_full.")
    root = Path(args.engine_dir or tmp.name)
    cache = EngineCache(root)
    result: dict = {
        "what": f"{args.preset} ({GRAPH_COMPONENT[stages[1]]}) random weights -> ONNX {args.precision}, static shapes",
        "dims": {"batch": 1, "height": args.height, "width": args.width, "cfg": True},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},  # shared machine: times are upper bounds
        "versions": library_versions(), "git_sha": git_sha(), "graphs": [],
    }
    start = time.perf_counter()
    source = random_source(stages[1], args.preset, args.precision, seed=0)
    result["build_model_seconds"] = round(time.perf_counter() - start, 1)
    result["params"] = sum(t.numel() for t in source.model.parameters())
    result["peak_rss_gb_after_model"] = round(peak_rss_gb(), 2)
    for stage in stages:
        request = EngineRequest(stage, args.preset, "onnx", args.precision, source.weights_hash,
                                Dims(1, args.height, args.width, cfg=True))
        t0 = time.perf_counter()
        cache.ensure(request, source.model, options={"weights_source": source.record})
        m = Manifest.read(cache.manifest_path(request))
        result["graphs"].append({
            "stage": stage, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak_rss_gb(), 2),
            "files": {n: f["bytes"] for n, f in m.files.items()}, "external_data": m.build.get("external_data"),
            "opset": m.build.get("opset"), "n_op_types": len(m.build.get("ops", [])),
            "validation": {k: m.validation.get(k) for k in ("status", "reason", "outputs")},
            "checks": "onnx.checker.check_model(path, full_check=True) + strict shape inference + spec I/O: passed",
        })
        logger.info("%s: %s", stage, json.dumps(result["graphs"][-1]))
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", args.out)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
