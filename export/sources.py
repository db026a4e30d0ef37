"""Where the eager model of an export comes from: a preset with random (seeded) weights, or a weights folder.

`load_source(...)` returns the model with its weights hash and a `weights_source` record that the manifest
keeps, so `cascade-rt engines verify` can rebuild the same eager model (`model_from_manifest`) and re-validate.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cascade_rt.checkpoint_io import weights_hash
from cascade_rt.errors import ConfigError, WeightsError
from cascade_rt.export.build import random_model
from cascade_rt.export.manifest import Manifest
from cascade_rt.export.specs import GRAPH_COMPONENT, PRECISIONS
from cascade_rt.models.text import TextEncoder
from cascade_rt.stages import RANDOM_SEED_OFFSETS
from cascade_rt.weights import find_text_encoder, find_weights, load_stage

logger = logging.getLogger(__name__)


@dataclass
class Source:
    model: nn.Module
    preset: str
    weights_hash: str
    record: dict[str, Any]


_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()
_CHUNK = 64 << 20


def model_fingerprint(model: nn.Module) -> str:
    """"model:<sha256>" of every tensor's name, dtype, shape and every byte of its data: the identity of an
    in-memory model's weights (engine cache keys). Changing any element changes it.

    CPU tensors are hashed in place (no copy); CUDA tensors travel to the host in 64 MiB chunks. The result is
    remembered per model while no tensor was replaced or modified in place (same storage address and autograd
    version counter), so the several engines of one model hash it once. Cost: about one pass over the weights
    at sha256 speed (benchmarks/load_weights.py measures it; docs/reliability.md has the figure).
    """
    state = model.state_dict(keep_vars=True)
    key = tuple((k, t.data_ptr(), t._version, str(t.device), t.dtype) for k, t in state.items())
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256(b"cascade-rt model fingerprint v2")
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        for i in range(0, flat.numel(), _CHUNK):
            h.update(flat[i : i + _CHUNK].cpu().numpy())
    digest = "model:" + h.hexdigest()
    _FINGERPRINTS[model] = (key, digest)
    return digest


def random_source(stage: str, preset: str, precision: str, seed: int = 0) -> Source:
    """The stage's model with the random weights `load_pipeline(random_weights=True, seed=seed)` builds for it
    (per-component seed offsets: `stages.RANDOM_SEED_OFFSETS`), so exported engines serve `generate`."""
    component_seed = seed + RANDOM_SEED_OFFSETS[GRAPH_COMPONENT[stage]]
    model = random_model(preset, precision, seed=component_seed, device="cpu")
    return Source(model, preset, model_fingerprint(model), {"random_seed": component_seed})


def weights_source(stage: str, weights_dir: str | Path, precision: str, *, lite: bool = False) -> Source:
    """The stage's checkpoint from an official (or diffusers-layout) weights folder."""
    family, dtype = GRAPH_COMPONENT[stage], PRECISIONS[precision]
    if family == "text":
        path = find_text_encoder(weights_dir)
        if path is None:
            raise WeightsError(f"no text_encoder/ folder (HF layout) in {weights_dir}: download it or pick stages")
        model = TextEncoder.from_pretrained(path, dtype=dtype)
        preset = "text" if model.config.width == 1280 else "text_custom"
    else:
        found = find_weights(weights_dir, lite=lite, dtype=dtype)
        if family not in found:
            variant = "lite (--lite, lite=True)" if lite else "big (without --lite, lite=False)"
            raise WeightsError(f"no {family!r} checkpoint of the {variant} models in {weights_dir}")
        path = found[family]
        model = load_stage(family, path, dtype=dtype)
        preset = preset_of(model)
    return Source(model, preset, weights_hash(path, full=True), {"weights": str(Path(path).resolve())})


def model_from_manifest(m: Manifest) -> nn.Module:
    """The eager model an engine was built from, for re-validation."""
    if m.extensions:  # LoRAs merged / a ControlNet variant: the base weights alone are not what was exported
        raise ConfigError(
            f"{m.engine_file} was built with extensions {sorted(m.extensions)} (docs/extensions.md); re-validate it "
            "by loading the pipeline with the same --lora/--controlnet options (the runtime checks its manifest)"
        )
    src = (m.build or {}).get("weights_source") or {}
    if "random_seed" in src:
        return random_model(m.preset, m.precision, seed=int(src["random_seed"]), device="cpu")
    if "weights" in src:
        path = Path(src["weights"])
        if not path.exists() or weights_hash(path, full=True) != m.weights_hash:
            raise WeightsError(f"the weights this engine was built from ({path}) are missing or changed")
        if GRAPH_COMPONENT[m.stage] == "text":
            return TextEncoder.from_pretrained(path, dtype=PRECISIONS[m.precision])

        return load_stage(GRAPH_COMPONENT[m.stage], path, dtype=PRECISIONS[m.precision])
    raise ConfigError("the manifest does not say which weights the engine was built from")


def _signature(model: nn.Module) -> tuple:
    return type(model).__name__, tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


@functools.lru_cache(maxsize=None)
def _preset_signature(preset: str) -> tuple:
    return _signature(random_model(preset, "fp32", device="meta"))


def preset_of(model: nn.Module) -> str:
    """The preset `model` was built as (`build_model`, `build_text_encoder` and the weight loaders set
    `model.preset`), if its architecture (state-dict names and shapes) is still that preset's; else
    'custom-<hash of the architecture>'."""
    sig, name = _signature(model), getattr(model, "preset", None)
    if isinstance(name, str) and _preset_signature(name) == sig:
        return name
    return "custom-" + hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:10]
