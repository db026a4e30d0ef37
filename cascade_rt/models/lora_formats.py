"""Stage C LoRAs saved in the diffusers/PEFT and kohya-style key layouts, converted onto the official LoRA targets.

Trainers other than the official one write Stage C LoRAs on one of two module namings of the same network, which
differ from the official one only inside the attention (for an attention block `B`, e.g. `down_blocks.0.2`):
* diffusers' `StableCascadeUNet` (PEFT, diffusers scripts, OneTrainer internally): `B.attention.to_q`, `to_k`,
  `to_v` (Linear c -> c each) and `B.attention.to_out.0`;
* the official classes with the attention split into Linear layers (kohya sd-scripts' Stable Cascade branch,
  ComfyUI, the files OneTrainer saves): `B.attention.attn.to_q`, `to_k`, `to_v` and `B.attention.attn.out_proj`;
  OneTrainer's OMI names say `B.attention.attn.in_proj.0`, `.1`, `.2` for q, k, v.
The official model holds q, k, v in one `nn.MultiheadAttention.in_proj_weight` = [Wq; Wk; Wv] (3c x c), and the
output projection in `attn.out_proj`: the official LoRA targets (`lora.lora_targets`, filter '.attn').

Key layouts read (module name `M` in either naming, with the prefixes these tools add):
* PEFT / diffusers: `[base_model.model.|prior.|unet.|transformer.]M.lora_A[.<adapter>].weight` (r, in) and
  `...lora_B...` (out, r); old diffusers `M.lora.down.weight` / `M.lora.up.weight`.
* kohya: `lora_unet_<M with _ for .>.lora_down.weight` / `.lora_up.weight` (sd-scripts), `lora_prior_unet_...`
  (OneTrainer); the dotted `lora_prior_unet.M...` too. OMI: `unet.M.lora_down.weight`.

alpha (the update is `scale * alpha / r * B @ A`, r = the rows of A), per layer, first found of:
1. a scalar `M.alpha` tensor (kohya, OneTrainer; diffusers' network alphas);
2. LoRA config in the safetensors header (`lora_adapter_metadata`, what diffusers' `save_lora_weights` writes;
   its keys may carry the component prefix: `unet.lora_alpha`);
3. `adapter_config.json` next to the file (PEFT `save_pretrained`);
   from 2 and 3: `alpha_pattern` (PEFT's suffix match on the module name), else `lora_alpha`; `use_rslora`
   makes it `alpha / sqrt(r)`; DoRA and LoRA biases are refused (not a `W + B @ A` update);
4. alpha = r (kohya's and diffusers' default: the plain `B @ A`).

Conversion (rows and columns are placed; nothing is approximated, only the alpha / r and R factors round): the q,
k, v LoRAs of a block become one LoRA of `in_proj_weight` with `lora_down` = [A_q; A_k; A_v] and `lora_up` the
block-diagonal of the B's, each times its alpha / r (a component the file lacks contributes nothing); `to_out.0` /
`out_proj` maps to `attn.out_proj`. Every layer is then zero-padded to one rank R (the largest such combined rank;
zeros for the targets the file does not touch) and `lora_up` multiplied by R, so the result is an official LoRA
(alpha 1, one rank): merging, engines' manifests and switching treat it like any other, and `save_lora` writes it as
an official file.

LoRAs on other layers (feed-forward, convolutions, mappers, `kv_mapper`) or on the text encoder are refused with
their names, not dropped: the official LoRA, and so `LoRAMerger`, patches the attention layers only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cascade_rt.errors import WeightsError
from cascade_rt.models.lora import LoRA, LoRATarget, LoRAWeights, lora_targets

_PARTS = (  # key suffix -> role; the module name is what precedes it
    (re.compile(r"^(?P<m>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight$"), "PEFT/diffusers"),
    (re.compile(r"^(?P<m>.+)\.lora_(?P<ab>down|up)\.weight$"), "kohya"),
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<ab>down|up)\.weight$"), "diffusers (old)"),
)
_ALPHA = re.compile(r"^(?P<m>.+)\.alpha$")
_ROLE = {"A": "down", "B": "up", "down": "down", "up": "up"}
_UNSUPPORTED = (  # key fragment -> what it is
    ("lora_magnitude_vector", "DoRA (a magnitude vector per layer)"), ("dora_scale", "DoRA (a magnitude per layer)"),
    ("hada_", "LyCORIS LoHa"), ("lokr_", "LyCORIS LoKr"), ("bundle_emb.", "bundled textual-inversion embeddings"),
)
_UNET_PREFIXES = ("base_model.model.", "lora_prior_unet_", "lora_prior_unet.", "lora_unet_", "lora_unet.",
                  "model.diffusion_model.", "diffusion_model.", "prior.", "unet.", "transformer.")
_TE_PREFIXES = ("lora_prior_te_", "lora_prior_te.", "lora_te_", "lora_te1_", "lora_te2_", "text_encoder.",
                "text_encoder_2.", "te.", "clip_g.")
_ATTN = re.compile(r"^(?P<side>down|up)_blocks_(?P<level>\d+)_(?P<index>\d+)_attention_(?:attn_)?"
                   r"(?P<proj>to_q|to_k|to_v|in_proj_0|in_proj_1|in_proj_2|to_out_0|out_proj)$")
_PROJ = {"to_q": 0, "in_proj_0": 0, "to_k": 1, "in_proj_1": 1, "to_v": 2, "in_proj_2": 2,
         "to_out_0": "out", "out_proj": "out"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class ForeignLayer:
    """One low-rank layer of a foreign file: `name` as the file spells it, `down` (r, in), `up` (out, r)."""

    name: str
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


# ------------------------------------------------------------------------------------------ reading the keys
def parse_foreign(state: Mapping[str, Tensor], where: str) -> tuple[str, dict[str, ForeignLayer]] | None:
    """(layout name, layers by module name) for a LoRA state dict of a known foreign layout; None if no key looks
    like one. Raises WeightsError for LoRA variants that are not a plain `B @ A` and for keys of no layout."""
    layouts, layers, unknown, adapters = set(), {}, [], set()
    for key, tensor in state.items():
        bad = next((what for frag, what in _UNSUPPORTED if frag in key), None)
        if bad:
            raise WeightsError(f"{where} is a {bad} file ({key}); cascade-rt loads plain LoRAs (W + B @ A) only")
        if m := _ALPHA.match(key):
            layers.setdefault(m["m"], ForeignLayer(m["m"])).alpha = float(tensor.float().reshape(-1)[0])
            continue
        for pattern, layout in _PARTS:
            if m := pattern.match(key):
                layouts.add(layout)
                if m.groupdict().get("adapter"):
                    adapters.add(m["adapter"])
                setattr(layers.setdefault(m["m"], ForeignLayer(m["m"])), _ROLE[m["ab"]], tensor)
                break
        else:
            unknown.append(key)
    if not layouts:
        return None
    if unknown:
        what = "LoRA biases (PEFT lora_bias)" if any(".lora_" in k and k.endswith(".bias") for k in unknown) else (
            "keys of no LoRA layout")
        raise WeightsError(f"{where} has {what}: {', '.join(sorted(unknown)[:3])}; cascade-rt loads plain LoRAs "
                           "(lora_A/lora_B, lora_down/lora_up, alpha) only")
    if len(adapters) > 1:
        raise WeightsError(f"{where} holds several PEFT adapters ({sorted(adapters)}); save one adapter per file")
    return " + ".join(sorted(layouts)), layers


def _strip(name: str) -> tuple[str, str]:
    """('unet' or 'te', the module path with '_' for '.') with the trainer's prefixes removed."""
    for prefix in _TE_PREFIXES:
        if name.startswith(prefix):
            return "te", name[len(prefix):].replace(".", "_")
    while prefix := next((p for p in _UNET_PREFIXES if name.startswith(p)), None):  # e.g. prior.base_model.model.
        name = name[len(prefix):]
    return "unet", name.replace(".", "_")


# ------------------------------------------------------------------------------------------ alpha
def read_lora_config(where: str) -> tuple[dict | None, str]:
    """The PEFT LoRA config that applies to the file at `where` (header metadata, else adapter_config.json next to
    it) and the text it came from ('' if none)."""
    path = Path(where)
    if not path.is_file():
        return None, ""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw:
            try:
                config = json.loads(raw)
            except ValueError as exc:
                raise WeightsError(f"{where}: its {METADATA_KEY} header is not valid JSON ({exc})") from None
            prefixed = {k.split(".", 1)[0] for k in config if "." in k}
            comp = next((p for p in ("prior", "unet", "transformer") if p in prefixed), None)
            if comp:  # a pipeline's save_lora_weights: "<component>.<field>"
                config = {k[len(comp) + 1:]: v for k, v in config.items() if k.startswith(comp + ".")}
            return config, raw
    cfg = path.with_name(ADAPTER_CONFIG)
    if cfg.is_file():
        raw = cfg.read_text()
        try:
            return json.loads(raw), raw
        except ValueError as exc:
            raise WeightsError(f"{cfg} is not valid JSON ({exc}); fix or remove it") from None
    return None, ""


def _pattern_value(patterns: Mapping[str, float], module: str) -> float | None:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it (at a '.')."""
    for key, value in patterns.items():
        if re.match(rf"(?:^|.*\.)(?:{key})$", module):
            return float(value)
    return None


def layer_scale(layer: ForeignLayer, config: Mapping | None) -> float:
    """alpha / r for one layer (alpha / sqrt(r) under PEFT's use_rslora)."""
    r, alpha, rslora = layer.rank, layer.alpha, False
    if alpha is None and config is not None:
        alpha = _pattern_value(config.get("alpha_pattern") or {}, layer.name.removeprefix("base_model.model."))
        alpha = float(config["lora_alpha"]) if alpha is None and "lora_alpha" in config else alpha
        rslora = bool(config.get("use_rslora"))
    alpha = float(r) if alpha is None else alpha
    return alpha / math.sqrt(r) if rslora else alpha / r


# ------------------------------------------------------------------------------------------ converting
def _classify(layers: Mapping[str, ForeignLayer], model: nn.Module) -> tuple[dict, list[str], list[str], list[str]]:
    """(attention slots {(block, q|k|v|out): layer}, text-encoder names, other Stage C module names, unknown)."""
    modules = {name.replace(".", "_") for name, _ in model.named_modules() if name}
    slots, te, other, unknown = {}, [], [], []
    for name, layer in layers.items():
        kind, path = _strip(name)
        m = _ATTN.match(path)
        block = f"{m['side']}_blocks.{m['level']}.{m['index']}" if m else ""
        if kind == "te":
            te.append(name)
        elif m and f"{block}.attention.attn".replace(".", "_") in modules:
            slot = (block, _PROJ[m["proj"]])
            if slot in slots:
                raise WeightsError(f"{name} and {slots[slot].name} are LoRAs of the same layer; keep one")
            slots[slot] = layer
        elif path in modules:
            other.append(name)
        else:
            unknown.append(name)
    return slots, sorted(te), sorted(other), sorted(unknown)


def _check_targets(where: str, layout: str, model: nn.Module, layers: Mapping[str, ForeignLayer]) -> dict:
    slots, te, other, unknown = _classify(layers, model)
    kind = type(model).__name__
    if unknown:
        raise WeightsError(
            f"{where} has the {layout} LoRA layout, but {unknown[0]!r} ({len(unknown)} of its {len(layers)} layers) "
            f"matches no layer of this {kind}: the LoRA was trained for another model (e.g. Stable Diffusion or "
            "Stage B); use a Stable Cascade Stage C LoRA"
        )
    if te or other:
        parts = ([f"{len(te)} on the text encoder (e.g. {', '.join(te[:2])})"] if te else []) + (
            [f"{len(other)} outside the attention layers (e.g. {', '.join(other[:3])})"] if other else [])
        raise WeightsError(
            f"{where} has LoRA layers cascade-rt cannot apply: {'; '.join(parts)}. Only attention-layer LoRAs "
            "(to_q/to_k/to_v/to_out.0, or attn_to_q/.../attn_out_proj) map onto the official LoRA targets (each "
            "attention's in_proj_weight and out_proj); use a LoRA trained on the attention layers only"
        )
    return slots


def _target_delta(target: LoRATarget, parts: Sequence[tuple[ForeignLayer, int]], scales: Mapping[str, float],
                  where: str) -> tuple[Tensor, Tensor]:
    """(down, up) of one official target from the file's layers `parts` ((layer, row block): 0, 1, 2 = q, k, v of
    an in_proj_weight, 0 for an out_proj), each layer's alpha / r folded into its block of `up`."""
    out_f, in_f = target.shape[:2]
    rows = out_f // 3 if target.param == "in_proj_weight" else out_f
    downs, ups = [], []
    for layer, i in parts:
        down, up = layer.down.float(), layer.up.float()
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise WeightsError(f"{where}: LoRA layer {layer.name} has matrices {tuple(down.shape)} and "
                               f"{tuple(up.shape)}, not (r, in) and (out, r); the file is corrupt or not a linear LoRA")
        if (down.shape[1], up.shape[0]) != (in_f, rows):
            raise WeightsError(
                f"{where}: LoRA layer {layer.name} maps {down.shape[1]} -> {up.shape[0]} features, but that layer of "
                f"this Stage C ({target.name}) maps {in_f} -> {rows}: the LoRA was trained for another model (e.g. "
                "the 3.6B vs the lite Stage C); use the Stage C it was trained on"
            )
        block = torch.zeros(out_f, layer.rank)
        block[i * rows:(i + 1) * rows] = up * scales[layer.name]
        downs.append(down)
        ups.append(block)
    return torch.cat(downs, 0), torch.cat(ups, 1)


def convert_foreign(
    state: Mapping[str, Tensor],
    model: nn.Module,
    *,
    where: str = "<memory>",
    digest: str = "",
    scale: float = 1.0,
    rank: int | None = None,
    filters: Sequence[str],
) -> LoRAWeights | None:
    """A foreign-layout LoRA state dict as official `LoRAWeights` bound to `lora_targets(model, filters)`; None if
    `state` is of no foreign layout this module knows (the caller then reports the keys).

    `rank`: the rank every layer of the file must have (None: any). Raises WeightsError for what does not map.
    """
    parsed = parse_foreign(state, where)
    if parsed is None:
        return None
    layout, layers = parsed
    slots = _check_targets(where, layout, model, layers)
    half = sorted(n for n, layer in layers.items() if layer.down is None or layer.up is None)
    if half:
        raise WeightsError(f"{where}: LoRA layer {half[0]} has only one of its two matrices (or only an alpha); "
                           "the file is incomplete or corrupt")
    if rank is not None and (bad := next((n for n, layer in layers.items() if layer.rank != rank), None)):
        raise WeightsError(f"{where} is a rank-{layers[bad].rank} LoRA ({bad}), rank {rank} was asked for; pass "
                           f"rank={layers[bad].rank} or the LoRA of rank {rank}")
    config, config_text = read_lora_config(where) if "PEFT" in layout else (None, "")
    if config and config.get("use_dora"):
        raise WeightsError(f"{where}'s LoRA config says use_dora: DoRA is not a W + B @ A update; "
                           "cascade-rt loads plain LoRAs only")
    scales = {name: layer_scale(layer, config) for name, layer in layers.items()}
    targets = lora_targets(model, filters)
    index = {(t.name, t.param): i for i, t in enumerate(targets)}
    parts: dict[int, list[tuple[ForeignLayer, int]]] = {}
    for (block, comp), layer in sorted(slots.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        name, param, row = ((f"{block}.attention.attn.out_proj", "weight", 0) if comp == "out"
                            else (f"{block}.attention.attn", "in_proj_weight", comp))
        if (name, param) not in index:
            raise WeightsError(f"{where}: {layer.name} targets {name}, which is not a LoRA target with filters "
                               f"{list(filters)}; load foreign-layout LoRAs with the default filters ['.attn']")
        parts.setdefault(index[(name, param)], []).append((layer, row))
    deltas = {i: _target_delta(targets[i], p, scales, where) for i, p in parts.items()}
    full_rank = max((down.shape[0] for down, _ in deltas.values()), default=1)
    lora_layers = []
    for i, target in enumerate(targets):
        layer = LoRA(*target.shape[:2], full_rank)  # alpha 1: the official scale 1 / rank, undone by `up * rank`
        if i in deltas:
            down, up = deltas[i]
            with torch.no_grad():
                layer.lora_down[: down.shape[0]].copy_(down)
                layer.lora_up[:, : up.shape[1]].copy_(up * full_rank)
        weight = target.original()
        lora_layers.append(layer.to(device=weight.device, dtype=weight.dtype).requires_grad_(False))
    if config_text:  # the config changes the LoRA: it is part of its identity
        digest = hashlib.sha256(f"{digest}|{ADAPTER_CONFIG}|{config_text}".encode()).hexdigest()
    return LoRAWeights(lora_layers, None, float(scale), where, digest, tuple(filters))
