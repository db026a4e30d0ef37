"""The JSON manifest written beside every engine, and the rules for when an engine may be reused.

A manifest records what the engine is (stage, preset, weights hash, spec, precision, shapes and profiles,
format and build options), what built it (library versions, device name and compute capability, build time),
whether it is numerically sound (validation errors per output) and the sha256 of every file it consists of.
`Manifest.mismatches(other)` lists, field by field, why an engine does not fit a request; an engine is reused
only when that list is empty. Manifests are written last and atomically (`write_json_atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".json"

# Library versions that change what a format's artifact is or how it runs.
RELEVANT_VERSIONS = {
    "onnx": ("torch", "onnx", "onnxscript"),
    "onnxruntime": ("torch", "onnx", "onnxscript", "onnxruntime"),
    "tensorrt": ("torch", "onnx", "onnxscript", "tensorrt"),
    "aoti": ("torch", "triton"),
}
# Formats whose artifact is tied to the device it was built on (kernels compiled for that CPU ISA / GPU arch).
DEVICE_BOUND = ("tensorrt", "aoti")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "onnx", "onnxscript", "onnxruntime", "tensorrt", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed, or broken: recorded as absent
            out[mod] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str = "cpu") -> dict[str, Any]:
    """{'type', 'name', 'compute_capability'} of the device an engine is built for."""
    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        return {"type": "cuda", "name": torch.cuda.get_device_name(idx), "compute_capability": f"{cap[0]}.{cap[1]}"}
    return {"type": "cpu", "name": cpu_name(), "compute_capability": None}


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write to a temp file in the same directory, fsync, os.replace: readers see the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Manifest:
    stage: str
    preset: str
    format: str
    precision: str
    weights_hash: str
    spec: dict[str, Any]
    dims: dict[str, Any]  # the request: batch, height, width, cfg
    dynamic: bool
    profile: dict[str, list] = field(default_factory=dict)  # input -> [min, opt, max] shapes
    engine_file: str = ""  # main file, relative to the manifest's directory
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {sha256, bytes}
    versions: dict[str, str | None] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)  # seconds, created, opset, options
    validation: dict[str, Any] = field(default_factory=dict)  # status, tolerance, outputs, errors
    extensions: dict[str, Any] = field(default_factory=dict)  # LoRA files/hashes/scales, ControlNet (if any)
    refit: bool = False  # TensorRT built with REFIT (weights replaceable in memory; build.refit_plan names them)
    manifest_version: int = MANIFEST_VERSION

    # ---- io
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        """A manifest from parsed JSON; ValueError when it is not one (wrong types, a file outside its folder):
        callers treat such an engine as broken (rebuild it, report it in `engines verify`)."""
        if not isinstance(d, dict):
            raise ValueError(f"a manifest is a JSON object, this is a {type(d).__name__}")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = [k for k in _REQUIRED if k not in known]
        if missing:
            raise ValueError(f"fields missing: {', '.join(missing)}")
        for key, kinds in _FIELD_TYPES.items():
            wrong = key in known and not isinstance(known[key], kinds)
            if wrong or (kinds is int and isinstance(known.get(key), bool)):
                names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
                raise ValueError(f"field {key!r} must be {names}, got {type(known[key]).__name__}")
        m = cls(**known)
        for name, info in m.files.items():
            check_file_name(name)
            if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)
                    and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool)):
                raise ValueError(f"files[{name!r}] must be {{'sha256': str, 'bytes': int}}, got {_short(info)}")
        if m.engine_file:
            check_file_name(m.engine_file)
            if m.files and m.engine_file not in m.files:
                raise ValueError(f"engine_file {m.engine_file!r} is not among its files")
        return m

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    # ---- files
    def record_files(self, directory: str | Path, names: list[str]) -> None:
        directory = Path(directory)
        self.files = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in names}

    def file_problems(self, directory: str | Path, *, check_sha: bool = True) -> list[str]:
        """Missing, truncated or modified files (sizes always, sha256 when `check_sha`), and files that resolve
        outside `directory` (a symlink out of the engine folder)."""
        directory = Path(directory)
        problems = []
        if not self.files:
            problems.append("the manifest lists no files")
        for name, info in self.files.items():
            p = directory / name
            if not inside(p, directory):
                problems.append(f"{name}: resolves outside the engine folder {directory} (refused)")
            elif not p.is_file():
                problems.append(f"{name}: missing")
            elif p.stat().st_size != info["bytes"]:
                problems.append(f"{name}: {p.stat().st_size} bytes, the manifest says {info['bytes']} (truncated?)")
            elif check_sha and sha256_file(p) != info["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest (modified after the build)")
        return problems

    # ---- reuse rules
    def identity(self) -> dict[str, Any]:
        return {
            "manifest_version": self.manifest_version, "stage": self.stage, "preset": self.preset,
            "format": self.format, "precision": self.precision, "weights_hash": self.weights_hash,
            "spec": self.spec, "dims": self.dims, "dynamic": self.dynamic, "profile": self.profile,
            "extensions": self.extensions, "refit": self.refit,
        }

    def mismatches(self, want: "Manifest") -> list[str]:
        """Why this (built) engine does not fit `want` (a manifest describing the request and environment)."""
        out = []
        for key, have in self.identity().items():
            wanted = want.identity()[key]
            if _norm(have) != _norm(wanted):
                out.append(f"{key}: engine has {_short(have)}, wanted {_short(wanted)}")
        for lib in RELEVANT_VERSIONS.get(self.format, ()):
            if self.versions.get(lib) != want.versions.get(lib):
                have, running = self.versions.get(lib), want.versions.get(lib)
                out.append(f"{lib} version: engine built with {have}, running {running}")
        if self.format in DEVICE_BOUND:
            for k in ("type", "name", "compute_capability"):
                if self.device.get(k) != want.device.get(k):
                    out.append(f"device {k}: engine built for {self.device.get(k)}, this is {want.device.get(k)}")
        return out


_REQUIRED = ("stage", "preset", "format", "precision", "weights_hash", "spec", "dims", "dynamic")
_FIELD_TYPES: dict[str, Any] = {
    "stage": str, "preset": str, "format": str, "precision": str, "weights_hash": str, "spec": dict, "dims": dict,
    "dynamic": bool, "profile": dict, "engine_file": str, "files": dict, "versions": dict, "device": dict,
    "build": dict, "validation": dict, "manifest_version": int, "extensions": dict, "refit": bool,
}


def check_file_name(name: Any) -> None:
    """A manifest names its files by plain names inside its own folder: no paths, no '..', nothing absolute."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"file name {name!r} is not a plain file name inside the engine folder (refused)")


def inside(path: str | Path, directory: str | Path) -> bool:
    """Whether `path`, with every symlink resolved, lies inside `directory` (also resolved)."""
    try:
        return Path(path).resolve().is_relative_to(Path(directory).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."
