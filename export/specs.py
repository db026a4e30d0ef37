"""`StageSpec`: the single source of truth for every exported stage's tensors, shapes, dtypes and profiles.

One spec per graph: `text`, `stage_c` (denoiser), `stage_c_cond` (per-prompt conditioning), `stage_b`,
`stage_b_cond`, `stage_a` (decoder), `effnet`, `previewer`. Export, engines, CUDA-graph buffers, tests and
benchmarks read shapes from here; nobody else re-derives `ceil(H / 42.67)`.

Shapes are tuples of ints and *dimension expressions* over a few symbols computed from a request
(`Dims(batch, height, width, cfg)`):

    N        batch the graph sees: 2*batch under CFG for the stages CFG doubles (text, C, B), else batch
    H, W     image size in pixels (256..2048, multiples of 128)
    hc, wc   Stage C latent = ceil(H / 42.67)          (docs/reference.md §4.4: 1024 -> 24)
    hb, wb   Stage B / Stage A latent = ceil(H / 4)     (docs/reference.md §4.4: 1024 -> 256)

An expression is `sym`, `k*sym` or `sym/k` (exact). The same symbols name the ONNX dynamic axes; a symbol's
value is found from the input tensors by `StageSpec.bind`, which then gives every output shape.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

from cascade_rt.errors import ConfigError
from cascade_rt.models.text import EOS_ID
from cascade_rt.stages import (
    RESOLUTION_MAX,
    RESOLUTION_MIN,
    check_resolution,
    stage_b_latent_hw,
    stage_c_latent_hw,
)

# the exported graphs and the component (cascade_rt.stages.COMPONENTS, or "text") whose model each one runs
GRAPH_COMPONENT = {
    "text": "text", "stage_c_cond": "c", "stage_c": "c", "stage_b_cond": "b", "stage_b": "b", "stage_a": "a",
    "effnet": "effnet", "previewer": "previewer",
    "stage_c_cnet": "c",  # the Stage C denoiser variant with ControlNet projections (docs/extensions.md)
}
GRAPHS = tuple(GRAPH_COMPONENT)  # every exportable graph (a stage's denoiser, its conditioning, ...)
CFG_STAGES = ("text", "stage_c_cond", "stage_c", "stage_b_cond", "stage_b", "stage_c_cnet")  # CFG doubles their batch


VARIANTS = ("stage_c_cnet",)  # exported only for a pipeline that loads a ControlNet, never by `--stage all`


def component_graphs(component: str) -> tuple[str, ...]:
    """The graphs exported for a component: 'c' -> ('stage_c_cond', 'stage_c'), 'a' -> ('stage_a',)."""
    return tuple(g for g, c in GRAPH_COMPONENT.items() if c == component and g not in VARIANTS)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT_DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32}

BATCH_MIN, BATCH_MAX = 1, 4
TEXT_TOKENS = 77

FP16_REFUSAL = (
    "Stage B and Stage C overflow in float16 (official models/readme: 'you can not run the models in float16'; "
    "docs/reference.md §6.1): export them in bf16 or fp32"
)


# ------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Dims:
    """A concrete request: images of `height` x `width`, `batch` prompts, CFG on or off."""

    batch: int = 1
    height: int = 1024
    width: int = 1024
    cfg: bool = True

    def __post_init__(self) -> None:
        check_resolution(self.height, self.width)
        if not BATCH_MIN <= self.batch <= BATCH_MAX:
            raise ConfigError(f"batch {self.batch} is not supported: use {BATCH_MIN}..{BATCH_MAX}")

    def symbols(self, cfg_doubles: bool) -> dict[str, int]:
        hc, wc = stage_c_latent_hw(self.height, self.width)
        hb, wb = stage_b_latent_hw(self.height, self.width)
        n = self.batch * (2 if self.cfg and cfg_doubles else 1)
        return {"N": n, "H": self.height, "W": self.width, "hc": hc, "wc": wc, "hb": hb, "wb": wb}


PROFILE_MIN = dict(batch=BATCH_MIN, height=RESOLUTION_MIN, width=RESOLUTION_MIN)
PROFILE_MAX = dict(batch=BATCH_MAX, height=RESOLUTION_MAX, width=RESOLUTION_MAX)

_EXPR = re.compile(r"^(?:(\d+)\*)?([A-Za-z]\w*)(?:/(\d+))?$")


def parse_dim(expr: str) -> tuple[str, int, int]:
    """'32*kh' -> ('kh', 32, 1); 'hb/2' -> ('hb', 1, 2); 'N' -> ('N', 1, 1)."""
    m = _EXPR.match(expr)
    if not m:
        raise ValueError(f"bad dimension expression {expr!r} (expected sym, k*sym or sym/k)")
    return m.group(2), int(m.group(1) or 1), int(m.group(3) or 1)


def eval_dim(dim: int | str, values: Mapping[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    sym, mul, div = parse_dim(dim)
    if sym not in values:
        raise ConfigError(f"dimension {dim!r}: symbol {sym!r} is not bound")
    num = values[sym] * mul
    if num % div:
        raise ConfigError(f"dimension {dim!r} = {values[sym]}*{mul}/{div} is not an integer")
    return num // div


# ------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `dtype` is 'compute' (the engine precision) or a fixed dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "compute"
    sample: str = "normal"  # how sample inputs are drawn: normal | unit | tokens | mask

    def torch_dtype(self, precision: str) -> torch.dtype:
        return PRECISIONS[precision] if self.dtype == "compute" else INT_DTYPES[self.dtype]

    def symbols(self) -> list[str]:
        return [parse_dim(d)[0] for d in self.shape if isinstance(d, str)]


@dataclass(frozen=True)
class StageSpec:
    stage: str
    preset: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cfg_doubles: bool = False
    default_precision: str = "fp32"
    refused: tuple[tuple[str, str], ...] = ()  # (precision, reason)
    config: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # model constants the shapes use

    # ---- names, dtypes, precision policy
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def cfg(self, key: str) -> Any:
        return dict(self.config)[key]

    def check_precision(self, precision: str) -> torch.dtype:
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        reason = dict(self.refused).get(precision)
        if reason:
            raise ConfigError(f"{self.stage} cannot be exported in {precision}: {reason}")
        return PRECISIONS[precision]

    def dtypes(self, precision: str) -> dict[str, torch.dtype]:
        return {t.name: t.torch_dtype(precision) for t in (*self.inputs, *self.outputs)}

    # ---- shapes
    def symbol_values(self, dims: Dims) -> dict[str, int]:
        return dims.symbols(self.cfg_doubles)

    def shapes(self, dims: Dims | Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        values = self.symbol_values(dims) if isinstance(dims, Dims) else dims
        return {t.name: tuple(eval_dim(d, values) for d in t.shape) for t in (*self.inputs, *self.outputs)}

    def bind(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Symbol values read from actual input tensors; raises if a tensor contradicts the spec."""
        values: dict[str, int] = {}
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            want = self.input_names
            raise ConfigError(f"{self.stage}: inputs {want} expected; missing {missing}, unexpected {extra}")
        for t in self.inputs:
            for dim, size in zip(t.shape, inputs[t.name].shape):
                if isinstance(dim, str) and parse_dim(dim)[1:] == (1, 1):
                    values.setdefault(dim, int(size))
        for t in self.inputs:
            got = tuple(inputs[t.name].shape)
            want = tuple(eval_dim(d, values) for d in t.shape)
            if got != want:
                raise ConfigError(f"{self.stage}: input {t.name!r} has shape {got}, the spec says {want} ({t.shape})")
        values.update(self._derived(values))
        return values

    def _derived(self, values: Mapping[str, int]) -> dict[str, int]:
        """Symbols only outputs use, from those the inputs bind (image size from a latent, ...)."""
        out: dict[str, int] = {}
        if "hb" in values and "H" not in values:
            out["H"], out["W"] = values["hb"] * 4, values["wb"] * 4
        return out

    def output_shapes(self, values: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(eval_dim(d, values) for d in t.shape) for t in self.outputs}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis: expression}} for every symbolic axis (ONNX dim_param names)."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
        }

    def profile(self, dims: Dims, dynamic: bool) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT-style (min, opt, max) input shapes. Static: the request. Dynamic: 256..2048 px and every batch
        with and without CFG (N = 1..4, or 1..8 for the stages CFG doubles); opt = the request."""
        opt = self.shapes(dims)
        if not dynamic:
            return {n: (opt[n],) * 3 for n in self.input_names}
        lo = self.shapes(Dims(cfg=False, **PROFILE_MIN))
        hi = self.shapes(Dims(cfg=True, **PROFILE_MAX))
        return {n: (lo[n], opt[n], hi[n]) for n in self.input_names}

    # ---- sample inputs
    def sample_inputs(
        self,
        dims: Dims | Mapping[str, int],
        precision: str,
        *,
        seed: int | None = 0,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the right shapes and dtypes (seed=None: fresh randomness)."""
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)
        shapes = self.shapes(dims)
        n = shapes[self.inputs[0].name][0]
        lengths = torch.randint(2, TEXT_TOKENS + 1, (n,), generator=gen)  # token count per prompt (text stage)
        out = {}
        for t in self.inputs:
            shape, dtype = shapes[t.name], t.torch_dtype(precision)
            if t.sample == "unit":
                x = torch.rand(shape, generator=gen)
            elif t.sample == "tokens":  # BOS-less random ids; the last real token and every pad are EOS
                x = torch.randint(0, int(self.cfg("eos_id")), shape, generator=gen)
                x = torch.where(torch.arange(shape[-1]) >= lengths[:, None] - 1, int(self.cfg("eos_id")), x)
            elif t.sample == "mask":
                x = (torch.arange(shape[-1]) < lengths[:, None]).long()
            else:
                x = torch.randn(shape, generator=gen)
            out[t.name] = x.to(device=device, dtype=dtype)
        return out

    # ---- serialisation (manifests)
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["refused"] = dict(self.refused)
        d["config"] = dict(self.config)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageSpec":
        tensors = lambda items: tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in items)  # noqa: E731
        return cls(
            stage=d["stage"], preset=d["preset"], inputs=tensors(d["inputs"]), outputs=tensors(d["outputs"]),
            cfg_doubles=d["cfg_doubles"], default_precision=d["default_precision"],
            refused=tuple(sorted(d["refused"].items())),
            config=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d["config"].items())),
        )


# ------------------------------------------------------------------------------------------ per-stage specs
def _t(name: str, *shape: int | str, dtype: str = "compute", sample: str = "normal") -> TensorSpec:
    return TensorSpec(name, tuple(shape), dtype, sample)


def attn_widths(model: torch.nn.Module) -> list[int]:
    """Channel width of every AttnBlock, in `cond_kv` order."""
    return [int(b.attention.attn.embed_dim) for b in model.attn_blocks()]


def _unet_config(model: torch.nn.Module) -> dict[str, Any]:
    widths = attn_widths(model)
    if not widths:
        raise ConfigError("the model has no attention blocks: nothing to precompute for cond_kv")
    return {
        "c_latent": int(model.c_in),
        "patch_size": int(model.patch_size),
        "c_hidden0": int(model.c_hidden[0]),
        "n_attn": len(widths),
        "attn_widths": tuple(widths),
        "c_kv": max(widths),  # narrower blocks are zero-padded in the packed tensor (only tiny presets mix widths)
    }


def _control_input(model: torch.nn.Module, cfg: dict[str, Any]) -> TensorSpec:
    """cnet: (n_blocks, N, c_proj, hc, wc), the projection of each of `model.control_blocks` in order."""
    from cascade_rt.models.controlnet import resblock_widths

    blocks = tuple(getattr(model, "control_blocks", ()))
    if not blocks:
        raise ConfigError("stage_c_cnet: the Stage C has no control_blocks (load a ControlNet first)")
    if int(model.patch_size) != 1:
        raise ConfigError("stage_c_cnet assumes patch_size 1 (every released Stage C)")
    widths = resblock_widths(model)
    cfg.update(control_blocks=blocks, c_control=widths[blocks[0]])
    return _t("cnet", len(blocks), "N", cfg["c_control"], "hc", "wc")


def make_spec(stage: str, model: torch.nn.Module, preset: str) -> StageSpec:
    """The spec of `stage` for this model (constants such as channel counts are read from the model)."""
    refuse_fp16 = (("fp16", FP16_REFUSAL),)
    if stage in ("stage_c", "stage_c_cond", "stage_c_cnet"):
        cfg = _unet_config(model)
        cfg.update(
            c_clip_text=int(model.clip_txt_mapper.in_features),
            c_clip_text_pooled=int(model.clip_txt_pooled_mapper.in_features),
            c_clip_img=int(model.clip_img_mapper.in_features),
            cond_tokens=TEXT_TOKENS + 2 * int(model.c_clip_seq),  # 77 text + 4 pooled + 4 image = 85
        )
        kv = _t("cond_kv", cfg["n_attn"], 2, "N", cfg["cond_tokens"], cfg["c_kv"])
        if stage == "stage_c_cond":
            inputs = (
                _t("clip_text", "N", TEXT_TOKENS, cfg["c_clip_text"]),
                _t("clip_text_pooled", "N", 1, cfg["c_clip_text_pooled"]),
                _t("clip_img", "N", 1, cfg["c_clip_img"]),
            )
            outputs = (kv,)
        else:
            c = cfg["c_latent"]
            inputs = (_t("x", "N", c, "hc", "wc"), _t("r", "N", dtype="float32", sample="unit"), kv)
            if stage == "stage_c_cnet":  # + the ControlNet projections, resized to the latent grid once per prompt
                inputs += (_control_input(model, cfg),)
            outputs = (_t("eps", "N", c, "hc", "wc"),)
        return StageSpec(stage, preset, inputs, outputs, True, "bf16", refuse_fp16, tuple(sorted(cfg.items())))
    if stage in ("stage_b", "stage_b_cond"):
        cfg = _unet_config(model)
        if cfg["patch_size"] != 2:
            raise ConfigError(f"Stage B with patch_size {cfg['patch_size']}: the specs assume 2 (all presets)")
        cfg.update(
            c_effnet=int(model.effnet_mapper[0].in_channels),
            c_clip=int(model.clip_mapper.in_features),
            cond_tokens=int(model.c_clip_seq),
        )
        c, c0 = cfg["c_latent"], cfg["c_hidden0"]
        kv = _t("cond_kv", cfg["n_attn"], 2, "N", cfg["cond_tokens"], cfg["c_kv"])
        x, x_add = _t("x", "N", c, "hb", "wb"), _t("x_add", "N", c0, "hb/2", "wb/2")
        if stage == "stage_b_cond":  # x: the Stage B latent, only its shape is read (it sizes x_add)
            inputs = (_t("effnet", "N", cfg["c_effnet"], "hc", "wc"), _t("clip", "N", 1, cfg["c_clip"]), x)
            outputs = (x_add, kv)
        else:
            inputs = (x, _t("r", "N", dtype="float32", sample="unit"), x_add, kv)
            outputs = (_t("eps", "N", c, "hb", "wb"),)
        return StageSpec(stage, preset, inputs, outputs, True, "bf16", refuse_fp16, tuple(sorted(cfg.items())))
    if stage == "stage_a":
        cfg = {"c_latent": int(model.c_latent)}
        inputs = (_t("latent", "N", cfg["c_latent"], "hb", "wb"),)
        return StageSpec(stage, preset, inputs, (_t("images", "N", 3, "H", "W"),), config=tuple(cfg.items()))
    if stage == "effnet":  # input: ImageNet-normalised RGB (models.effnet.normalize_imagenet)
        cfg = {"c_latent": int(model.mapper[0].out_channels)}
        outputs = (_t("effnet_latent", "N", cfg["c_latent"], "H/32", "W/32"),)
        return StageSpec(stage, preset, (_t("images", "N", 3, "H", "W"),), outputs, config=tuple(cfg.items()))
    if stage == "previewer":
        ups = sum(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
        cfg = {"c_latent": int(model.blocks[0].in_channels), "upscale": 2**ups}
        inputs = (_t("latent", "N", cfg["c_latent"], "hc", "wc"),)
        outputs = (_t("preview", "N", 3, f"{cfg['upscale']}*hc", f"{cfg['upscale']}*wc"),)
        return StageSpec(stage, preset, inputs, outputs, config=tuple(cfg.items()))
    if stage == "text":
        return _text_spec(model, preset)
    raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(GRAPHS)}")


def _text_spec(model: torch.nn.Module, preset: str) -> StageSpec:
    """CLIP text tower: token ids + attention mask -> hidden_states[-1] (pre final LN) and the pooled projection."""
    config = model.config
    if config.context_length != TEXT_TOKENS:
        raise ConfigError(f"text encoder context length {config.context_length}, the specs assume {TEXT_TOKENS}")
    cfg = {
        "vocab_size": int(config.vocab_size),
        "eos_id": EOS_ID if EOS_ID < config.vocab_size else int(config.vocab_size) - 1,
        "c_clip_text": int(config.width),
        "c_clip_text_pooled": int(config.output_dim),
    }
    inputs = (
        _t("input_ids", "N", TEXT_TOKENS, dtype="int64", sample="tokens"),
        _t("attention_mask", "N", TEXT_TOKENS, dtype="int64", sample="mask"),
    )
    outputs = (
        _t("clip_text", "N", TEXT_TOKENS, cfg["c_clip_text"]),
        _t("clip_text_pooled", "N", 1, cfg["c_clip_text_pooled"]),
    )
    return StageSpec("text", preset, inputs, outputs, True, "bf16", (), tuple(sorted(cfg.items())))
