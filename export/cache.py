"""The engine cache: `engines/` (or any directory), one manifest beside every engine.

    <stage>-<preset>-<weights hash>-<precision>-<b1-1024x1024|dynamic>[-cfg]-<format>.<onnx|plan|pt2>
    <same name>.json     the manifest            (+ <name>.onnx.data: ONNX external data)
    .lock-<same name>    held while a process builds it: a second builder waits, then reuses its engine

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

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

try:
    import fcntl
except ImportError:  # not POSIX: engine builds are not serialised across processes
    fcntl = None  # type: ignore[assignment]

from cascade_rt.errors import CascadeError, EngineError
from cascade_rt.export.build import (
    EXTENSIONS,
    FORMATS,
    EngineRequest,
    base_manifest,
    build_files,
    run_validation,
    spec_for,
)
from cascade_rt.export.engine import Engine
from cascade_rt.export.manifest import MANIFEST_SUFFIX, Manifest, fsync_dir
from cascade_rt.export.opener import open_engine_files
from cascade_rt.export.sources import model_fingerprint
from cascade_rt.export.specs import GRAPHS, Dims, StageSpec, make_spec
from cascade_rt.export.validate import raise_if_failed

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = ".build-"
LOCK_PREFIX = ".lock-"
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
        """Load the cached engine if it fits, else build it (the log says why). Builders of one engine are
        serialised by a lock file: a second process (or thread) waits, then reuses what the first built."""
        built = model if isinstance(model, nn.Module) else None
        spec = make_spec(request.stage, built, request.preset) if built is not None else None
        if not force and not (reasons := self.problems(request, spec)):
            logger.info("reusing %s", request.engine_file)
            return self.load(request, spec, check_sha=False, **(options or {}))
        with self._build_lock(request):
            if not force:
                reasons = self.problems(request, spec)  # another builder may have finished meanwhile
                if not reasons:
                    logger.info("reusing %s (built while waiting for its lock)", request.engine_file)
                    return self.load(request, spec, check_sha=False, **(options or {}))
                logger.info("building %s: %s", request.engine_file, "; ".join(reasons))
            return self.build(request, built if built is not None else model(), options=options)

    @contextmanager
    def _build_lock(self, request: EngineRequest) -> Iterator[None]:
        self._prepare_root()
        path = self.root / (LOCK_PREFIX + request.name)
        with open(path, "a") as f:
            if fcntl is not None:  # POSIX; elsewhere builds are not serialised
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info("waiting for another process building %s", request.engine_file)
                    fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _prepare_root(self) -> None:
        """Create the cache folder; refuse one that is a file or not writable, before any build work."""
        if self.root.exists() and not self.root.is_dir():
            raise EngineError(f"--engine-dir {self.root} is a file; pass a folder for the engine cache")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"cannot create the engine cache folder {self.root}: {exc.strerror}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise EngineError(f"the engine cache folder {self.root} is not writable; pass a writable --engine-dir")

    # ---- build (atomic)
    def build(self, request: EngineRequest, model: nn.Module, *, options: dict[str, Any] | None = None) -> Engine:
        self._prepare_root()
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
            )
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
        if self.root.exists() and not self.root.is_dir():
            raise EngineError(f"--engine-dir {self.root} is a file, not an engine cache folder")
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
        """Files against the manifest (sha256, inside the folder), the manifest against this environment, the
        recorded weights hash against the weights now (when `model_factory` can rebuild them), and with
        `numerics` a fresh validation run against the eager model."""
        if entry.manifest is None:
            return [entry.error or "no manifest"]
        m = entry.manifest
        problems = m.file_problems(self.root)
        if m.validation.get("status") == "failed":
            problems.append("recorded validation failed: " + "; ".join(m.validation.get("errors", [])))
        request = request_of(m)
        try:  # the spec the current code gives this preset (catches engines older than a spec change)
            spec = spec_for(m.stage, m.preset)
        except CascadeError:  # a preset this code does not know (custom model): trust the recorded spec
            spec = StageSpec.from_dict(m.spec)
        problems += m.mismatches(base_manifest(request, spec))  # environment: versions, device, spec
        if problems:
            return problems
        if model_factory is None:
            return [] if not numerics else ["cannot re-validate: no model to compare with (pass the weights)"]
        try:
            model = model_factory(m)  # raises when recorded weights files are missing or changed
        except CascadeError as exc:
            return [str(exc)]
        if m.weights_hash.startswith("model:") and model_fingerprint(model) != m.weights_hash:
            return ["the weights it was built from have changed since (their fingerprint differs)"]
        if not numerics:
            return []
        if m.validation.get("status") == "unvalidated":
            logger.warning("%s: not re-validated (%s)", m.engine_file, m.validation.get("reason"))
            return []
        try:
            engine = open_engine_files(self.root, m, device=request.device)
            report = run_validation(engine, model, StageSpec.from_dict(m.spec), request)
        except CascadeError as exc:  # engine unloadable, ...
            return [str(exc)]
        return report["errors"]

    def leftovers(self) -> list[Path]:
        """What `clean` would remove: cache-made files no valid manifest lists, and scratch folders."""
        return self.clean(dry_run=True)

    def clean(self, *, everything: bool = False, dry_run: bool = False) -> list[Path]:
        """Remove scratch folders (.build-*), half-written manifests and engine files no valid manifest lists
        (every engine with `everything`); with `dry_run`, only list them. Only names this cache makes are ever
        considered (`made_by_cache`): other files and folders in the directory are never touched, and no folder
        is entered except the cache's own scratch folders."""
        if not self.root.exists():
            return []
        if not self.root.is_dir():
            raise EngineError(f"--engine-dir {self.root} is a file, not an engine cache folder")
        removed: list[Path] = []
        keep: set[str] = set()
        for entry in self.entries():
            ok = entry.manifest is not None and not entry.manifest.file_problems(self.root, check_sha=False)
            if ok and not everything:
                keep |= {entry.manifest_path.name, *entry.manifest.files}
        for path in sorted(self.root.iterdir()):
            if not made_by_cache(path) or path.name in keep or (path.name == TIMING_CACHE and not everything):
                continue
            if path.name.startswith(LOCK_PREFIX) and not everything:  # may be held by a builder right now; tiny
                continue
            if not dry_run:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
        return removed


# What the cache writes: <graph>-...-<format>.<ext> (+ .json manifest, + .onnx.data), temp manifests and scratch.
ENGINE_NAME = re.compile(
    rf"^({'|'.join(map(re.escape, GRAPHS))})-[A-Za-z0-9_.+-]+-({'|'.join(FORMATS)})"
    rf"({'|'.join(re.escape(e) for e in sorted(set(EXTENSIONS.values())))})?(\.data)?({re.escape(MANIFEST_SUFFIX)})?$"
)
TEMP_MANIFEST = re.compile(rf"^\..+{re.escape(MANIFEST_SUFFIX)}\..+\.tmp$")


def made_by_cache(path: Path) -> bool:
    """Whether the cache itself makes files or folders of this name (nothing else is ever removed)."""
    name = path.name
    if name.startswith(SCRATCH_PREFIX):
        return path.is_dir() or path.is_symlink()
    if path.is_dir() and not path.is_symlink():
        return False
    if name.startswith(LOCK_PREFIX):
        return bool(ENGINE_NAME.match(name[len(LOCK_PREFIX) :]))
    return bool(ENGINE_NAME.match(name) or TEMP_MANIFEST.match(name) or name == TIMING_CACHE)


def request_of(m: Manifest) -> EngineRequest:
    return EngineRequest(
        stage=m.stage, preset=m.preset, format=m.format, precision=m.precision, weights_hash=m.weights_hash,
        dims=Dims(**m.dims), dynamic=m.dynamic, device="cuda" if m.device.get("type") == "cuda" else "cpu",
        extensions=json.dumps(m.extensions, sort_keys=True) if m.extensions else "", refit=m.refit,
    )
