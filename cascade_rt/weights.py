"""Loading Stable Cascade weights strictly: official safetensors files and the diffusers layout (docs/reference.md §5).

Public API
* `load_stage(stage_or_preset, path, dtype=, device=)`: one model from an official file (`stage_c_bf16.safetensors`)
  or a diffusers component folder (`prior/`). The model is built on the `meta` device and filled one tensor at a
  time (each cast to `dtype` / moved to `device` as it is read), so a checkpoint is never held twice in memory.
  Before any tensor data is read, the header is checked: what the file is (stage, big or lite, layout) against what
  was asked, then missing / unexpected keys and shapes. Every problem is a `WeightsError` naming the fix.
* `find_weights(dir, lite=, dtype=)` -> {stage: path}; `load_pipeline_models(dir, lite=, dtype=, device=)` ->
  {'c', 'b', 'a', 'effnet', 'previewer'} models; `find_text_encoder(dir)`.
* `identify(shapes)`: what a set of checkpoint keys/shapes looks like (`Identity`); `check_compatible(...)`.
* `to_diffusers` / `from_diffusers` for state dicts (whole folders: `cascade_rt.convert`).
* `weights_hash(path_or_state_dict)` (see `cascade_rt.checkpoint_io.weights_hash` for what it covers).

Stages are named 'c', 'b', 'a', 'effnet', 'previewer'; `lite` is a bool (both denoisers) or a set such as {'b'}.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from cascade_rt.checkpoint_io import MappedSource, TensorSource, open_source, read_header, weights_hash
from cascade_rt.diffusers_format import (
    DIFFUSERS_FOLDERS,
    from_diffusers,
    guess_stage,
    open_component,
    read_config,
    to_diffusers,
)
from cascade_rt.errors import WeightsError
from cascade_rt.images import path_problem
from cascade_rt.models.presets import PRESETS, Preset, build_model, get_preset
from cascade_rt.stages import COMPONENTS, MODEL_SETS, STAGES, TITLES

__all__ = [
    "Identity", "identify", "check_compatible", "load_stage", "load_weights_into", "open_checkpoint",
    "find_weights", "find_text_encoder", "load_pipeline_models", "to_diffusers", "from_diffusers", "weights_hash",
    "read_header",
]

logger = logging.getLogger(__name__)

STEMS = {"c": "stage_c", "b": "stage_b", "a": "stage_a", "effnet": "effnet_encoder", "previewer": "previewer"}
# stage -> (detector key, shape index, {value: released preset}) (diffusers' single_file_utils uses the same keys)
DETECTORS = {
    "c": ("clip_txt_mapper.weight", 0, {2048: "stage_c", 1536: "stage_c_lite"}),
    "b": ("down_blocks.1.0.channelwise.0.weight", -1, {640: "stage_b", 576: "stage_b_lite"}),
}
DEFAULT_PRESET = MODEL_SETS["full"]  # a component's released (big) model
SIZES = {"stage_c": "big 3.6B", "stage_c_lite": "lite 1B", "stage_b": "big 1.5B", "stage_b_lite": "lite 700M"}


# ------------------------------------------------------------------------------------------ detection
@dataclass(frozen=True)
class Identity:
    """What a checkpoint looks like, judged from key names and a few shapes."""

    stage: str | None  # 'c', 'b', 'a', 'effnet', 'previewer', or None when not a Stable Cascade model
    preset: str | None  # the released preset whose width it has ('stage_c_lite', ...), else None
    layout: str  # 'official' or 'diffusers'
    text: str  # for messages, e.g. "Stage C lite 1B (clip_txt_mapper.weight is (1536, 1280))"


def identify(shapes: Mapping[str, Iterable[int]]) -> Identity:
    keys = set(shapes)
    diffusers = (
        any(".attention.to_" in k for k in keys)
        or "vquantizer.embedding.weight" in keys
        or ("clip_txt_pooled_mapper.weight" in keys and "effnet_mapper.0.weight" in keys)
    )
    layout = "diffusers" if diffusers else "official"
    stage = guess_stage(keys)
    if stage is None:
        if any(k.startswith("projections.") for k in keys):
            return Identity(None, None, layout, "a ControlNet checkpoint")
        if any(k.startswith("backbone.") for k in keys) and "mapper.0.weight" in keys:
            stage = "effnet"
        elif keys and all(k.startswith("blocks.") for k in keys):
            stage = "previewer"
        else:
            what = "a LoRA checkpoint" if any("lora" in k.lower() for k in keys) else "not a Stable Cascade model"
            return Identity(None, None, layout, f"{what} (keys like {', '.join(sorted(keys)[:3]) or 'none'})")
    preset, text = None, TITLES[stage]
    if stage in DETECTORS:
        key, dim, table = DETECTORS[stage]
        if key in shapes:
            shape = tuple(shapes[key])
            preset = table.get(shape[dim])
            text += f" {SIZES[preset]}" if preset else " of a non-released size"
            text += f" ({key} is {shape})"
    return Identity(stage, preset, layout, text + (", in the diffusers layout" if diffusers else ""))


@functools.lru_cache(maxsize=None)
def preset_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_model(name, device="meta").state_dict().items()}


def source_shapes(source: TensorSource) -> dict[str, tuple[int, ...]]:
    return {k: info.shape for k, info in source.infos.items()}


def _listing(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def check_compatible(expected: Mapping[str, tuple], found: Mapping[str, tuple], *, what: str, where: str) -> None:
    """Raise a WeightsError explaining why `found` (a checkpoint's shapes) cannot load into `expected` (a model's)."""
    exp, got = identify(expected), identify(found)
    if got.layout == "diffusers" and exp.layout == "official":
        raise WeightsError(
            f"{where} is {got.text} (keys such as '...attention.to_q.weight' instead of the official "
            f"'...attention.attn.in_proj_weight'), not an official checkpoint. Load its folder (the one with "
            f"config.json, e.g. prior/) instead, or convert it: cascade-rt convert --to official SRC DST"
        )
    if got.stage != exp.stage:
        fix = f"pass it where {TITLES[got.stage]} is expected, and " if got.stage else ""
        raise WeightsError(
            f"{where} is {got.text}, but {what} is {exp.text}: {fix}use a {TITLES[exp.stage]} checkpoint "
            f"({STEMS[exp.stage]}*.safetensors) here"
        )
    if exp.stage in DETECTORS and expected.get(DETECTORS[exp.stage][0]) != found.get(DETECTORS[exp.stage][0]):
        fix = (
            f"load it as preset '{got.preset}'" if got.preset else "build the model with the config it was trained with"
        )
        raise WeightsError(
            f"{where} is {got.text}, but {what} is {exp.text}: {fix} (--lite on the command line, lite=True/False "
            "in Python, picks the variant)"
        )
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad = [f"{k} (expected {tuple(expected[k])}, found {tuple(found[k])})" for k in expected
           if k in found and tuple(expected[k]) != tuple(found[k])]
    if missing or unexpected or bad:
        parts = [f"{len(missing)} missing keys: {_listing(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys: {_listing(unexpected)}"] if unexpected else []
        parts += [f"{len(bad)} shape mismatches: {_listing(bad)}"] if bad else []
        raise WeightsError(
            f"{where} does not fit {what} ({exp.text}): {'; '.join(parts)}. The file is from a different model "
            f"version or config; use the matching checkpoint or preset"
        )


def check_tensor_dtypes(expected: Mapping[str, torch.Tensor], source: TensorSource, *, what: str) -> None:
    """Every floating-point tensor of the model must be stored as a floating-point dtype: a float tensor stored
    as integers (a header relabelled, or not weights at all) would load as garbage values cast to float."""
    bad = sorted(f"{k} ({source.infos[k].dtype})" for k, ref in expected.items()
                 if k in source.infos and ref.is_floating_point() and not source.infos[k].dtype.is_floating_point)
    if bad:
        raise WeightsError(
            f"{source.name}: {len(bad)} tensors that are floating point in {what} are stored with an integer "
            f"dtype: {_listing(bad)}. The file's header was altered or it is not a Stable Cascade checkpoint; "
            "re-download or re-convert it"
        )


# ------------------------------------------------------------------------------------------ loading
def load_weights_into(model: nn.Module, source: TensorSource, *, dtype: torch.dtype, device, what: str) -> nn.Module:
    """Fill `model` (typically on 'meta') from `source` strictly, one tensor at a time; returns it in eval mode."""
    expected = model.state_dict()
    check_compatible(
        {k: tuple(v.shape) for k, v in expected.items()}, source_shapes(source), what=what, where=source.name
    )
    check_tensor_dtypes(expected, source, what=what)
    tensors = {}
    for k, ref in expected.items():
        t = source.get(k)
        # An owned allocation, never a view of the file: safetensors hands out tensors that point into the
        # memory-mapped file at any byte offset, and CPU kernels take other (differently rounded) paths on
        # unaligned data, so a loaded model would not compute what the same weights in memory compute. The copy
        # also frees the model from the file (it can be replaced or deleted while the model lives).
        owned = torch.empty(t.shape, dtype=dtype if ref.is_floating_point() else ref.dtype, device=device)
        tensors[k] = owned.copy_(t)
        del t
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer would stay on meta: a model bug, not a user error
        raise WeightsError(f"{what}: {_listing(left)} are not stored in checkpoints and were left unset")
    return model.eval().requires_grad_(False)


def open_checkpoint(path: str | Path) -> TensorSource:
    """An official checkpoint file as a TensorSource (header validated, no tensor data read yet).

    Official load_or_fail unwraps {'state_dict': ...}; flattened, that is a 'state_dict.' prefix on every key.
    """
    source, p = open_source(path), "state_dict."
    if source.infos and all(k.startswith(p) for k in source.infos):
        return MappedSource(source, {k[len(p) :]: ((k,), lambda t: t, lambda s: s) for k in source.infos})
    return source


def resolve_preset(stage_or_preset: str, shapes: Mapping[str, tuple], where: str) -> Preset:
    if stage_or_preset in PRESETS and stage_or_preset not in COMPONENTS:  # 'effnet', 'previewer' name both
        return get_preset(stage_or_preset)
    if stage_or_preset not in COMPONENTS:
        raise WeightsError(
            f"unknown stage or preset {stage_or_preset!r}: use one of {', '.join(COMPONENTS)} or {', '.join(PRESETS)}"
        )
    got = identify(shapes)
    if got.stage != stage_or_preset:  # let check_compatible explain it against the default preset
        return get_preset(DEFAULT_PRESET[stage_or_preset])
    if got.preset:
        return get_preset(got.preset)
    released = {name for _, _, table in DETECTORS.values() for name in table.values()}
    for p in PRESETS.values():  # e.g. the tiny presets (a released width would have been recognised above)
        if p.stage == stage_or_preset and p.name not in released and preset_shapes(p.name) == dict(shapes):
            return p
    if stage_or_preset in DETECTORS:
        raise WeightsError(f"{where} is {got.text}, which matches no preset; pass a preset name for it")
    return get_preset(DEFAULT_PRESET[stage_or_preset])


def load_stage(
    stage_or_preset: str, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load one model strictly from an official checkpoint file or a diffusers component folder.

    `stage_or_preset`: a preset name ('stage_c_lite', 'stage_b_tiny', ...), which the file must match, or a stage
    ('c', 'b', 'a', 'effnet', 'previewer'), in which case big vs lite (or the diffusers config) follows the file.
    """
    path = Path(path)
    problem = path_problem(path)
    if problem:
        raise WeightsError(f"{path} {problem}: download it (see find_weights for the expected names) or fix the path")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(
                f"{path} is a folder without config.json: pass a checkpoint file (e.g. stage_c_bf16.safetensors) "
                f"or a diffusers component folder (prior/, decoder/, vqgan/); for a whole weights folder use "
                f"load_pipeline_models"
            )
        stage, kwargs, source = open_component(path, dtype)
        preset = (
            get_preset(stage_or_preset) if stage_or_preset in PRESETS and stage_or_preset not in COMPONENTS else None
        )
        if (preset.stage if preset else stage_or_preset) != stage:
            want = TITLES.get(preset.stage if preset else stage_or_preset, stage_or_preset)
            raise WeightsError(f"{path}/config.json describes {TITLES[stage]}, not {want}: pass the folder of {want}")
        if preset:
            model = build_model(preset.name, device="meta")
        else:
            with torch.device("meta"):
                model = get_preset(DEFAULT_PRESET[stage]).cls(**kwargs)
            model.preset = identify(source_shapes(source)).preset  # a released size, or None (custom)
        if stage == "a":
            model.scale_factor = kwargs["scale_factor"]  # decode(x) multiplies by it, as the diffusers pipeline does
        what = f"preset '{preset.name}'" if preset else f"the model built from {path / 'config.json'}"
    else:
        source = open_checkpoint(path)
        preset = resolve_preset(stage_or_preset, source_shapes(source), str(path))
        model, what = build_model(preset.name, device="meta"), f"preset '{preset.name}'"
    with source:
        model = load_weights_into(model, source, dtype=dtype, device=device, what=what)
    logger.info("loaded %s from %s (%s, %s)", what, path, dtype, device)
    return model


# ------------------------------------------------------------------------------------------ weights folders
def _lite_set(lite: bool | Iterable[str]) -> set[str]:
    return {"b", "c"} if lite is True else set() if lite is False else set(lite)


def search_roots(weights_dir: Path) -> list[Path]:
    """The folder itself and sub-folders that are diffusers pipelines (stable-cascade-prior/, stable-cascade/)."""
    subs = sorted(p for p in weights_dir.iterdir() if p.is_dir() and (p / "model_index.json").is_file())
    return [weights_dir, *subs]


def official_names(stage: str, lite: bool, dtype: torch.dtype | None) -> list[str]:
    """Official file names for a stage, in order of preference (the file matching `dtype` first)."""
    stem = STEMS[stage] + ("_lite" if lite and stage in DETECTORS else "")
    if stage not in DETECTORS:
        return [f"{stem}.safetensors"]
    pair = [f"{stem}_bf16.safetensors", f"{stem}.safetensors"]
    return pair if dtype == torch.bfloat16 else pair[::-1]


def component_is_lite(stage: str, folder: Path) -> bool:
    if stage not in DETECTORS:
        return False
    widths = read_config(folder).get("block_out_channels") or [0, 0]
    return (widths[0] == 1536) if stage == "c" else (len(widths) > 1 and widths[1] == 576)


def _find_one(roots: list[Path], stage: str, lite: bool, dtype: torch.dtype | None, layout: str) -> Path | None:
    if layout in ("auto", "official"):
        for root in roots:
            for name in official_names(stage, lite, dtype):
                if (root / name).is_file():
                    return root / name
    if layout in ("auto", "diffusers") and stage in DIFFUSERS_FOLDERS:
        names = DIFFUSERS_FOLDERS[stage][::-1] if lite else DIFFUSERS_FOLDERS[stage]
        for root in roots:
            for name in names:
                folder = root / name
                if (folder / "config.json").is_file() and component_is_lite(stage, folder) == lite:
                    return folder
    return None


def find_weights(
    weights_dir: str | Path,
    lite: bool | Iterable[str] = False,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    layout: str = "auto",
) -> dict[str, Path]:
    """{stage: file or component folder} for every stage present, official names first (layout 'auto').

    Big vs lite is exact (a lite request never returns the big file); between fp32 and bf16 files the one matching
    `dtype` is preferred, the other is the fall-back. Sub-folders holding a model_index.json are searched too.
    """
    roots, lites = search_roots(_weights_dir(weights_dir)), _lite_set(lite)
    found = {s: _find_one(roots, s, s in lites, dtype, layout) for s in COMPONENTS}
    return {s: p for s, p in found.items() if p is not None}


def lite_fix(lite: bool, stage: str) -> str:
    """How to ask for the big (lite=False) or lite variant, in the CLI's words and in Python's."""
    cli = "pass --lite" if lite else "drop --lite"
    return f"{cli} on the command line (lite={lite} in Python; lite={{'{stage}'}} for Stage {stage.upper()} alone)"


def _weights_dir(weights_dir: str | Path) -> Path:
    root = Path(weights_dir)
    problem = path_problem(root)
    if problem:
        raise WeightsError(f"weights folder {root} {problem}; download the checkpoints there or fix the path")
    if not root.is_dir():
        raise WeightsError(
            f"weights folder {root} is a file: give the folder that holds the checkpoints (here {root.parent}), "
            "not a checkpoint file (load_stage loads one file)"
        )
    return root


def find_text_encoder(weights_dir: str | Path) -> Path | None:
    """The HF-layout `text_encoder/` folder (config.json + weights) inside a weights folder, if any."""
    return next(
        (r / "text_encoder" for r in search_roots(Path(weights_dir)) if (r / "text_encoder" / "config.json").is_file()),
        None,
    )


def _missing_message(root: Path, stage: str, lite: bool, dtype: torch.dtype | None, layout: str) -> str:
    roots = search_roots(root)
    variant = (" lite" if lite else " big") if stage in DETECTORS else ""
    looked = []
    if layout in ("auto", "official"):
        looked.append(f"{' or '.join(official_names(stage, lite, dtype))} (official layout)")
    if layout in ("auto", "diffusers") and stage in DIFFUSERS_FOLDERS:
        looked.append(f"{' or '.join(n + '/' for n in DIFFUSERS_FOLDERS[stage])} with config.json (diffusers layout)")
    broken = [f"{p} {problem}" for r in roots for n in official_names(stage, lite, dtype)
              if (p := r / n).is_symlink() and (problem := path_problem(p))]
    if broken:  # the file is there by name, as a link that leads nowhere: say so, not just "not found"
        return (f"{TITLES[stage]}{variant}: {'; '.join(broken)}. Point the link at the checkpoint file, or replace "
                "it with the file")
    msg = f"{TITLES[stage]}{variant} not found: looked for {' and '.join(looked)} in {', '.join(map(str, roots))}"
    other = _find_one(roots, stage, not lite, dtype, layout) if stage in DETECTORS else None
    if other:
        msg += f". Found the {'big' if lite else 'lite'} variant at {other}: {lite_fix(not lite, stage)} to use it"
    return msg + ". Download the missing checkpoint into that folder or point at the folder that has it"


def load_pipeline_models(
    weights_dir: str | Path,
    *,
    lite: bool | Iterable[str] = False,
    dtype: torch.dtype | Mapping[str, torch.dtype] = torch.bfloat16,
    device: str | torch.device = "cpu",
    stages: Iterable[str] = COMPONENTS,
    required: Iterable[str] = STAGES,
    presets: Mapping[str, str] | None = None,
    layout: str = "auto",
) -> dict[str, nn.Module]:
    """Load every stage present in a weights folder (official or diffusers layout, detected per stage).

    `dtype` is one dtype or {stage: dtype}; `presets` overrides the preset per stage (default: the released one for
    official files, config.json for diffusers folders). Missing `required` stages raise one WeightsError naming all.
    """
    root, lites, presets = _weights_dir(weights_dir), _lite_set(lite), dict(presets or {})
    dtypes = {s: dtype.get(s, torch.float32) if isinstance(dtype, Mapping) else dtype for s in COMPONENTS}
    stages, roots = list(stages), search_roots(root)
    found = {s: p for s in stages if (p := _find_one(roots, s, s in lites, dtypes[s], layout))}
    missing = [s for s in required if s in stages and s not in found]
    if missing:
        raise WeightsError("; ".join(_missing_message(root, s, s in lites, dtypes[s], layout) for s in missing))
    for s, path in found.items():  # a file named stage_c.safetensors may hold the lite model: check, cheaply
        if path.is_file() and s in DETECTORS and s not in presets:
            with open_checkpoint(path) as source:
                got = identify(source_shapes(source))
            if got.preset and got.preset.endswith("_lite") != (s in lites):
                asked = "--lite / lite=True" if s in lites else "no --lite / lite=False"
                raise WeightsError(
                    f"{path} is {got.text}, but {asked} asks for the other variant of {TITLES[s]}: "
                    f"{lite_fix(s not in lites, s)} or use the matching file"
                )
    return {s: load_stage(presets.get(s, s), path, dtype=dtypes[s], device=device) for s, path in found.items()}
