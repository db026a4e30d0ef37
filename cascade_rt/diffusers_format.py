"""The diffusers layout of Stable Cascade (docs/reference.md §8.1): key mapping, config mapping, component folders.

A component folder (`prior/`, `prior_lite/`, `decoder/`, `decoder_lite/`, `vqgan/`) holds `config.json` and
`diffusion_pytorch_model[.<variant>].safetensors`, or shards listed by
`diffusion_pytorch_model.safetensors.index[.<variant>].json`. Keys differ from the official ones only in
* attention: official `...attention.attn.in_proj_{weight,bias}` (rows q; k; v) <-> `...attention.to_{q,k,v}.*`,
  and `...attention.attn.out_proj.*` <-> `...attention.to_out.0.*`;
* Stage B: official `clip_mapper.*` <-> `clip_txt_pooled_mapper.*`;
* Stage A: official `vquantizer.codebook.weight` <-> `vquantizer.embedding.weight` (PaellaVQModel); the
  MixingResidualBlock keys equal the official Stage A ResBlock keys.
Everything else, shapes and layouts included, is identical. Conversions are exact (split / cat / rename only).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from cascade_rt.checkpoint_io import MappedSource, ShardedSource, StateDictSource, TensorSource, write_safetensors
from cascade_rt.errors import WeightsError

WEIGHTS_NAME = "diffusion_pytorch_model"
DIFFUSERS_FOLDERS = {"c": ("prior", "prior_lite"), "b": ("decoder", "decoder_lite"), "a": ("vqgan",)}
CLASS_NAMES = {"c": "StableCascadeUNet", "b": "StableCascadeUNet", "a": "PaellaVQModel"}
BLOCK_TYPES = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}
LETTERS = {v: k for k, v in BLOCK_TYPES.items()}
DEFAULT_SHARD_BYTES = 10 * 1000**3  # diffusers' default max_shard_size ("10GB")

_IN_PROJ = re.compile(r"^(.*\.attention)\.attn\.in_proj_(weight|bias)$")
_OUT_PROJ = re.compile(r"^(.*\.attention)\.attn\.out_proj\.(weight|bias)$")
_TO_QKV = re.compile(r"^(.*\.attention)\.to_([qkv])\.(weight|bias)$")
_TO_OUT = re.compile(r"^(.*\.attention)\.to_out\.0\.(weight|bias)$")


def guess_stage(keys: Iterable[str]) -> str | None:
    """'c', 'b' or 'a' from key names of either layout (None if none fits)."""
    keys = set(keys)
    if any(k.startswith("effnet_mapper.") for k in keys) or "clip_mapper.weight" in keys:
        return "b"
    if "clip_txt_mapper.weight" in keys:
        return "c"
    if {"vquantizer.codebook.weight", "vquantizer.embedding.weight"} & keys or "in_block.1.weight" in keys:
        return "a"
    return None


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t


def _same(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape


def to_diffusers_plan(keys: Iterable[str]) -> dict[str, tuple]:
    """out key -> (official keys, fn, shape_fn): the official -> diffusers mapping, from key names alone."""
    plan: dict[str, tuple] = {}
    for k in keys:
        if m := _IN_PROJ.match(k):
            for i, n in enumerate("qkv"):
                plan[f"{m[1]}.to_{n}.{m[2]}"] = (
                    (k,),
                    lambda t, i=i: t.chunk(3, dim=0)[i].clone(),
                    lambda s: (s[0] // 3, *s[1:]),
                )
            continue
        if m := _OUT_PROJ.match(k):
            out = f"{m[1]}.to_out.0.{m[2]}"
        elif k.startswith("clip_mapper."):
            out = "clip_txt_pooled_mapper." + k[len("clip_mapper.") :]
        elif k == "vquantizer.codebook.weight":
            out = "vquantizer.embedding.weight"
        else:
            out = k
        plan[out] = ((k,), _copy, _same)
    return plan


def from_diffusers_plan(keys: Iterable[str], stage: str | None = None) -> dict[str, tuple]:
    """out key -> (diffusers keys, fn, shape_fn): the diffusers -> official mapping (q, k, v concatenated)."""
    keys = list(keys)
    stage = stage or guess_stage(keys)
    plan: dict[str, tuple] = {}
    for k in keys:
        if m := _TO_QKV.match(k):
            out = f"{m[1]}.attn.in_proj_{m[3]}"
            if m[2] == "q":
                srcs = tuple(f"{m[1]}.to_{n}.{m[3]}" for n in "qkv")
                missing = [s for s in srcs if s not in keys]
                if missing:
                    raise WeightsError(
                        f"diffusers weights have {k} but not {', '.join(missing)}: "
                        f"the file is incomplete; re-download it"
                    )
                plan[out] = (
                    srcs,
                    lambda q, k_, v: torch.cat([q, k_, v], dim=0),
                    lambda *s: (sum(x[0] for x in s), *s[0][1:]),
                )
            continue
        if m := _TO_OUT.match(k):
            out = f"{m[1]}.attn.out_proj.{m[2]}"
        elif stage == "b" and k.startswith("clip_txt_pooled_mapper."):
            out = "clip_mapper." + k[len("clip_txt_pooled_mapper.") :]
        elif k == "vquantizer.embedding.weight":
            out = "vquantizer.codebook.weight"
        else:
            out = k
        plan[out] = ((k,), _copy, _same)
    return plan


def to_diffusers(state_dict: Mapping[str, torch.Tensor], stage: str | None = None) -> dict[str, torch.Tensor]:
    """Official state dict (Stage C, B or A) -> diffusers keys. Exact: tensors are split or passed through.

    The mapping follows from the key names; `stage`, if given, is checked against them.
    """
    if stage is not None and guess_stage(state_dict) not in (stage, None):
        raise WeightsError(
            f"these weights look like Stage {guess_stage(state_dict).upper()}, not Stage {stage.upper()}"
        )
    src = MappedSource(StateDictSource(state_dict), to_diffusers_plan(state_dict))
    return {k: src.get(k) for k in src.infos}


def from_diffusers(state_dict: Mapping[str, torch.Tensor], stage: str | None = None) -> dict[str, torch.Tensor]:
    """diffusers state dict -> official keys (stage 'c', 'b' or 'a'; guessed from the keys when None)."""
    src = MappedSource(StateDictSource(state_dict), from_diffusers_plan(state_dict, stage))
    return {k: src.get(k) for k in src.infos}


# ------------------------------------------------------------------------------------------ configs
def full_kwargs(cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor defaults of `cls` updated with `kwargs` (tuples as lists, as JSON has them)."""
    out = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    out.update(kwargs)
    listify = lambda v: [listify(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return {k: listify(v) for k, v in out.items()}


def kwargs_to_config(stage: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Our (= official) constructor kwargs, complete, -> a diffusers config.json dict."""
    k = kwargs
    if stage == "a":
        cfg = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=k["levels"],
                   bottleneck_blocks=k["bottleneck_blocks"], embed_dim=k["c_hidden"], latent_channels=k["c_latent"],
                   num_vq_embeddings=k["codebook_size"], scale_factor=k["scale_factor"])
    else:
        if any(c not in BLOCK_TYPES for lc in k["level_config"] for c in lc):
            raise WeightsError(
                f"level_config {k['level_config']} has a block type diffusers cannot express (only C, T, A)"
            )
        cfg = dict(
            in_channels=k["c_in"], out_channels=k["c_out"], timestep_ratio_embedding_dim=k["c_r"],
            patch_size=k["patch_size"], conditioning_dim=k["c_cond"], block_out_channels=k["c_hidden"],
            num_attention_heads=[0 if h == -1 else h for h in k["nhead"]],
            down_num_layers_per_block=k["blocks"][0], up_num_layers_per_block=k["blocks"][1],
            down_blocks_repeat_mappers=k["block_repeat"][0], up_blocks_repeat_mappers=k["block_repeat"][1],
            block_types_per_layer=[[BLOCK_TYPES[c] for c in lc] for lc in k["level_config"]],
            clip_text_in_channels=k["c_clip_text"] if stage == "c" else None,
            clip_text_pooled_in_channels=k["c_clip_text_pooled"] if stage == "c" else k["c_clip"],
            clip_image_in_channels=k["c_clip_img"] if stage == "c" else None, clip_seq=k["c_clip_seq"],
            effnet_in_channels=k["c_effnet"] if stage == "b" else None,
            pixel_mapper_in_channels=k["c_pixels"] if stage == "b" else None,
            kernel_size=k["kernel_size"], dropout=k["dropout"], self_attn=k["self_attn"],
            timestep_conditioning_type=k["t_conds"], switch_level=k["switch_level"] if stage == "c" else None,
        )
    return {"_class_name": CLASS_NAMES[stage], "_diffusers_version": "0.27.0", **cfg}


def config_to_kwargs(config: Mapping[str, Any], where: str = "config.json") -> tuple[str, dict[str, Any]]:
    """A diffusers config.json dict -> (stage, our constructor kwargs)."""
    c = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        if config.get("_class_name") == "PaellaVQModel" or "num_vq_embeddings" in c:
            if (c.get("in_channels", 3), c.get("out_channels", 3), c.get("up_down_scale_factor", 2)) != (3, 3, 2):
                raise WeightsError(f"{where}: only RGB PaellaVQModels with up_down_scale_factor 2 are supported")
            return "a", dict(levels=c["levels"], bottleneck_blocks=c["bottleneck_blocks"], c_hidden=c["embed_dim"],
                             c_latent=c["latent_channels"], codebook_size=c["num_vq_embeddings"],
                             scale_factor=c["scale_factor"])
        stage = "b" if c.get("effnet_in_channels") is not None else "c"
        self_attn = c.get("self_attn", True)
        if isinstance(self_attn, list):
            if len(set(self_attn)) != 1:
                raise WeightsError(
                    f"{where}: per-level self_attn {self_attn} is not supported (the official classes take one bool)"
                )
            self_attn = self_attn[0]
        kw = dict(
            c_in=c["in_channels"], c_out=c["out_channels"], c_r=c.get("timestep_ratio_embedding_dim", 64),
            patch_size=c["patch_size"], c_cond=c["conditioning_dim"], c_hidden=list(c["block_out_channels"]),
            nhead=[-1 if h == 0 else h for h in c["num_attention_heads"]],
            blocks=[list(c["down_num_layers_per_block"]), list(c["up_num_layers_per_block"])],
            block_repeat=[list(c["down_blocks_repeat_mappers"]), list(c["up_blocks_repeat_mappers"])],
            level_config=["".join(LETTERS[t] for t in types) for types in c["block_types_per_layer"]],
            c_clip_seq=c.get("clip_seq", 4), kernel_size=c.get("kernel_size", 3), dropout=list(c["dropout"]),
            self_attn=self_attn, t_conds=list(c["timestep_conditioning_type"]),
        )
        if stage == "c":
            kw.update(c_clip_text=c["clip_text_in_channels"], c_clip_text_pooled=c["clip_text_pooled_in_channels"],
                      c_clip_img=c["clip_image_in_channels"], switch_level=c.get("switch_level"))
        else:
            kw.update(c_clip=c["clip_text_pooled_in_channels"], c_effnet=c["effnet_in_channels"],
                      c_pixels=c["pixel_mapper_in_channels"])
        return stage, kw
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(
            f"{where} is not a Stable Cascade UNet / PaellaVQModel config ({type(exc).__name__}: {exc}); "
            f"point at the prior/, decoder/ or vqgan/ folder of a diffusers download"
        ) from None


def read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {folder / 'config.json'} ({exc}); re-download the folder") from None


# ------------------------------------------------------------------------------------------ component folders
def _names(variant: str | None) -> tuple[str, str]:
    v = f".{variant}" if variant else ""
    return f"{WEIGHTS_NAME}{v}.safetensors", f"{WEIGHTS_NAME}.safetensors.index{v}.json"


def variants_in(folder: Path) -> list[str | None]:
    """Weight variants present in a component folder: None (plain) and/or e.g. 'bf16', 'fp16'."""
    pat = re.compile(
        rf"^{WEIGHTS_NAME}(?:\.(\w+))?\.safetensors$|^{WEIGHTS_NAME}\.safetensors\.index(?:\.(\w+))?\.json$"
    )
    found = {m[1] or m[2] for p in folder.iterdir() if (m := pat.match(p.name))}
    return sorted(found, key=lambda v: (v is not None, v or ""))


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files of one variant (one file, or the shards its index lists, all checked to exist)."""
    single, index = (folder / n for n in _names(variant))
    if single.is_file():
        return [single]
    if not index.is_file():
        raise WeightsError(f"{folder} has no {single.name} or {index.name}; re-download the folder")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{index} is not a valid shard index ({exc}); re-download it") from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise WeightsError(f"{index} lists shards that are not there: {', '.join(missing)}; download every shard")
    return [folder / s for s in shards]


def pick_variant(folder: Path, dtype: torch.dtype | None) -> str | None:
    """The variant to read for `dtype`: bf16 files for bf16, plain (usually fp32) files otherwise, else any."""
    present = variants_in(folder)
    if not present:
        raise WeightsError(f"{folder} has config.json but no {WEIGHTS_NAME}*.safetensors; re-download the folder")
    order = ["bf16", None] if dtype == torch.bfloat16 else [None, "bf16"]
    return next((v for v in order if v in present), present[0])


def open_component(folder: Path, dtype: torch.dtype | None = None) -> tuple[str, dict[str, Any], TensorSource]:
    """(stage, our kwargs, a source with OFFICIAL key names) for a diffusers component folder."""
    stage, kwargs = config_to_kwargs(read_config(folder), str(folder / "config.json"))
    files = weight_files(folder, pick_variant(folder, dtype))
    base = ShardedSource(files, str(folder))
    return stage, kwargs, MappedSource(base, from_diffusers_plan(base.infos, stage))


def write_component(
    folder: Path,
    stage: str,
    kwargs: Mapping[str, Any],
    source: TensorSource,
    *,
    variant: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write an official-key `source` as a diffusers component folder (config.json + weights, sharded if large)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(kwargs_to_config(stage, kwargs), indent=2, sort_keys=True) + "\n")
    out = MappedSource(source, to_diffusers_plan(source.infos))
    shards: list[list[str]] = [[]]
    size = 0
    for k in sorted(out.infos):
        nbytes = out.infos[k].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    single, index = _names(variant)
    if len(shards) == 1:
        write_safetensors(folder / single, out)
        return [folder / single]
    v = f".{variant}" if variant else ""
    names = [f"{WEIGHTS_NAME}{v}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards, strict=True):
        write_safetensors(folder / name, out, keys)
    weight_map = {k: name for name, keys in zip(names, shards, strict=True) for k in keys}
    total = sum(info.nbytes for info in out.infos.values())
    (folder / index).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    )
    return [folder / n for n in names]
