"""Checkpoint files, one tensor at a time: safetensors headers, tensor sources, a streaming writer, a cheap hash.

Nothing here knows about Stable Cascade. `cascade_rt.weights` builds on it (strict loading, detection, layouts).

* `read_header(path)` parses and validates a safetensors header without reading tensor data: a short, empty,
  truncated or corrupt file raises `WeightsError` saying what is wrong and what to do.
* A `TensorSource` is a read-only set of named tensors (`infos` = shapes and dtypes, `get(key)` reads one):
  `open_source(path)` for a safetensors file or a PyTorch pickle, `ShardedSource` for several files,
  `StateDictSource` for tensors in memory, `MappedSource` for a renamed / split / concatenated view of another.
* `write_safetensors(path, source)` streams tensors to disk without holding them all in memory.
* `weights_hash(...)` fingerprints weights cheaply (see its docstring for exactly what it covers).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open

from cascade_rt.errors import WeightsError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 << 20  # the safetensors library's own limit
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Header:
    path: Path
    raw: bytes  # the JSON bytes as stored
    infos: dict[str, TensorInfo]
    offsets: dict[str, tuple[int, int]]  # relative to data_start
    metadata: dict[str, str]
    data_start: int
    size: int


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of a safetensors file (no tensor data is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 0 <= n <= min(MAX_HEADER, size - 8) else b""
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions") from None
    redownload = "re-download or re-copy it (compare its size with the source)"
    if n < 0:
        raise WeightsError(
            f"{path} is {size} bytes, too short to be a safetensors file (empty or cut off): {redownload}"
        )
    if n > MAX_HEADER:
        raise WeightsError(
            f"{path} is not a valid safetensors file (header length field reads {n} bytes): {redownload}"
        )
    if n > size - 8:
        raise WeightsError(
            f"{path} is truncated: its header alone needs {n + 8} bytes but the file has {size}: {redownload}"
        )
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("the header is not a JSON object")
        metadata = doc.pop("__metadata__", None) or {}
        infos, offsets = {}, {}
        for key, e in doc.items():
            start, end = (int(v) for v in e["data_offsets"])
            infos[key] = TensorInfo(tuple(int(s) for s in e["shape"]), ST_DTYPES[e["dtype"]])
            offsets[key] = (start, end)
            if end - start != infos[key].nbytes:
                raise ValueError(
                    f"tensor {key!r}: data_offsets span {end - start} bytes, shape and dtype need {infos[key].nbytes}"
                )
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path} has a corrupt safetensors header ({exc}): {redownload}") from None
    expected = 8 + n + max((end for _, end in offsets.values()), default=0)
    if size < expected:
        raise WeightsError(
            f"{path} is truncated: its header describes {expected} bytes but the file has {size} "
            f"({expected - size} missing): {redownload}"
        )
    if size > expected:
        raise WeightsError(
            f"{path} is corrupt: {size - expected} bytes follow the last tensor its header describes: {redownload}"
        )
    return Header(path, raw, infos, offsets, metadata, 8 + n, size)


# ------------------------------------------------------------------------------------------ tensor sources
class TensorSource:
    """Named tensors with known shapes and dtypes, read one at a time. Use as a context manager."""

    infos: dict[str, TensorInfo]
    name: str  # for messages: the file or folder the tensors come from

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StateDictSource(TensorSource):
    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "state dict") -> None:
        self.state_dict, self.name = state_dict, name
        self.infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state_dict.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.state_dict[key]


class ShardedSource(TensorSource):
    """One or more safetensors files (the shards of one model); every header is validated on open."""

    def __init__(self, paths: Iterable[str | Path], name: str | None = None) -> None:
        self.headers = [read_header(p) for p in paths]
        self.name = name or ", ".join(str(h.path) for h in self.headers)
        self.infos, self._where = {}, {}
        for i, h in enumerate(self.headers):
            for key, info in h.infos.items():
                if key in self.infos:
                    raise WeightsError(
                        f"tensor {key!r} appears in both {self.headers[self._where[key]].path} and {h.path}: "
                        f"the shards overlap; re-download them"
                    )
                self.infos[key], self._where[key] = info, i
        self._handles: dict[int, object] = {}

    def get(self, key: str) -> torch.Tensor:
        i = self._where[key]
        try:
            if i not in self._handles:
                self._handles[i] = safe_open(str(self.headers[i].path), framework="pt", device="cpu").__enter__()
            return self._handles[i].get_tensor(key)
        except (SafetensorError, OSError) as exc:  # changed on disk after the header check, or unreadable
            raise WeightsError(
                f"cannot read tensor {key!r} from {self.headers[i].path}: {exc}; re-download the file"
            ) from None

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


class MappedSource(TensorSource):
    """A view of `base` under other names: each output key is computed from some base keys (rename, split, cat)."""

    def __init__(
        self,
        base: TensorSource,
        plan: Mapping[str, tuple[tuple[str, ...], Callable[..., torch.Tensor], Callable[..., tuple[int, ...]]]],
    ) -> None:
        # plan: out_key -> (source keys, fn(*tensors) -> tensor, shape_fn(*shapes) -> shape)
        self.base, self.plan, self.name = base, dict(plan), base.name
        self.infos = {
            k: TensorInfo(shape_fn(*(base.infos[s].shape for s in srcs)), base.infos[srcs[0]].dtype)
            for k, (srcs, _, shape_fn) in self.plan.items()
        }

    def get(self, key: str) -> torch.Tensor:
        srcs, fn, _ = self.plan[key]
        return fn(*(self.base.get(s) for s in srcs))

    def close(self) -> None:
        self.base.close()


def open_source(path: str | Path) -> TensorSource:
    """A safetensors file (validated header) or a PyTorch pickle (`.pt/.pth/.ckpt/.bin`, memory-mapped)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise WeightsError(
                f"cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: {exc}); "
                f"re-download it or convert it to safetensors"
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # official load_or_fail unwraps this
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path} does not hold a flat dict of tensors (a state dict); save model.state_dict()")
        return StateDictSource(obj, str(path))
    return ShardedSource([path], str(path))


# ------------------------------------------------------------------------------------------ writing
def write_safetensors(
    path: str | Path, source: TensorSource, keys: Iterable[str] | None = None, metadata: Mapping[str, str] | None = None
) -> int:
    """Write `keys` (default: all) of `source` as one safetensors file, streaming; returns the bytes written.

    Only one tensor is in memory at a time. The file appears atomically (written to `*.tmp`, then renamed).
    """
    path = Path(path)
    keys = sorted(keys if keys is not None else source.infos, key=lambda k: (-source.infos[k].dtype.itemsize, k))
    entries, offset = {}, 0
    for k in keys:
        info = source.infos[k]
        entries[k] = {
            "dtype": ST_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps({"__metadata__": dict(metadata or {"format": "pt"}), **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in keys:
            t, info = source.get(k), source.infos[k]
            if tuple(t.shape) != info.shape or t.dtype != info.dtype:
                raise WeightsError(
                    f"{source.name}: tensor {k!r} is {tuple(t.shape)} {t.dtype}, "
                    f"its header says {info.shape} {info.dtype}"
                )
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
    return 8 + len(raw) + offset


# ------------------------------------------------------------------------------------------ hashing
HASH_VERSION = b"cascade-rt-weights-hash-v1"
_BLOCK, _BLOCKS = 64 << 10, 16


def weights_hash(obj: str | Path | Mapping[str, torch.Tensor] | Iterable[str | Path], *, full: bool = False) -> str:
    """A cheap fingerprint of weights, for engine manifests: "sha256:<hex>".

    Covers, for a safetensors file: the whole header (every tensor name, dtype, shape and offset), the file size,
    and the content of 16 blocks of 64 KiB spread evenly over the data (1 MiB read, whatever the file size).
    Not covered: the file name and mtime (a copy hashes the same), and any change confined to bytes outside the
    sampled blocks (a fine-tune changes virtually every block; an edit of a single tensor may not): pass
    `full=True` to hash every byte. Other files (pickles, JSON configs) are hashed by size + the same sampling.
    A folder hashes its `*.safetensors`, `*.json` and pickle files (names relative to it, sorted); an iterable
    hashes its paths in the given order. A state dict hashes names, dtypes, shapes and up to 256 evenly spaced
    elements of each tensor (all of them with `full=True`).
    """
    h = hashlib.sha256(HASH_VERSION)
    if isinstance(obj, Mapping):
        for k in sorted(obj):
            t = obj[k].detach()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            flat = t.reshape(-1)
            if not full and flat.numel() > 256:
                # float64 positions: fp32 overshoots past 2**24
                flat = flat[torch.linspace(0, flat.numel() - 1, 256, dtype=torch.float64).long()]
            h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return "sha256:" + h.hexdigest()
    if isinstance(obj, (str, os.PathLike)) and Path(obj).is_dir():
        root = Path(obj)
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", *PICKLE_SUFFIXES)
        )
        pairs = [(p.relative_to(root).as_posix(), p) for p in files]
    elif isinstance(obj, (str, os.PathLike)):
        pairs = [("", Path(obj))]
    else:
        pairs = [(str(p), Path(p)) for p in obj]
    for label, p in pairs:
        h.update(f"{label}|".encode())
        _hash_file(h, p, full)
    return "sha256:" + h.hexdigest()


def _hash_file(h: hashlib._Hash, path: Path, full: bool) -> None:
    if not path.is_file():
        raise WeightsError(f"cannot hash {path}: no such file")
    start = 0
    if path.suffix == ".safetensors":
        header = read_header(path)
        h.update(header.raw)
        start = header.data_start
    size = path.stat().st_size
    h.update(f"size={size}|".encode())
    with open(path, "rb") as f:
        if full:
            f.seek(start)
            while chunk := f.read(16 << 20):
                h.update(chunk)
            return
        span = size - start
        positions = (
            [start]
            if span <= _BLOCK * _BLOCKS
            else [start + i * (span - _BLOCK) // (_BLOCKS - 1) for i in range(_BLOCKS)]
        )
        for pos in positions:
            f.seek(pos)
            h.update(f.read(_BLOCK if span > _BLOCK * _BLOCKS else span))
