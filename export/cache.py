"""The engine cache: `engines/` (or any directory), one manifest beside every engine.

    <stage>-<preset>-<precision>-<b1-1024x1024|dynamic>[-cfg]-<format>.<onnx|plan|pt2>   (+ .onnx.data)
    <same name>.json                                                                       the manifest

Rules:
* An engine is used only if its manifest matches the request and this environment field by field
  (`Manifest.mismatches`), its files match their recorded sizes and sha256, and its validation did not fail.
  Otherwise `load` refuses with the reasons, and `ensure` rebuilds (saying why).
* Builds are atomic: files are built and validated in a scratch directory inside the cache directory, fsync'ed,
  moved into place with `os.replace`, and the manifest is written last. The old manifest is removed before
  anything is replaced, so a crash at any point leaves no manifest that describes the files present, and such
  files never load. `clean` removes scratch directories and engines without a valid manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from cascade_rt.errors import CascadeError, EngineError
from cascade_rt.export.build import EngineRequest, base_manifest, build_files, run_validation, spec_for
from cascade_rt.export.engine import Engine
from cascade_rt.export.manifest import MANIFEST_SUFFIX, Manifest, fsync_dir
from cascade_rt.export.opener import open_engine_files
from cascade_rt.export.specs import Dims, StageSpec, make_spec
from cascade_rt.export.validate import raise_if_failed

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = ".build-"
TIMING_CACHE = "tensorrt.timing-cache"


@dataclass
class Entry:
    manifest_path: Path
    manifest: Manifest | None
    error: str | None = None


class EngineCache:
    def __init__(self, root: str | Path = "engines") -> None:
        self.root = Path(root)

    # ---- paths
    def engine_path(self, request: EngineRequest) -> Path:
        return self.root / request.engine_file

    def manifest_path(self, request: EngineRequest) -> Path:
        return self.root / (request.name + MANIFEST_SUFFIX)

    # ---- reuse
    def problems(self, request: EngineRequest, spec: StageSpec | None = None, *, check_sha: bool = True) -> list[str]:
        """Why the cached engine for `request` cannot be used (empty: it can)."""
        path = self.manifest_path(request)
        if not path.is_file():
            return [f"no engine built yet ({path.name} is missing)"]
        try:
            have = Manifest.read(path)
        except (OSError, ValueError, TypeError) as exc:
            return [f"unreadable manifest {path.name}: {exc}"]
        want = base_manifest(request, spec or spec_for(request.stage, request.preset))
        reasons = have.mismatches(want)
        if have.validation.get("status") == "failed":
            reasons.append("its validation failed: " + "; ".join(have.validation.get("errors", [])))
        return reasons + have.file_problems(self.root, check_sha=check_sha)

    def load(
        self, request: EngineRequest, spec: StageSpec | None = None, *, check_sha: bool = True, **options: Any
    ) -> Engine:
        """The cached engine for `request`, loaded; refuses (EngineError with the reasons) if it does not fit."""
        reasons = self.problems(request, spec, check_sha=check_sha)
        if reasons:
            raise EngineError(
                f"engine {request.name} in {self.root} cannot be used: " + "; ".join(reasons)
                + " (rebuild it with `cascade-rt export`, or let the runtime build it)"
            )
        manifest = Manifest.read(self.manifest_path(request))
        return self._open(manifest, request, options)

    def _open(self, manifest: Manifest, request: EngineRequest, options: dict[str, Any] | None) -> Engine:
        """Loaded now, except graphs no runtime here could validate (a bf16 ONNX graph on a CPU machine:
        loading it would fail; it is the input of a TensorRT build elsewhere)."""
        usable_here = manifest.validation.get("status") != "unvalidated"
        return open_engine_files(self.root, manifest, device=request.device, options=options, load=usable_here)

    def ensure(
        self,
        request: EngineRequest,
        model: nn.Module | Callable[[], nn.Module],
        *,
        force: bool = False,
        options: dict[str, Any] | None = None,
    ) -> Engine:
        """Load the cached engine if it fits, else build it (the log says why)."""
        built = model if isinstance(model, nn.Module) else None
        if not force:
            spec = None
            if built is not None:
                spec = make_spec(request.stage, built, request.preset)
            reasons = self.problems(request, spec)
            if not reasons:
                logger.info("reusing %s", request.engine_file)
                return self.load(request, spec, check_sha=False, **(options or {}))
            logger.info("building %s: %s", request.engine_file, "; ".join(reasons))
        return self.build(request, built if built is not None else model(), options=options)

    # ---- build (atomic)
    def build(self, request: EngineRequest, model: nn.Module, *, options: dict[str, Any] | None = None) -> Engine:
        self.root.mkdir(parents=True, exist_ok=True)
        onnx_source = None
        if request.format == "tensorrt":  # the ONNX graph is an engine of its own, cached and validated
            source = request.onnx_source()
            self.ensure(source, model, options=options)
            onnx_source = self.engine_path(source)
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX + request.name + ".", dir=self.root))
        try:
            manifest = build_files(
                request, model, scratch, onnx_source=onnx_source, timing_cache=self.root / TIMING_CACHE,
                options=options,
            )  # fmt: skip
            self._install(scratch, manifest, request)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        raise_if_failed(manifest.validation, f"engine {request.engine_file}")
        return self._open(manifest, request, options)

    def _install(self, scratch: Path, manifest: Manifest, request: EngineRequest) -> None:
        """fsync the built files, invalidate the old manifest, move the files in, write the manifest last."""
        for name in manifest.files:
            with open(scratch / name, "rb+") as f:
                os.fsync(f.fileno())
        self.manifest_path(request).unlink(missing_ok=True)
        fsync_dir(self.root)
        main = manifest.engine_file
        for name in sorted(manifest.files, key=lambda n: n == main):  # external data first, the graph last
            os.replace(scratch / name, self.root / name)
        fsync_dir(self.root)
        manifest.write(self.manifest_path(request))
        logger.info("wrote %s (%s)", manifest.engine_file, manifest.validation.get("status"))

    # ---- list / verify / clean
    def entries(self) -> list[Entry]:
        out = []
        for path in sorted(self.root.glob("*" + MANIFEST_SUFFIX)):
            try:
                out.append(Entry(path, Manifest.read(path)))
            except (OSError, ValueError, TypeError) as exc:
                out.append(Entry(path, None, f"unreadable manifest: {exc}"))
        return out

    def verify(
        self, entry: Entry, *, numerics: bool = True, model_factory: Callable[[Manifest], nn.Module] | None = None
    ) -> list[str]:
        """Files against the manifest (sha256), environment, and (with `numerics`) a fresh validation run."""
        if entry.manifest is None:
            return [entry.error or "no manifest"]
        m = entry.manifest
        problems = m.file_problems(self.root)
        if m.validation.get("status") == "failed":
            problems.append("recorded validation failed: " + "; ".join(m.validation.get("errors", [])))
        if problems or not numerics:
            return problems
        request = request_of(m)
        try:  # the spec the current code gives this preset (catches engines older than a spec change)
            spec = spec_for(m.stage, m.preset)
        except Exception:  # a preset this code does not know (custom model): trust the recorded spec
            spec = StageSpec.from_dict(m.spec)
        problems += m.mismatches(base_manifest(request, spec))
        if problems:
            return problems
        if m.validation.get("status") == "unvalidated":
            logger.warning("%s: not re-validated (%s)", m.engine_file, m.validation.get("reason"))
            return []
        if model_factory is None:
            return ["cannot re-validate: no model to compare with (pass the weights)"]
        try:
            model = model_factory(m)
            engine = open_engine_files(self.root, m, device=request.device)
            report = run_validation(engine, model, StageSpec.from_dict(m.spec), request)
        except CascadeError as exc:  # weights gone or changed, engine unloadable, ...
            return [str(exc)]
        return report["errors"]

    def clean(self, *, everything: bool = False) -> list[Path]:
        """Remove scratch directories and files no valid manifest lists (all engines with `everything`)."""
        removed: list[Path] = []
        keep: set[str] = set()
        for entry in self.entries():
            ok = entry.manifest is not None and not entry.manifest.file_problems(self.root, check_sha=False)
            if ok and not everything:
                keep |= {entry.manifest_path.name, *entry.manifest.files}
        for path in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if path.name in keep or path.name == "README.md" or (path.name == TIMING_CACHE and not everything):
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
        return removed


def request_of(m: Manifest) -> EngineRequest:
    return EngineRequest(
        stage=m.stage, preset=m.preset, format=m.format, precision=m.precision, weights_hash=m.weights_hash,
        dims=Dims(**m.dims), dynamic=m.dynamic, device="cuda" if m.device.get("type") == "cuda" else "cpu",
    )  # fmt: skip
