"""Whole-folder conversion between the official and the diffusers layout (the library side of `cascade-rt convert`).

* `convert_to_diffusers(src, dst)`: official files -> prior[_lite]/, decoder[_lite]/, vqgan/ (config.json +
  diffusion_pytorch_model[.bf16].safetensors, sharded above `max_shard_bytes`, as diffusers' save_pretrained does).
* `convert_to_official(src, dst)`: the reverse, named stage_c[_lite][_bf16].safetensors, stage_b..., stage_a.
Every input is checked against its model (`cascade_rt.weights.check_compatible`) before anything is written; tensors
are streamed one at a time and only renamed, split or concatenated, so a round trip is bit-exact.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterable

import torch

from cascade_rt.checkpoint_io import MappedSource, ShardedSource, write_safetensors
from cascade_rt.diffusers_format import (
    DEFAULT_SHARD_BYTES,
    DIFFUSERS_FOLDERS,
    config_to_kwargs,
    from_diffusers_plan,
    full_kwargs,
    read_config,
    variants_in,
    weight_files,
    write_component,
)
from cascade_rt.errors import WeightsError
from cascade_rt.models.presets import get_preset
from cascade_rt.weights import (
    DEFAULT_PRESET,
    DETECTORS,
    STEMS,
    check_compatible,
    component_is_lite,
    identify,
    open_checkpoint,
    preset_shapes,
    resolve_preset,
    search_roots,
    source_shapes,
)

logger = logging.getLogger(__name__)

COMPONENT_OF = {
    "stage_c": "prior",
    "stage_c_lite": "prior_lite",
    "stage_b": "decoder",
    "stage_b_lite": "decoder_lite",
    "stage_a": "vqgan",
}
EXTRAS = ("text_encoder", "tokenizer")  # folders copied as they are, in both directions
UNCONVERTED = ("effnet_encoder", "previewer")  # no diffusers class: the official files are copied as they are


def _extras(root: Path, dst: Path) -> list[tuple[Path, Path]]:
    names = [p.name for p in root.glob("*.safetensors") if p.stem.removesuffix("_bf16") in UNCONVERTED]
    return [(root / n, dst / n) for n in (*names, *EXTRAS) if (root / n).exists()]


def _prepare(dst: Path, targets: Iterable[Path], overwrite: bool) -> None:
    clash = [str(t) for t in targets if t.exists()]
    if clash and not overwrite:
        raise WeightsError(
            f"{', '.join(clash[:5])} already exist(s); choose an empty destination or pass overwrite=True (--overwrite)"
        )
    dst.mkdir(parents=True, exist_ok=True)


def _copy(pairs: list[tuple[Path, Path]]) -> list[Path]:
    for s, d in pairs:
        if s.is_dir():
            shutil.copytree(s, d, dirs_exist_ok=True)
        else:
            shutil.copy2(s, d)
    return [d for _, d in pairs]


def convert_to_diffusers(
    src: str | Path, dst: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False
) -> list[Path]:
    """Official checkpoints (a folder of them, or one file) -> the diffusers layout under `dst`.

    stage_c*/stage_b*/stage_a -> prior[_lite]/, decoder[_lite]/, vqgan/ (`*_bf16` files become the 'bf16' variant);
    effnet_encoder / previewer (no diffusers class) and text_encoder/, tokenizer/ are copied as they are.
    Big vs lite and the preset follow the file's shapes; fp32 vs bf16 its name (else its dtype).
    Every file is checked against its preset before anything is written.
    """
    src, dst = Path(src), Path(dst)
    files = (
        [src]
        if src.is_file()
        else sorted(p for p in src.glob("*.safetensors") if p.stem.removesuffix("_bf16") in COMPONENT_OF)
    )
    extras = _extras(src, dst) if src.is_dir() else []
    if not files and not extras:
        raise WeightsError(
            f"no official checkpoints in {src}: expected stage_c*.safetensors, stage_b*.safetensors, "
            f"stage_a.safetensors, ..."
        )
    plans = []
    for f in files:
        with open_checkpoint(f) as source:
            shapes, got = source_shapes(source), identify(source_shapes(source))
            if got.stage not in DIFFUSERS_FOLDERS:
                raise WeightsError(f"{f} is {got.text}; only Stage C, B and A have a diffusers layout")
            preset = resolve_preset(got.stage, shapes, str(f))
            check_compatible(preset_shapes(preset.name), shapes, what=f"preset '{preset.name}'", where=str(f))
            lite = preset.name.endswith("_lite") or (got.preset is None and "_lite" in f.stem)
            if f.stem.removesuffix("_bf16") in COMPONENT_OF:  # the official name says it
                bf16 = f.stem.endswith("_bf16")
            else:
                bf16 = next(iter(source.infos.values())).dtype == torch.bfloat16
        plans.append((f, got.stage, preset, dst / DIFFUSERS_FOLDERS[got.stage][int(lite)], "bf16" if bf16 else None))
    _prepare(dst, [p[3] for p in plans] + [d for _, d in extras], overwrite)
    written = _copy(extras)
    for f, stage, preset, folder, variant in plans:
        with open_checkpoint(f) as source:
            kwargs = full_kwargs(preset.cls, preset.kwargs)
            written += write_component(folder, stage, kwargs, source, variant=variant, max_shard_bytes=max_shard_bytes)
    return written


def convert_to_official(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> list[Path]:
    """A diffusers layout (or one component folder) -> official checkpoint files in `dst`, named by component and
    variant (prior_lite/ 'bf16' -> stage_c_lite_bf16.safetensors). Official files and text_encoder/ are copied."""
    src, dst = Path(src), Path(dst)
    if (src / "config.json").is_file():
        folders, roots = [src], []
    else:
        roots = search_roots(src) if src.is_dir() else []
        folders = [
            r / n for r in roots for names in DIFFUSERS_FOLDERS.values() for n in names
            if (r / n / "config.json").is_file()
        ]
    if not folders:
        raise WeightsError(
            f"no diffusers component folders in {src}: expected prior/, decoder/ or vqgan/ with config.json"
        )
    plans = []
    for folder in folders:
        stage, kwargs = config_to_kwargs(read_config(folder), str(folder / "config.json"))
        lite = folder.name.endswith("_lite") or component_is_lite(stage, folder)
        stem = STEMS[stage] + ("_lite" if lite and stage in DETECTORS else "")
        for variant in variants_in(folder):
            if variant not in (None, "bf16"):
                logger.warning(
                    "skipping the %r variant in %s: the official layout has fp32 and bf16 files only", variant, folder
                )
                continue
            plans.append((folder, stage, kwargs, variant, dst / f"{stem}{'_bf16' if variant else ''}.safetensors"))
    for folder, stage, kwargs, variant, _ in plans:  # check everything before writing anything
        with _open_component_variant(folder, stage, variant) as source:
            with torch.device("meta"):
                model = get_preset(DEFAULT_PRESET[stage]).cls(**kwargs)
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            built_from = f"the model built from {folder / 'config.json'}"
            check_compatible(expected, source_shapes(source), what=built_from, where=str(folder))
    extras = [pair for root in roots for pair in _extras(root, dst)]
    _prepare(dst, [p[-1] for p in plans] + [d for _, d in extras], overwrite)
    written = _copy(extras)
    for folder, stage, kwargs, variant, target in plans:
        if stage == "a" and kwargs["scale_factor"] != 0.43:
            scale = kwargs["scale_factor"]
            logger.warning("%s has scale_factor %s; official files carry none (official code uses 0.43)", folder, scale)
        with _open_component_variant(folder, stage, variant) as source:
            write_safetensors(target, source)
        written.append(target)
    return written


def _open_component_variant(folder: Path, stage: str, variant: str | None) -> MappedSource:
    """One variant of a diffusers component folder, under the official key names."""
    base = ShardedSource(weight_files(folder, variant), str(folder))
    return MappedSource(base, from_diffusers_plan(base.infos, stage))
