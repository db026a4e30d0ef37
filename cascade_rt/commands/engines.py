"""`cascade-rt engines {list,verify,clean}`: inspect, re-check and tidy the engine cache.

verify: every engine's files against its manifest (sizes, sha256), the manifest against this environment
(library versions, device), and a fresh numerical validation against the eager model it was built from
(random seeded weights are rebuilt; official weights are re-read from the recorded path). Exit status 1 if
anything fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("engines", help="list, verify or clean the engine cache", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("action", choices=("list", "verify", "clean"))
    p.add_argument("--engine-dir", default="engines")
    p.add_argument("--no-numerics", action="store_true", help="verify: files and environment only")
    p.add_argument("--all", action="store_true", help="clean: remove every engine, not only broken ones")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cascade_rt.export.cache import EngineCache

    cache = EngineCache(args.engine_dir)
    if args.action == "clean":
        removed = cache.clean(everything=args.all)
        for path in removed:
            print(f"removed {path}")
        return 0
    entries = cache.entries()
    if args.action == "list":
        rows = [list_row(e) for e in entries]
        print(json.dumps(rows, indent=2))
        return 0
    from cascade_rt.export.sources import model_from_manifest

    failed = 0
    for entry in entries:
        problems = cache.verify(entry, numerics=not args.no_numerics, model_factory=model_from_manifest)
        name = entry.manifest_path.name
        if problems:
            failed += 1
            print(f"FAIL {name}: " + "; ".join(problems))
        else:
            status = entry.manifest.validation.get("status") if entry.manifest else "?"
            print(f"ok   {name} ({status})")
    print(f"{len(entries) - failed}/{len(entries)} engines verified in {cache.root}", file=sys.stderr)
    return 1 if failed else 0


def list_row(entry) -> dict:
    m = entry.manifest
    if m is None:
        return {"manifest": entry.manifest_path.name, "error": entry.error}
    return {
        "engine": m.engine_file, "stage": m.stage, "preset": m.preset, "format": m.format,
        "precision": m.precision, "dims": m.dims, "dynamic": m.dynamic,
        "bytes": sum(f["bytes"] for f in m.files.values()), "validation": m.validation.get("status"),
        "created": m.build.get("created"),
    }  # fmt: skip
