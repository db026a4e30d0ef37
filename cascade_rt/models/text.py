"""Conditioning encoders (docs/reference.md §4.1, §4.2): CLIP ViT-bigG-14 text tower and CLIP ViT-L/14 image tower.

The towers are open_clip's own `TextTransformer` / `VisionTransformer` modules (text or vision part only, the
other tower is never built); state dicts use open_clip's key layout. Weights load from either

* the HF transformers layout (diffusers packaging): `text_encoder/` or `image_encoder/` with `config.json` and
  `model.safetensors` (`CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection` keys), converted here; or
* the open_clip layout: `open_clip_model.safetensors` / `open_clip_pytorch_model.bin` (a whole CLIP: text keys at
  the top level, vision keys under `visual.`), with `open_clip_config.json` when present.

Text encoding follows HF/diffusers exactly: pad with <|endoftext|> (49407), attention mask over the real tokens
(BOS..EOS), causal + padding mask, `clip_text` = output of the last layer BEFORE the final LayerNorm (B,77,D),
`clip_text_pooled` = text_projection(final_ln(h)[first EOS]) (B,1,P), not normalised. Unconditional = "".

Pooling takes the position of the highest token id, as the official code's text model does (the
laion/CLIP-ViT-bigG-14 config has the legacy `eos_token_id` 2, so transformers pools at `input_ids.argmax()`). With the
base vocabulary that is the first EOS (49407 is the largest id). With tokens a LoRA added (ids >= 49408) it is the
added token's position, which is what such a LoRA was trained with. (The diffusers packaging's config says
`eos_token_id` 49407, so diffusers would pool at the first EOS there: the two differ only for added tokens.)
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from cascade_rt.errors import ConfigError, WeightsError
from cascade_rt.models.presets import TINY_CLIP_DIMS
from cascade_rt.stages import TEXT_PRESETS

logger = logging.getLogger(__name__)

BOS_ID, EOS_ID = 49406, 49407
BASE_VOCAB = 49408  # the released tokenizer's vocabulary; added tokens take the ids after it
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_WEIGHT_FILES = ("model.safetensors", "model.bf16.safetensors", "model.fp16.safetensors", "pytorch_model.bin")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors")


@dataclass(frozen=True)
class ClipTextConfig:
    width: int = 1280
    layers: int = 32
    heads: int = 20
    mlp_ratio: float = 4.0
    output_dim: int = 1280
    context_length: int = 77
    vocab_size: int = 49408
    act: str = "gelu"  # "gelu" (laion bigG) or "quick_gelu" (openai)
    eps: float = 1e-5

    @classmethod
    def tiny(cls, width: int = 32, output_dim: int | None = None) -> ClipTextConfig:
        return cls(width=width, layers=2, heads=2, output_dim=output_dim or width)


@dataclass(frozen=True)
class ClipVisionConfig:
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 224
    output_dim: int = 768
    act: str = "quick_gelu"  # openai ViT-L/14
    eps: float = 1e-5

    @classmethod
    def tiny(cls, output_dim: int = 24, width: int = 32) -> ClipVisionConfig:
        return cls(width=width, layers=2, heads=2, patch_size=32, output_dim=output_dim)


def text_config(preset: str) -> ClipTextConfig:
    """The text encoder of a text preset: 'text' (CLIP bigG, the released one) or 'text_tiny' (the tiny presets')."""
    if preset == "text":
        return ClipTextConfig()
    if preset == "text_tiny":
        return ClipTextConfig.tiny(TINY_CLIP_DIMS["text_hidden"], TINY_CLIP_DIMS["text_pooled"])
    raise ConfigError(f"unknown text encoder preset {preset!r}; choose one of {', '.join(TEXT_PRESETS)}")


def image_config(size: str) -> ClipVisionConfig:
    """The image encoder (CLIP ViT-L/14, or the tiny presets' tower) of a pipeline size."""
    return ClipVisionConfig.tiny(output_dim=TINY_CLIP_DIMS["image"]) if size == "tiny" else ClipVisionConfig()


def build_text_encoder(
    preset: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int | None = 0
) -> TextEncoder:
    """A text preset's encoder with random (seeded) weights; on 'meta' (or seed=None there) only shapes."""
    config = text_config(preset)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return TextEncoder(config).to(dtype).eval().requires_grad_(False)
    return TextEncoder.random(config, dtype=dtype, device=device, seed=seed or 0)


class ClipTokenizer:
    """open_clip's BPE with the HF padding convention: [BOS] text[:75] [EOS] then EOS pads; mask over BOS..EOS.

    Tokens added with `add_token` (a LoRA's new tokens such as '[fernando]') behave as the released tokenizer's
    `add_tokens` does: found in the cleaned (lower-cased) text before byte-pair encoding, each is one id after the
    base vocabulary (49408, 49409, ...), and the text around it is encoded as if they were separators.
    """

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer  # open_clip takes 5 s to import: only when used

        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.base_size = BASE_VOCAB
        self.added: dict[str, int] = {}
        self._split: re.Pattern[str] | None = None

    def vocab(self) -> dict[str, int]:
        """Token string -> id, named as the released (HF) tokenizer names them, added tokens included."""
        names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
        out = {names.get(k, k): v for k, v in self._bpe.encoder.items() if v < self.base_size}
        out.update(self.added)
        return out

    def add_token(self, token: str) -> int:
        """Add `token` (once) and return its id."""
        if token not in self.added:
            self.added[token] = self.base_size + len(self.added)
            self._split = re.compile("|".join(re.escape(t.lower()) for t in sorted(self.added, key=len, reverse=True)))
        return self.added[token]

    def reset_added(self) -> None:
        self.added, self._split = {}, None

    def encode(self, prompt: str) -> list[int]:
        """The ids of `prompt` without BOS/EOS."""
        if self._split is None:
            return self._bpe.encode(prompt)
        text, ids, at = self._bpe.clean_fn(prompt), [], 0
        lookup = {t.lower(): i for t, i in self.added.items()}
        for match in self._split.finditer(text):
            ids += self._bpe.encode(text[at : match.start()]) + [lookup[match.group(0)]]
            at = match.end()
        return ids + self._bpe.encode(text[at:])

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        n = self.context_length
        ids = torch.full((len(prompts), n), EOS_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [BOS_ID, *self.encode(prompt)[: n - 2], EOS_ID]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask


def _act(name: str) -> type[nn.Module]:
    from open_clip.transformer import QuickGELU  # open_clip: 5 s to import, only when a tower is built

    acts = {"gelu": nn.GELU, "quick_gelu": QuickGELU}
    if name not in acts:
        raise WeightsError(f"unsupported CLIP activation {name!r}; expected one of {sorted(acts)}")
    return acts[name]


def _build_text_tower(cfg: ClipTextConfig) -> nn.Module:
    from open_clip.transformer import LayerNorm, TextTransformer  # open_clip: 5 s to import (see QuickGELU)

    tower = TextTransformer(
        context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width, heads=cfg.heads,
        layers=cfg.layers, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.output_dim, act_layer=_act(cfg.act),
        norm_layer=partial(LayerNorm, eps=cfg.eps),
    )
    tower.attn_mask = None  # we build causal + padding masks per batch; drop the (non-persistent) causal buffer
    return tower


def _build_vision_tower(cfg: ClipVisionConfig) -> nn.Module:
    from open_clip.transformer import LayerNorm, VisionTransformer  # open_clip: 5 s to import (see QuickGELU)

    return VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers, heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio, output_dim=cfg.output_dim, act_layer=_act(cfg.act),
        norm_layer=partial(LayerNorm, eps=cfg.eps),
    )


# --- key conversion: HF transformers CLIP -> open_clip ------------------------------------------------------

_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_HF_LAYER_RENAMES = {
    "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_HF_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
_HF_PROJ = {"text_projection.weight": "text_projection", "visual_projection.weight": "proj"}


def hf_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert CLIPTextModelWithProjection / CLIPVisionModelWithProjection keys to open_clip tower keys."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # old checkpoints store this buffer; it is arange(77)
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key in _HF_PROJ:
            out[_HF_PROJ[key]] = value.t().contiguous()  # Linear (out, in) -> open_clip matrix used as x @ P
        elif m := _HF_LAYER.search(key):
            layer, rest = int(m.group(1)), m.group(2)
            if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((layer, q.group(2)), {})[q.group(1)] = value
                continue
            for old, new in _HF_LAYER_RENAMES.items():
                rest = rest.replace(old, new) if rest.startswith(old) else rest
            out[f"transformer.resblocks.{layer}.{rest}"] = value
        else:
            out[key] = value  # left for the strict load to report
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(f"layer {layer}: incomplete q/k/v projections ({sorted(parts)})")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# --- files ---------------------------------------------------------------------------------------------------


def _read_state(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt / truncated file: say which one
        raise WeightsError(f"cannot read {path}: {exc}") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _read_hf_state(folder: Path) -> dict[str, Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(_read_state(folder / shard))
        return state
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return _read_state(folder / name)
    raise WeightsError(f"{folder} has config.json but no weights: expected one of {HF_WEIGHT_FILES} or a sharded index")


def _locate(path: str | Path, hf_subfolder: str) -> tuple[str, Path]:
    """('hf', folder) or ('open_clip', file)."""
    p = Path(path)
    if p.is_file():
        is_hf = (p.parent / "config.json").is_file() and p.name.startswith("model")
        return ("hf", p.parent) if is_hf else ("open_clip", p)
    if (p / hf_subfolder).is_dir():
        p = p / hf_subfolder
    if (p / "config.json").is_file():
        return "hf", p
    for name in OPEN_CLIP_FILES:
        if (p / name).is_file():
            return "open_clip", p / name
    raise WeightsError(
        f"no CLIP weights found at {path}. Expected either the HF/diffusers layout "
        f"'{hf_subfolder}/config.json' + '{hf_subfolder}/model.safetensors' (or those two files directly in the "
        f"folder), or an open_clip checkpoint ({' / '.join(OPEN_CLIP_FILES)})"
    )


def _hf_config(folder: Path, key: str) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    return cfg.get(key, cfg)  # a full CLIPConfig nests text_config / vision_config


def _config_field(cfg: dict[str, Any], key: str, source: Path) -> Any:
    try:
        return cfg[key]
    except KeyError:
        raise WeightsError(f"{source}: config has no {key!r}; is this a CLIP config?") from None


def _open_clip_model_cfg(file: Path, default_name: str) -> tuple[dict[str, Any], bool]:
    """(model_cfg, quick_gelu) from open_clip_config.json beside the file, else open_clip's named config."""
    side = file.parent / "open_clip_config.json"
    if side.is_file():
        cfg = json.loads(side.read_text())["model_cfg"]
        return cfg, bool(cfg.get("quick_gelu", False))
    import open_clip  # 5 s to import: only when reading open_clip files

    cfg = open_clip.get_model_config(default_name)
    if cfg is None:
        raise WeightsError(f"open_clip has no config named {default_name!r}")
    return cfg, default_name.startswith("ViT-L-14")  # the openai ViT-L/14 weights were trained with QuickGELU


def _load_strict(tower: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    own = tower.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad))
            if keys
        )
        raise WeightsError(f"{source}: weights do not fit the CLIP tower built from its config: {detail}")
    tower.load_state_dict(state, strict=True, assign=True)


# --- encoders ------------------------------------------------------------------------------------------------


class _ClipTower(nn.Module):
    """Shared by the text and image encoders: `random()` builds one with seeded random weights (tiny by default)."""

    config_cls: Any

    @classmethod
    def random(cls, config: Any = None, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config or cls.config_cls.tiny())
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class TextEncoder(_ClipTower):
    """CLIP text tower -> (clip_text (B,77,D) pre-final-LN, clip_text_pooled (B,1,P))."""

    config_cls = ClipTextConfig

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.preset = next((name for name in TEXT_PRESETS if text_config(name) == config), None)
        self.tower = _build_text_tower(config)
        self.tokenizer = ClipTokenizer(config.context_length)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
    ) -> TextEncoder:
        layout, where = _locate(path, "text_encoder")
        if layout == "hf":
            state = hf_to_open_clip(_read_hf_state(where))
            hf = _hf_config(where, "text_config")
            f = partial(_config_field, hf, source=where / "config.json")
            config = ClipTextConfig(
                width=f("hidden_size"), layers=f("num_hidden_layers"), heads=f("num_attention_heads"),
                mlp_ratio=f("intermediate_size") / f("hidden_size"), output_dim=hf.get("projection_dim", 512),
                context_length=hf.get("max_position_embeddings", 77), vocab_size=hf.get("vocab_size", 49408),
                act=hf.get("hidden_act", "quick_gelu"), eps=hf.get("layer_norm_eps", 1e-5),
            )
        else:
            oc, quick = _open_clip_model_cfg(where, "ViT-bigG-14")
            t = oc["text_cfg"]
            config = ClipTextConfig(
                width=t["width"], layers=t["layers"], heads=t["heads"], mlp_ratio=t.get("mlp_ratio", 4.0),
                output_dim=oc["embed_dim"], context_length=t.get("context_length", 77),
                vocab_size=t.get("vocab_size", 49408), act="quick_gelu" if quick else "gelu",
            )
            state = {k: v for k, v in _read_state(where).items() if not k.startswith(("visual.", "logit_"))}
        with torch.device("meta"):
            model = cls(config)
        _load_strict(model.tower, state, Path(path))
        logger.info("loaded CLIP text tower (%s layout, width %d) from %s", layout, config.width, path)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def _mask(self, attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive (B*heads, L, L) mask: causal AND key padding, like HF CLIP's create_causal_mask."""
        n = attention_mask.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = causal[None] & attention_mask.bool()[:, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
        return mask.repeat_interleave(self.config.heads, dim=0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        t = self.tower
        n = input_ids.shape[1]
        x = t.token_embedding(input_ids) + t.positional_embedding[:n].to(t.token_embedding.weight.dtype)
        h = t.transformer(x, attn_mask=self._mask(attention_mask, x.dtype))
        pool = input_ids.int().argmax(dim=-1)  # the highest id: the first EOS, or an added token (see above)
        pooled = t.ln_final(h[torch.arange(h.shape[0], device=h.device), pool]) @ t.text_projection
        return h, pooled.unsqueeze(1)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        device = self.tower.token_embedding.weight.device
        ids, mask = self.tokenizer(list(prompts))
        return self(ids.to(device), mask.to(device))


class ImageEncoder(_ClipTower):
    """CLIP ViT-L/14 image tower -> clip_img (B,1,P): projected image embedding, not normalised."""

    config_cls = ClipVisionConfig

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.config = config
        self.tower = _build_vision_tower(config)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
    ) -> ImageEncoder:
        layout, where = _locate(path, "image_encoder")
        if layout == "hf":
            state = hf_to_open_clip(_read_hf_state(where))
            hf = _hf_config(where, "vision_config")
            f = partial(_config_field, hf, source=where / "config.json")
            config = ClipVisionConfig(
                width=f("hidden_size"), layers=f("num_hidden_layers"), heads=f("num_attention_heads"),
                mlp_ratio=f("intermediate_size") / f("hidden_size"), patch_size=f("patch_size"),
                image_size=hf.get("image_size", 224), output_dim=hf.get("projection_dim", 512),
                act=hf.get("hidden_act", "quick_gelu"), eps=hf.get("layer_norm_eps", 1e-5),
            )
        else:
            oc, quick = _open_clip_model_cfg(where, "ViT-L-14")
            v = oc["vision_cfg"]
            config = ClipVisionConfig(
                width=v["width"], layers=v["layers"], heads=v["width"] // v.get("head_width", 64),
                mlp_ratio=v.get("mlp_ratio", 4.0), patch_size=v["patch_size"], image_size=v.get("image_size", 224),
                output_dim=oc["embed_dim"], act="quick_gelu" if quick else "gelu",
            )
            state = {k[len("visual.") :]: v for k, v in _read_state(where).items() if k.startswith("visual.")}
        with torch.device("meta"):
            model = cls(config)
        _load_strict(model.tower, state, Path(path))
        logger.info("loaded CLIP image tower (%s layout, width %d) from %s", layout, config.width, path)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """[0,1] RGB (B,3,H,W) -> Resize(shorter side, bicubic) -> CenterCrop -> CLIP normalisation
        (docs/reference.md §4.2)."""
        from torchvision.transforms.v2 import functional as TF  # torchvision: 3 s to import, only when used

        size = self.config.image_size
        x = TF.resize(images.float(), [size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, [size, size])
        return TF.normalize(x, list(CLIP_MEAN), list(CLIP_STD))

    def forward(self, pixel_values: Tensor) -> Tensor:
        weight = self.tower.conv1.weight
        return self.tower(pixel_values.to(device=weight.device, dtype=weight.dtype)).unsqueeze(1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return self(self.preprocess(images))

