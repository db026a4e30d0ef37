"""`cascade-rt engines {list,verify,clean}`: inspect, re-check and tidy the engine cache.

verify: every engine's files against its manifest (sizes, sha256, inside the folder), the manifest against this
environment (library versions, device) and against the weights it was built from (their hash now), and a fresh
numerical validation against the eager model (random seeded weights are rebuilt; official weights are re-read
from the recorded path; --no-numerics skips only this last part). Files no valid manifest lists and scratch
folders of interrupted builds are reported. Exit status 1 if anything fails.

clean: removes only what the cache makes (engine files, manifests, .build-* scratch folders) and no valid
manifest keeps; other files and folders in the directory are never touched. --dry-run lists, removes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("engines", help="list, verify or clean the engine cache", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("list", "verify", "clean"))
    p.add_argument("--engine-dir", default="engines")
    p.add_argument("--no-numerics", action="store_true", help="verify: files and environment only")
    p.add_argument("--all", action="store_true", help="clean: remove every engine, not only broken ones")
    p.add_argument("--dry-run", action="store_true", help="clean: list what would be removed, remove nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cascade_rt.export.cache import EngineCache

    cache = EngineCache(args.engine_dir)
    if args.action == "clean":
        removed = cache.clean(everything=args.all, dry_run=args.dry_run)
        for path in removed:
            print(f"{'would remove' if args.dry_run else 'removed'} {path}")
        if not removed:
            print(f"nothing to remove in {cache.root}", file=sys.stderr)
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
    leftovers = cache.leftovers()
    for path in leftovers:  # orphan engine files, half-written manifests, scratch folders of interrupted builds
        print(f"LEFTOVER {path.name}: no valid manifest lists it (`cascade-rt engines clean` removes it)")
    print(f"{len(entries) - failed}/{len(entries)} engines verified in {cache.root}", file=sys.stderr)
    return 1 if failed or leftovers else 0


def list_row(entry) -> dict:
    m = entry.manifest
    if m is None:
        return {"manifest": entry.manifest_path.name, "error": entry.error}
    return {
        "engine": m.engine_file, "stage": m.stage, "preset": m.preset, "format": m.format,
        "precision": m.precision, "dims": m.dims, "dynamic": m.dynamic,
        "bytes": sum(f["bytes"] for f in m.files.values()), "validation": m.validation.get("status"),
        "created": m.build.get("created"),
    }
