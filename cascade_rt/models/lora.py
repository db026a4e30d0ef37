"""LoRA and ReToken for Stage C, as the official release defines them (official modules/lora.py,
train/train_c_lora.py, configs/inference/lora_c_3b.yaml). See docs/extensions.md.

* `LoRA`: a layer's `weight` (or an `nn.MultiheadAttention`'s `in_proj_weight`) becomes
  `W + (lora_up @ lora_down).view(out, in, 1, ...) * alpha / rank` (alpha = 1 in every official use).
* Targets (`lora_targets`): every module whose qualified name contains one of `filters` (released: `['.attn']`,
  rank 4) and owns a plain `weight` parameter, else an `in_proj_weight` one: in Stage C each attention block's
  `attention.attn` (in_proj_weight) and `attention.attn.out_proj` (weight).
* Checkpoint layout: the state dict of the official training's `nn.ModuleDict`:
  `embeddings.embeddings` (n, 1280) and `embeddings.indices` (n,) of the `ReToken`, and `weights.<i>.lora_down`
  / `weights.<i>.lora_up` for the LoRA modules in `generator.modules()` order after `apply_lora`. Because
  `register_parametrization` appends a `parametrizations` child to a module *after* its own children, that order
  is the post-order of the targets: a block's `out_proj` comes before the `attn` that holds it.
* `ReToken`: learned vectors added to chosen rows of the text encoder's token embedding. Which rows comes from the
  training config's `train_tokens` (official format: `[[token_or_regex, init_regex], ...]`): an entry `[name]` or
  `<name>` is a new token appended to the tokenizer and the table (id 49408, 49409, ... in order), its row started
  from the mean of the vocabulary rows whose token matches `init_regex` (zeros without one); any other entry is a
  regex selecting existing tokens. The checkpoint holds only the ids, so a LoRA that adds tokens needs its
  `train_tokens` (`tokens=`, the file's `train_tokens` metadata, or the training config file).

Several LoRAs apply at once, each with a scale: `W + sum_i scale_i * delta_i` (scale 1 and one LoRA is the
official computation, bit for bit). Two ways to apply them:
* `attach_official(model, loras)`: `torch.nn.utils.parametrize`, as the official code does (the delta is
  recomputed at every weight access);
* `LoRAMerger(model).apply(loras)`: the same arithmetic written into the weights in place (what compiled and
  engine backends need, and what keeps CUDA-graph addresses); the base weights are kept, so `unmerge()` restores
  them exactly and switching LoRAs never accumulates float drift. `apply` returns the switch time.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from cascade_rt.checkpoint_io import read_header
from cascade_rt.errors import ConfigError, WeightsError
from cascade_rt.weights import open_checkpoint

DEFAULT_FILTERS = (".attn",)  # configs/inference/lora_c_3b.yaml module_filters
DEFAULT_RANK = 4  # configs/inference/lora_c_3b.yaml rank
TARGET_PARAMS = ("weight", "in_proj_weight")


class LoRA(nn.Module):
    """Official `LoRA`: parameters `lora_down` (rank, in) and `lora_up` (out, rank); `scale` = alpha / rank."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.lora_down = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_up = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    @property
    def rank(self) -> int:
        return int(self.lora_down.shape[0])

    def delta(self, shape: Sequence[int]) -> Tensor:
        """(up @ down) viewed as (out, in, 1, ...) for a weight of `shape`, times alpha / rank."""
        view = [int(s) for s in shape[:2]] + [1] * (len(shape) - 2)
        return torch.matmul(self.lora_up, self.lora_down).view(*view) * self.scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta(weight.shape)


class ReToken(nn.Module):
    """Official `ReToken`: `embeddings[i]` is added to row `indices[i]` of a token-embedding table."""

    def __init__(self, indices: Sequence[int], dim: int = 1280) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(len(indices), dim))
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.int64))

    def forward(self, table: Tensor) -> Tensor:
        table = table.clone()
        for i, idx in enumerate(self.indices.tolist()):
            table[idx] += self.embeddings[i]
        return table


# ------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class LoRATarget:
    name: str  # qualified module name in the model
    module: nn.Module
    param: str  # 'weight' or 'in_proj_weight'

    def original(self) -> Tensor:
        """The stored parameter (under a parametrization: the original, not the computed weight)."""
        if parametrize.is_parametrized(self.module, self.param):
            return self.module.parametrizations[self.param].original
        return getattr(self.module, self.param)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.original().shape)


def _plain_param(module: nn.Module, name: str) -> bool:
    return (
        hasattr(module, name)
        and not parametrize.is_parametrized(module, name)
        and isinstance(getattr(module, name), nn.Parameter)
    )


def lora_targets(model: nn.Module, filters: Sequence[str] | None = DEFAULT_FILTERS) -> list[LoRATarget]:
    """The layers official `apply_lora(model, filters)` parametrizes, in the order its checkpoint lists them."""
    out: list[LoRATarget] = []

    def visit(name: str, module: nn.Module) -> None:
        for child_name, child in module._modules.items():
            if child is not None and child_name != "parametrizations":
                visit(f"{name}.{child_name}" if name else child_name, child)
        if filters is None or any(f in name for f in filters):
            param = next((p for p in TARGET_PARAMS if _plain_param(module, p)), None)
            if param is not None:
                if getattr(module, param).dim() < 2:
                    raise ConfigError(f"LoRA filter matches {name}.{param}, a 1-D parameter; narrow the filters")
                out.append(LoRATarget(name, module, param))

    visit("", model)
    return out


# ------------------------------------------------------------------------------------------ checkpoints
TrainTokens = tuple[tuple[str, "str | None"], ...]  # official train_tokens: ((token_or_regex, init_regex), ...)


def is_new_token(entry: str) -> bool:
    """Official rule (train_c_lora.py): '[name]' or '<name>' is a token to add; anything else a vocabulary regex."""
    return (entry.startswith("[") and entry.endswith("]")) or (entry.startswith("<") and entry.endswith(">"))


def parse_train_tokens(value: object, where: str = "train_tokens") -> TrainTokens:
    """Normalise `train_tokens` as the official configs write it: a list of [token_or_regex, init_regex or None]
    (a bare string is a token without initialiser). Raises ConfigError naming the malformed entry."""
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of [token, init_regex] pairs, got {type(value).__name__}")
    out: list[tuple[str, str | None]] = []
    for entry in value:
        if isinstance(entry, str):
            entry = (entry, None)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]
                and (entry[1] is None or isinstance(entry[1], str))):
            raise ConfigError(f"{where}: {entry!r} is not a [token, init_regex] pair (init_regex may be null)")
        for pattern in entry if not is_new_token(entry[0]) else entry[1:]:
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") from None
        out.append((entry[0], entry[1]))
    new = [t for t, _ in out if is_new_token(t)]
    if len(set(new)) != len(new):
        raise ConfigError(f"{where} names a new token twice: {new}")
    return tuple(out)


def read_train_tokens(path: str | Path) -> TrainTokens:
    """`train_tokens` of a training config (the official YAML, e.g. configs/inference/lora_c_3b.yaml, or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"LoRA token config {path} does not exist; pass the LoRA's training config (its "
                          "train_tokens), or TOKEN=INIT_REGEX")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # PyYAML: only for the official YAML configs

        doc = yaml.safe_load(text)
    else:
        doc = json.loads(text)
    if not isinstance(doc, dict) or "train_tokens" not in doc:
        raise ConfigError(f"{path} has no train_tokens; pass the config the LoRA was trained with")
    return parse_train_tokens(doc["train_tokens"], f"{path}: train_tokens")


def parse_token_spec(text: str) -> TrainTokens:
    """A command-line token spec: a training config file, or one entry 'TOKEN[=INIT_REGEX]' ('[fernando]=^dog</w>'):
    a new token's name ends at its closing bracket; any other entry is a vocabulary regex as a whole."""
    if Path(text).suffix in (".yaml", ".yml", ".json") or Path(text).is_file():
        return read_train_tokens(text)
    if text[:1] in "[<":
        end = text.find("]" if text[0] == "[" else ">")
        token, rest = (text[: end + 1], text[end + 1 :]) if end > 0 else (text, "")
        if rest and not rest.startswith("="):
            raise ConfigError(f"LoRA token {text!r}: write TOKEN=INIT_REGEX, e.g. '[fernando]=^dog</w>'")
        return parse_train_tokens([[token, rest[1:] or None]], f"LoRA token {text!r}")
    return parse_train_tokens([[text, None]], f"LoRA token {text!r}")


@dataclass
class LoRAWeights:
    """One LoRA checkpoint bound to a model's targets: `layers[i]` belongs to `lora_targets(model)[i]`."""

    layers: list[LoRA]
    retoken: ReToken | None = None
    scale: float = 1.0
    source: str = "<memory>"
    digest: str = ""  # sha256 of the file (or of the tensors), names the LoRA in engine manifests
    filters: tuple[str, ...] = DEFAULT_FILTERS
    tokens: TrainTokens = ()  # the training config's train_tokens (needed when the ReToken adds tokens)

    @property
    def rank(self) -> int:
        return self.layers[0].rank if self.layers else 0

    def with_scale(self, scale: float) -> LoRAWeights:
        return LoRAWeights(self.layers, self.retoken, float(scale), self.source, self.digest, self.filters,
                           self.tokens)

    def describe(self) -> dict[str, object]:
        """What engine manifests record: the file, its hash, the scale, rank, filters and tokens."""
        out: dict[str, object] = {"file": self.source, "sha256": self.digest, "scale": self.scale, "rank": self.rank,
                                  "filters": list(self.filters)}
        if self.tokens:
            out["tokens"] = [list(t) for t in self.tokens]
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """The official layout (what train/train_c_lora.py saves)."""
        out: dict[str, Tensor] = {}
        if self.retoken is not None:
            out["embeddings.embeddings"] = self.retoken.embeddings.detach()
            out["embeddings.indices"] = self.retoken.indices
        for i, layer in enumerate(self.layers):
            out[f"weights.{i}.lora_down"] = layer.lora_down.detach()
            out[f"weights.{i}.lora_up"] = layer.lora_up.detach()
        return out


def _tensor_digest(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _read(path_or_state: str | Path | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str, str, dict[str, str]]:
    """(tensors, where, sha256, safetensors metadata)."""
    if isinstance(path_or_state, Mapping):
        state = dict(path_or_state)
        return state, "<memory>", _tensor_digest(state), {}
    path = Path(path_or_state)
    if not path.is_file():
        raise WeightsError(f"LoRA file {path} does not exist; pass the path of a LoRA .safetensors file")
    with open_checkpoint(path) as source:
        state = {k: source.get(k).clone() for k in source.infos}
    metadata = read_header(path).metadata if path.suffix == ".safetensors" else {}
    return state, str(path.resolve()), _file_digest(path), dict(metadata)


FOREIGN_LAYOUTS = (
    ("lora_A", "PEFT/diffusers"), ("lora_B", "PEFT/diffusers"), (".lora_down.weight", "kohya"),
    (".lora.down.weight", "diffusers (old)"), ("lora_unet_", "kohya"), ("lora_prior_unet_", "kohya"),
)


def load_lora(
    path_or_state: str | Path | Mapping[str, Tensor],
    model: nn.Module,
    *,
    scale: float = 1.0,
    rank: int | None = None,
    filters: Sequence[str] = DEFAULT_FILTERS,
    alpha: float = 1.0,
    tokens: TrainTokens | Sequence | None = None,
) -> LoRAWeights:
    """Read an official LoRA checkpoint for `model` (a Stage C), strictly.

    `rank`: the rank the caller expects (None: the file's own, which must be the same for every layer).
    `tokens`: the training config's `train_tokens` (None: the file's `train_tokens` metadata, if any); checked
    against the ReToken's ids when the LoRA is applied to a text encoder (`ReTokenMerger`).
    Raises WeightsError for keys of another layout, a layer count or shape of another model, a wrong rank.
    """
    state, where, digest, metadata = _read(path_or_state)
    if tokens is None and "train_tokens" in metadata:
        tokens = parse_train_tokens(metadata["train_tokens"], f"{where}: metadata train_tokens")
    tokens = parse_train_tokens(list(tokens or ()), "tokens")
    targets = lora_targets(model, filters)
    if not targets:
        raise ConfigError(f"LoRA filters {list(filters)} match no layer of {type(model).__name__}; use ['.attn']")
    keys = set(state)
    layer_keys = {k for k in keys if k.startswith("weights.")}
    embed_keys = {k for k in keys if k.startswith("embeddings.")}
    if not layer_keys:
        from cascade_rt.models.lora_formats import convert_foreign  # builds on this module

        converted = convert_foreign(state, model, where=where, digest=digest, scale=scale, rank=rank, filters=filters)
        if converted is not None:  # a diffusers/PEFT or kohya-style LoRA of the attention layers
            return converted
        layout = next((name for pat, name in FOREIGN_LAYOUTS if any(pat in k for k in keys)), None)
        what = f"the {layout} LoRA layout" if layout else f"keys like {', '.join(sorted(keys)[:3]) or '(none)'}"
        raise WeightsError(
            f"{where} has {what}, which matches no layer of the official Stage C LoRA layout "
            "('weights.<i>.lora_down' / 'weights.<i>.lora_up', as train/train_c_lora.py saves it); "
            "only official Stable Cascade LoRA checkpoints can be loaded"
        )
    n = len(targets)
    expected = {f"weights.{i}.{p}" for i in range(n) for p in ("lora_down", "lora_up")}
    unexpected = sorted(keys - expected - {"embeddings.embeddings", "embeddings.indices"})
    missing = sorted(expected - keys)
    found_layers = len({k.split(".")[1] for k in layer_keys})
    if missing or unexpected:
        raise WeightsError(
            f"{where} holds {found_layers} LoRA layers, but this {type(model).__name__} has {n} layers matching "
            f"filters {list(filters)} ({len(missing)} missing keys, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:2]}): the LoRA was trained for another model (e.g. the 3.6B vs the lite Stage C) "
            "or with other module filters; use the Stage C it was trained on"
        )
    if embed_keys and embed_keys != {"embeddings.embeddings", "embeddings.indices"}:
        raise WeightsError(f"{where}: a ReToken needs both embeddings.embeddings and embeddings.indices")
    layers: list[LoRA] = []
    file_rank = int(state["weights.0.lora_down"].shape[0])
    for i, target in enumerate(targets):
        down, up = state[f"weights.{i}.lora_down"], state[f"weights.{i}.lora_up"]
        out_f, in_f = target.shape[:2]
        r = int(down.shape[0])
        if rank is not None and r != rank:
            raise WeightsError(f"{where} is a rank-{r} LoRA (weights.{i}.lora_down is {tuple(down.shape)}), "
                               f"rank {rank} was asked for; pass rank={r} or the LoRA of rank {rank}")
        if r != file_rank or down.dim() != 2 or up.dim() != 2 or up.shape[1] != r:
            raise WeightsError(f"{where}: layer {i} has rank {r} / {tuple(up.shape)}, layer 0 rank {file_rank}; "
                               "the file is corrupt or not a LoRA checkpoint")
        if (down.shape[1], up.shape[0]) != (in_f, out_f):
            raise WeightsError(
                f"{where}: layer {i} maps {down.shape[1]} -> {up.shape[0]} features, but {target.name}.{target.param} "
                f"of this model is {target.shape} ({in_f} -> {out_f}): the LoRA was trained for another model "
                "(e.g. the 3.6B vs the lite Stage C); use the Stage C it was trained on"
            )
        weight = target.original()
        layer = LoRA(out_f, in_f, r, alpha).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.lora_down.copy_(down)
            layer.lora_up.copy_(up)
        layers.append(layer.requires_grad_(False))
    retoken = None
    if embed_keys:
        emb, idx = state["embeddings.embeddings"], state["embeddings.indices"]
        if emb.dim() != 2 or idx.dim() != 1 or emb.shape[0] != idx.shape[0]:
            raise WeightsError(
                f"{where}: ReToken embeddings {tuple(emb.shape)} do not match indices {tuple(idx.shape)}"
            )
        retoken = ReToken(idx.tolist(), int(emb.shape[1]))
        with torch.no_grad():
            retoken.embeddings.copy_(emb)
        retoken.requires_grad_(False)
    return LoRAWeights(layers, retoken, float(scale), where, digest, tuple(filters), tokens)


def random_lora(
    model: nn.Module,
    *,
    rank: int = DEFAULT_RANK,
    filters: Sequence[str] = DEFAULT_FILTERS,
    seed: int = 0,
    std: float = 0.05,
    scale: float = 1.0,
    token_indices: Sequence[int] = (),
    token_dim: int | None = None,
    tokens: TrainTokens | Sequence = (),
) -> LoRAWeights:
    """A LoRA with random (seeded) weights for `model`: tests and demos (trained ones have lora_down != 0)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for target in lora_targets(model, filters):
        out_f, in_f = target.shape[:2]
        layer = LoRA(out_f, in_f, rank)
        with torch.no_grad():
            layer.lora_down.copy_(torch.randn(rank, in_f, generator=gen) * std)
            layer.lora_up.copy_(torch.randn(out_f, rank, generator=gen) * std)
        w = target.original()
        layers.append(layer.to(device=w.device, dtype=w.dtype).requires_grad_(False))
    retoken = None
    if token_indices:
        retoken = ReToken(token_indices, token_dim or 1280)
        with torch.no_grad():
            retoken.embeddings.copy_(torch.randn(retoken.embeddings.shape, generator=gen) * std)
        retoken.requires_grad_(False)
    lw = LoRAWeights(layers, retoken, float(scale), f"random:seed={seed}", "", tuple(filters),
                     parse_train_tokens(list(tokens), "tokens"))
    lw.digest = _tensor_digest(lw.state_dict())
    return lw


def save_lora(lora: LoRAWeights, path: str | Path) -> Path:
    """Write `lora` in the official layout (safetensors); its train_tokens, if any, go into the metadata."""
    metadata = {"format": "pt"}
    if lora.tokens:
        metadata["train_tokens"] = json.dumps([list(t) for t in lora.tokens])
    save_file({k: v.contiguous() for k, v in lora.state_dict().items()}, str(path), metadata=metadata)
    return Path(path)


# ------------------------------------------------------------------------------------------ applying
def _combined(weight: Tensor, deltas: Iterable[tuple[LoRA, float]]) -> Tensor:
    """weight + sum scale_i * delta_i, in the weight dtype, in the official operation order."""
    for layer, scale in deltas:
        d = layer.delta(weight.shape)
        weight = weight + (d if scale == 1.0 else d * scale)
    return weight


class _LoRAStack(nn.Module):
    """The parametrization `attach_official` registers: one or more LoRAs with their scales."""

    def __init__(self, layers: Sequence[LoRA], scales: Sequence[float]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.scales = [float(s) for s in scales]

    def forward(self, weight: Tensor) -> Tensor:
        return _combined(weight, zip(self.layers, self.scales))


def _check_bound(model: nn.Module, loras: Sequence[LoRAWeights]) -> list[LoRATarget]:
    filters = {lw.filters for lw in loras}
    if len(filters) > 1:
        raise ConfigError(f"LoRAs with different module filters cannot be combined: {sorted(filters)}")
    targets = lora_targets(model, next(iter(filters)) if filters else DEFAULT_FILTERS)
    for lw in loras:
        if len(lw.layers) != len(targets):
            raise ConfigError(f"LoRA {lw.source} has {len(lw.layers)} layers, the model {len(targets)} targets; "
                              "load it with load_lora(path, this_model)")
    return targets


def attach_official(model: nn.Module, loras: Sequence[LoRAWeights]) -> None:
    """Parametrize the targets as official `apply_lora` + `load_state_dict` does (one parametrization per layer
    holding every LoRA); `detach_official(model)` removes them and leaves the base weights untouched."""
    targets = _check_bound(model, loras)
    for i, target in enumerate(targets):
        stack = _LoRAStack([lw.layers[i] for lw in loras], [lw.scale for lw in loras])
        parametrize.register_parametrization(target.module, target.param, stack)


def detach_official(model: nn.Module) -> None:
    for module in model.modules():
        for param in TARGET_PARAMS:
            if parametrize.is_parametrized(module, param):
                parametrize.remove_parametrizations(module, param, leave_parametrized=False)


class LoRAMerger:
    """LoRAs written into a model's weights in place, with the base weights kept for an exact unmerge.

    The parameters are never replaced, only their values (`copy_`): a compiled module, an exported engine's
    refit source or a captured CUDA graph keeps pointing at the same storage. `originals_device` may be 'cpu'
    to keep the base copies off the GPU (switching then copies them back: slower, same result).
    """

    def __init__(self, model: nn.Module, filters: Sequence[str] = DEFAULT_FILTERS,
                 originals_device: str | torch.device | None = None) -> None:
        self.model, self.filters = model, tuple(filters)
        self.targets = lora_targets(model, filters)
        self._originals_device = originals_device
        self._originals: list[Tensor] | None = None
        self.active: list[LoRAWeights] = []
        self.last_switch_s: float | None = None

    @property
    def merged(self) -> bool:
        return bool(self.active)

    def _keep_originals(self) -> list[Tensor]:
        if self._originals is None:
            self._originals = [
                t.original().detach().to(self._originals_device or t.original().device, copy=True)
                for t in self.targets
            ]
        return self._originals

    @torch.no_grad()
    def apply(self, loras: Sequence[LoRAWeights]) -> float:
        """Make the weights `base + sum scale_i * delta_i` for `loras` (empty: the base weights); returns the
        seconds the switch took (device synchronised)."""
        if any(lw.filters != self.filters for lw in loras):
            raise ConfigError(f"this merger targets filters {list(self.filters)}; load the LoRA with the same filters")
        if loras:
            _check_bound(self.model, loras)
        originals = self._keep_originals()
        start = time.perf_counter()
        for i, (target, base) in enumerate(zip(self.targets, originals)):
            param = target.original()
            base = base.to(param.device, non_blocking=True)
            param.copy_(_combined(base, [(lw.layers[i], lw.scale) for lw in loras]) if loras else base)
        if self.targets and self.targets[0].original().is_cuda:
            torch.cuda.synchronize(self.targets[0].original().device)
        self.active = list(loras)
        self.last_switch_s = time.perf_counter() - start
        return self.last_switch_s

    def unmerge(self) -> float:
        """Restore the base weights exactly (bit for bit)."""
        return self.apply([])


# ------------------------------------------------------------------------------------------ ReToken
class ReTokenMerger:
    """LoRAs' ReTokens applied to a text encoder, as the official training/inference code sets them up.

    For each LoRA, in order: its new tokens (from its `train_tokens`) are added to the tokenizer and a row each is
    appended to the token-embedding table, started from the mean of the rows whose token matches the entry's
    init regex (zeros without one); then every ReToken vector is added to its row (new rows included). Without new
    tokens the table is written in place (same storage); with them it is a larger table while merged. The base
    table is kept: `unmerge()` restores the same Parameter bit for bit and removes the added tokens.

    Ids in a LoRA file are those of its training (its first new token is 49408); with several token-adding LoRAs
    each new token gets the next free id here, and a token two LoRAs both add is one row carrying both vectors.
    """

    def __init__(self, embedding: nn.Embedding, tokenizer: Any | None = None) -> None:
        self.embedding, self.tokenizer = embedding, tokenizer
        self._base = embedding.weight
        self._original: Tensor | None = None
        self._base_vocab: dict[str, int] | None = None
        self.active: list[LoRAWeights] = []

    @classmethod
    def for_text_encoder(cls, text_encoder: Any) -> ReTokenMerger | None:
        """The merger of a cascade_rt TextEncoder (None for an encoder without a token table)."""
        embedding = getattr(getattr(text_encoder, "tower", None), "token_embedding", None)
        if not isinstance(embedding, nn.Embedding):
            return None
        return cls(embedding, getattr(text_encoder, "tokenizer", None))

    def _vocab(self) -> dict[str, int]:
        if self._base_vocab is None:
            self._base_vocab = {k: v for k, v in self.tokenizer.vocab().items() if v < self._base.shape[0]}
        return self._base_vocab

    def _rows(self, lw: LoRAWeights, extra: list[Tensor]) -> list[int]:
        """The table rows `lw.retoken` updates, adding its new tokens (and their initial rows to `extra`)."""
        file_ids = [int(i) for i in lw.retoken.indices.tolist()]
        n_base = self._base.shape[0]
        if not lw.tokens:
            new = sorted(i for i in file_ids if i >= n_base)
            if new or any(i < 0 for i in file_ids):
                raise WeightsError(
                    f"{lw.source}: its ReToken updates token ids {new or file_ids}, beyond this text encoder's "
                    f"{n_base} embeddings: the LoRA adds {len(new)} new token(s) (such as '[fernando]'), and the file "
                    "holds only their ids; give its training config's train_tokens: --lora-tokens CONFIG.yaml, "
                    "or --lora-tokens '[name]=INIT_REGEX' per token (load_lora(..., tokens=[['[name]', 'regex']]))"
                )
            return file_ids
        if self.tokenizer is None:
            raise ConfigError(f"{lw.source} adds tokens, which needs the text encoder's tokenizer")
        base_vocab, local, expected = self._vocab(), {}, []
        for entry, _ in lw.tokens:  # the ids the official setup_models selects, in the LoRA's own id space
            if is_new_token(entry):
                local[entry] = n_base + len(local)
                expected.append(local[entry])
            else:
                expected += [v for k, v in {**base_vocab, **local}.items() if re.search(entry, k)]
        if set(expected) != set(file_ids):
            raise WeightsError(
                f"{lw.source}: its ReToken updates token ids {sorted(file_ids)[:8]}, but its train_tokens "
                f"{[list(t) for t in lw.tokens]} select ids {sorted(set(expected))[:8]}: these are not the tokens "
                "this LoRA was trained with; pass its own training config's train_tokens"
            )
        mapping: dict[int, int] = {}
        inits = dict(lw.tokens)
        for name, local_id in local.items():
            gid = self.tokenizer.add_token(name)
            if gid == n_base + len(extra):  # a token no earlier LoRA added: its initial row
                table = torch.cat([self._original, *extra]) if extra else self._original
                known = {**base_vocab, **self.tokenizer.added}
                ids = [v for k, v in known.items() if inits[name] is not None and re.search(inits[name], k)
                       and v < table.shape[0]]
                extra.append(table[ids].mean(dim=0, keepdim=True) if ids else torch.zeros_like(table[:1]))
            mapping[local_id] = gid
        return [mapping.get(i, i) for i in file_ids]

    @torch.no_grad()
    def apply(self, loras: Sequence[LoRAWeights]) -> None:
        """Make the text encoder the base one plus `loras`' tokens and ReToken vectors (empty: the base)."""
        if self._original is None:
            self._original = self._base.detach().clone()
        device = self.embedding.weight.device  # a memory mode may have moved the encoder since the last apply
        if self._original.device != device:
            self._original = self._original.to(device)
        if self._base.device != device:
            self._base.data = self._base.data.to(device)  # the same Parameter, as Module.to moves it
        if self.tokenizer is not None:
            self.tokenizer.reset_added()
        extra: list[Tensor] = []
        updates = []
        try:
            for lw in loras:
                if lw.retoken is None:
                    continue
                if lw.retoken.embeddings.shape[1] != self._base.shape[1]:
                    raise WeightsError(f"{lw.source}: ReToken embeddings are {lw.retoken.embeddings.shape[1]}-d, the "
                                       f"text encoder's {self._base.shape[1]}-d: the LoRA is for another text encoder")
                updates.append((self._rows(lw, extra), lw.retoken.embeddings))
        except Exception:
            self.apply(self.active)  # what was merged before (it applied then): a refused switch changes nothing
            raise
        table = torch.cat([self._original, *extra]) if extra else self._original.clone()
        for rows, vectors in updates:  # official ReToken: table[idx] += embeddings[i] (the vector's own dtype)
            for row, vector in zip(rows, vectors.to(table.device)):
                table[row] += vector
        if extra:
            self._base.copy_(self._original)
            self.embedding.weight = nn.Parameter(table, requires_grad=False)
        else:
            self._base.copy_(table)
            self.embedding.weight = self._base
        self.embedding.num_embeddings = int(self.embedding.weight.shape[0])
        self.active = list(loras)

    def unmerge(self) -> None:
        self.apply([])


@dataclass
class LoRASet:
    """The LoRAs applied to a pipeline: Stage C weights merged in place, ReTokens in the text encoder."""

    merger: LoRAMerger
    token_merger: ReTokenMerger | None = None
    loras: list[LoRAWeights] = field(default_factory=list)

    def apply(self, loras: Sequence[LoRAWeights]) -> float:
        if self.token_merger is not None:  # first: it refuses a LoRA whose tokens do not fit, before any change
            self.token_merger.apply(loras)
        elif any(lw.retoken is not None for lw in loras):
            raise ConfigError("a LoRA with a ReToken needs the pipeline's text encoder")
        try:
            seconds = self.merger.apply(loras)
        except Exception:
            if self.token_merger is not None:
                self.token_merger.apply(self.loras)
            raise
        self.loras = list(loras)
        return seconds

    def describe(self) -> list[dict[str, object]]:
        return [lw.describe() for lw in self.loras]
