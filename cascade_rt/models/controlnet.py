"""ControlNet for Stage C and its control filters (official modules/controlnet.py, configs/inference/
controlnet_c_3b_*.yaml, inference/controlnet.ipynb). See docs/extensions.md.

* `ControlNet(c_in, c_proj, proj_blocks, bottleneck_mode)`: a feature backbone ('effnet': torchvision's
  EfficientNetV2-S `features`, its first conv replaced by an unpadded `Conv2d(c_in, 24, 3, stride 2)` when
  c_in != 3; 'simple'; 'large') and one projection (1x1 conv, LeakyReLU(0.2), 1x1 conv to c_proj, the last one
  zero-initialised) per entry of `proj_blocks`. `forward` returns the official list: index = block, None where
  no projection goes.
* Injection (official `ControlNetDeliverer` + `StageC._down_encode/_up_decode`): Stage C's ResBlocks, counted in
  call order over the down then up path (repeats included), take the next list entry; a tensor is bilinearly
  resized (align_corners=True) to the block input's size and added to it before the block runs. Stage C does
  this in `denoise(..., cnet=...)` (`cascade_rt.models.unet`).
* `prepare_control(...)`: the step-invariant part, once per prompt: filter -> ControlNet -> projections,
  resized once to the Stage C latent grid (the size every ResBlock of the released Stage C sees, so the
  per-step resize is the identity) and multiplied by the control strength (the notebook's `cnet_multiplier`).
  The same projections condition the CFG branch (official: `cnet_uncond = cnet`).
* Filters (`CONTROLS`): canny (OpenCV's Canny at 224x224, thresholds 100/200, as official), inpainting (the
  user's mask, or the official saliency model's mask when none is given), super-resolution (EfficientNet latent
  of the half-size image, nearest-upscaled 2x: the official SREffnetFilter / notebook input). Identity (face
  embeddings) needs the insightface models and is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from cascade_rt.errors import ConfigError, WeightsError
from cascade_rt.models.common import LayerNorm2d, ResBlock, interpolate_fp32
from cascade_rt.models.effnet import normalize_imagenet
from cascade_rt.weights import open_checkpoint

RELEASED_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)  # controlnet_c_3b_{canny,inpainting,sr}.yaml controlnet_blocks
TINY_BLOCKS = (0, 5)  # the tiny Stage C: its first and last ResBlock (both of width c_hidden[0])


@dataclass(frozen=True)
class ControlKind:
    name: str
    c_in: int  # the filter's num_channels()
    bottleneck_mode: str
    filter: str  # the official filter class
    checkpoint: str  # official file name


CONTROLS = {
    "canny": ControlKind("canny", 1, "effnet", "CannyFilter", "canny.safetensors"),
    "inpainting": ControlKind("inpainting", 4, "effnet", "InpaintFilter", "inpainting.safetensors"),
    "sr": ControlKind("sr", 16, "large", "SREffnetFilter", "super_resolution.safetensors"),
}


def control_kind(name: str) -> ControlKind:
    try:
        return CONTROLS[name]
    except KeyError:
        extra = (" (face identity is not supported: no identity checkpoint is released, and its filter needs "
                 "insightface's face detector and ArcFace models)") if name == "identity" else ""
        raise ConfigError(f"unknown ControlNet {name!r}{extra}; choose one of {', '.join(CONTROLS)}") from None


# ------------------------------------------------------------------------------------------ the model
class CNetResBlock(nn.Module):
    """The 'large' bottleneck's residual block (affine LayerNorm2d, GELU, 3x3 conv, twice)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            LayerNorm2d(c), nn.GELU(), nn.Conv2d(c, c, kernel_size=3, padding=1),
            LayerNorm2d(c), nn.GELU(), nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.blocks(x)


class ControlNet(nn.Module):
    def __init__(
        self,
        c_in: int = 3,
        c_proj: int = 2048,
        proj_blocks: Sequence[int] = RELEASED_BLOCKS,
        bottleneck_mode: str | None = None,
        large_width: int = 4096 * 4,
    ) -> None:
        super().__init__()
        bottleneck_mode = bottleneck_mode or "effnet"
        if not proj_blocks or len(set(proj_blocks)) != len(proj_blocks) or min(proj_blocks) < 0:
            raise ConfigError(f"proj_blocks must be distinct block indices >= 0, got {list(proj_blocks)}")
        self.proj_blocks = [int(b) for b in proj_blocks]
        self.bottleneck_mode = bottleneck_mode
        if bottleneck_mode == "effnet":
            from torchvision.models import efficientnet_v2_s

            embd = 1280
            self.backbone = efficientnet_v2_s(weights=None).features.eval()  # the checkpoint carries its weights
            if c_in != 3:
                self.backbone[0][0] = nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False)  # official: no padding
        elif bottleneck_mode == "simple":
            embd = c_in
            self.backbone = nn.Sequential(
                nn.Conv2d(embd, embd * 4, kernel_size=3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(embd * 4, embd, kernel_size=3, padding=1),
            )
        elif bottleneck_mode == "large":
            embd = 1280
            self.backbone = nn.Sequential(
                nn.Conv2d(c_in, large_width, kernel_size=1), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(large_width, 1024, kernel_size=1), *[CNetResBlock(1024) for _ in range(8)],
                nn.Conv2d(1024, 1280, kernel_size=1),
            )
        else:
            raise ConfigError(f"unknown ControlNet bottleneck_mode {bottleneck_mode!r}; use effnet, simple or large")
        self.projections = nn.ModuleList()
        for _ in self.proj_blocks:
            proj = nn.Sequential(
                nn.Conv2d(embd, embd, kernel_size=1, bias=False), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(embd, c_proj, kernel_size=1, bias=False),
            )
            nn.init.constant_(proj[-1].weight, 0)  # zero output projection
            self.projections.append(proj)

    @property
    def c_in(self) -> int:
        first = self.backbone[0][0] if self.bottleneck_mode == "effnet" else self.backbone[0]
        return int(first.in_channels)

    @property
    def c_proj(self) -> int:
        return int(self.projections[0][-1].out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.projections[0][0].weight.dtype

    def projections_of(self, x: Tensor) -> list[Tensor]:
        """One projection per `proj_blocks` entry, in that order."""
        features = self.backbone(x.to(self.dtype))
        return [proj(features) for proj in self.projections]

    def forward(self, x: Tensor) -> list[Tensor | None]:
        """The official output: a list indexed by block (length max(proj_blocks) + 1), None where nothing goes."""
        out: list[Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for idx, p in zip(self.proj_blocks, self.projections_of(x)):
            out[idx] = p
        return out


def resblock_widths(stage_c: nn.Module) -> list[int]:
    """The channel width of every ResBlock of a Stage C in deliverer order (down path, then up path, with repeats)."""
    widths = []
    for blocks, repmaps in ((stage_c.down_blocks, stage_c.down_repeat_mappers),
                            (stage_c.up_blocks, stage_c.up_repeat_mappers)):
        for group, repmap in zip(blocks, repmaps):
            for _ in range(len(repmap) + 1):
                widths += [int(b.depthwise.in_channels) for b in group if isinstance(b, ResBlock)]
    return widths


def check_fits(controlnet: ControlNet, stage_c: nn.Module, where: str = "the ControlNet") -> None:
    """Every projection goes to an existing ResBlock of width c_proj (else the official code would fail)."""
    widths = resblock_widths(stage_c)
    beyond = [b for b in controlnet.proj_blocks if b >= len(widths)]
    wrong = [
        f"{b} (width {widths[b]})" for b in controlnet.proj_blocks if b < len(widths) and widths[b] != controlnet.c_proj
    ]
    if beyond or wrong:
        raise ConfigError(
            f"{where} injects at blocks {controlnet.proj_blocks} with {controlnet.c_proj} channels, but this Stage C "
            f"has {len(widths)} ResBlocks" + (f"; blocks {beyond} do not exist" if beyond else "")
            + (f"; blocks {', '.join(wrong)} have another width" if wrong else "")
            + ": the ControlNet was made for another Stage C (the released ones fit the 3.6B Stage C)"
        )


def default_blocks(stage_c: nn.Module) -> tuple[int, ...]:
    """The released block list for a Stage C with 64 ResBlocks; the tiny list for the tiny preset."""
    return RELEASED_BLOCKS if len(resblock_widths(stage_c)) == 64 else TINY_BLOCKS


def build_controlnet(
    kind: str,
    stage_c: nn.Module,
    *,
    blocks: Sequence[int] | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    large_width: int | None = None,
) -> ControlNet:
    """The ControlNet of `kind` for `stage_c` (c_proj = its block width). With `seed`: random weights, the
    output projections included (a trained ControlNet's are not zero), for tests and demos."""
    ck = control_kind(kind)
    blocks = tuple(blocks) if blocks is not None else default_blocks(stage_c)
    widths = resblock_widths(stage_c)
    c_proj = widths[blocks[0]] if blocks[0] < len(widths) else widths[0]
    if large_width is None:  # the released 'large' bottleneck is 16384 wide; a tiny Stage C gets a narrow one
        large_width = 4096 * 4 if len(widths) == 64 else 64
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = ControlNet(ck.c_in, c_proj, blocks, ck.bottleneck_mode, large_width=large_width)
        if seed is not None:
            with torch.no_grad():
                for proj in model.projections:
                    nn.init.normal_(proj[-1].weight, std=0.5 / math.sqrt(proj[-1].in_channels))
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_mean.normal_(0, 0.1)
                        m.running_var.uniform_(0.5, 1.5)
    check_fits(model, stage_c)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_controlnet(
    path: str | Path,
    kind: str,
    stage_c: nn.Module,
    *,
    blocks: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ControlNet:
    """An official ControlNet checkpoint (canny.safetensors, inpainting.safetensors, super_resolution.safetensors),
    strictly: a file for another control kind, block list or Stage C is a WeightsError saying so."""
    ck = control_kind(kind)
    blocks = tuple(blocks) if blocks is not None else default_blocks(stage_c)
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ControlNet file {path} does not exist; pass the path of {ck.checkpoint}")
    with open_checkpoint(path) as source:
        shapes = {k: tuple(i.shape) for k, i in source.infos.items()}
        n_proj = len({k.split(".")[1] for k in shapes if k.startswith("projections.")})
        if not n_proj:
            raise WeightsError(f"{path} is not a ControlNet checkpoint (no 'projections.*' keys); pass {ck.checkpoint}")
        if n_proj != len(blocks):
            raise WeightsError(
                f"{path} has {n_proj} projections, but {kind} injects at {len(blocks)} blocks {list(blocks)}: it is "
                "a ControlNet for another block list (identity uses all 64 blocks); pass the matching checkpoint "
                "or its block list"
            )
        first = "backbone.0.0.weight" if ck.bottleneck_mode == "effnet" else "backbone.0.weight"
        c_in = shapes.get(first, (None, None))[1]
        if c_in != ck.c_in:
            other = next((k.name for k in CONTROLS.values() if k.c_in == c_in), None)
            raise WeightsError(
                f"{path} takes {c_in}-channel control inputs, a {kind} ControlNet {ck.c_in}"
                + (f": it is the {other} ControlNet; use --controlnet {other}" if other else "")
            )
        large_width = shapes["backbone.0.weight"][0] if ck.bottleneck_mode == "large" else 4096 * 4
        with torch.device("meta"):
            model = ControlNet(ck.c_in, shapes["projections.0.2.weight"][0], blocks, ck.bottleneck_mode, large_width)
        check_fits(model, stage_c, str(path))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        bad = [k for k in expected if k in shapes and shapes[k] != expected[k]]
        if missing or unexpected or bad:
            raise WeightsError(
                f"{path} does not fit the {kind} ControlNet: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"shapes differ for {bad[:3]}; use the official {ck.checkpoint}"
            )
        state = {}
        for k, ref in model.state_dict().items():
            t = source.get(k)
            state[k] = torch.empty(t.shape, dtype=dtype if ref.is_floating_point() else ref.dtype,
                                   device=device).copy_(t)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ filters
def _require_cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise ConfigError(
            "the canny ControlNet filter uses OpenCV's Canny (as the official code does), and OpenCV is not "
            "installed: pip install opencv-python-headless"
        ) from None
    return cv2


def canny_filter(images: Tensor, resize: int | None = 224, low: int = 100, high: int = 200) -> Tensor:
    """Official CannyFilter: (B,3,H,W) in [0,1] -> (B,1,H,W) edges in [0,1] (cv2.Canny(.., 100, 200) at 224x224)."""
    cv2 = _require_cv2()
    size = images.shape[-2:]
    x = images.float().cpu()
    if resize is not None:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear")
    arrays = x.mul(255).permute(0, 2, 3, 1).numpy().astype("uint8")  # truncation, as official astype(np.uint8)
    edges = torch.stack([torch.from_numpy(cv2.Canny(a.copy(), low, high)).float().div(255)[None] for a in arrays])
    if resize is not None:
        edges = F.interpolate(edges, size=tuple(size), mode="bilinear")
    return edges


def mask_from_image(mask: Any, size: Sequence[int]) -> Tensor:
    """A user mask (PIL image in mode 'L' or '1', or a (H,W) / (B,1,H,W) tensor) of the control image's size ->
    (B,1,H,W) bool, True = the region to repaint (white)."""
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1"):
            raise ConfigError(f"the inpainting mask is a {mask.mode} image; save it as a grayscale ('L') or 1-bit "
                              "image: white = repaint, black = keep")
        if (mask.height, mask.width) != tuple(size):
            raise ConfigError(f"the inpainting mask is {mask.width}x{mask.height}, the control image "
                              f"{size[1]}x{size[0]}: give a mask of the control image's size")
        return torch.from_numpy(np.asarray(mask.convert("L")).copy() > 127)[None, None]
    if isinstance(mask, Tensor):
        m = mask[None, None] if mask.dim() == 2 else mask
        if m.dim() != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != tuple(size):
            raise ConfigError(f"the inpainting mask tensor is {tuple(mask.shape)}; expected (H, W) or (B, 1, H, W) "
                              f"with H, W = {tuple(size)} (the control image's size)")
        return m > 0.5 if m.is_floating_point() else m.bool()
    raise ConfigError(f"the inpainting mask must be a PIL image or a tensor, got {type(mask).__name__}")


def inpaint_filter(images: Tensor, mask: Tensor) -> Tensor:
    """Official InpaintFilter with a mask: [images with the masked region set to 1 (white) ; mask] (B,4,H,W)."""
    mask = mask.to(images.device)
    if mask.shape[0] != images.shape[0]:
        mask = mask.expand(images.shape[0], -1, -1, -1)
    return torch.cat([torch.where(mask, torch.ones_like(images), images), mask.to(images.dtype)], dim=1)


class MicroResNet(nn.Module):
    """The official inpainting saliency model (modules/cnet_modules/inpainting/saliency_model.py); weights:
    the official saliency_model.pt. Input (B,3,h,w) in [0,1], output (B,1,h',w') saliency in [0,1]."""

    class _Res(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.resblock = nn.Sequential(
                nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c, affine=True), nn.ReLU(),
                nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c, affine=True),
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.resblock(x) + x

    class _Up(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.interpolate(x, scale_factor=2, mode="nearest")

    def __init__(self) -> None:
        super().__init__()
        self.downsampler = nn.Sequential(
            nn.ReflectionPad2d(4), nn.Conv2d(3, 8, 9, stride=4), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(8, 16, 3, stride=2), nn.InstanceNorm2d(16, affine=True), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(16, 32, 3, stride=2), nn.InstanceNorm2d(32, affine=True), nn.ReLU(),
        )
        self.residual = nn.Sequential(self._Res(32), nn.Conv2d(32, 64, 1, bias=False, groups=32), self._Res(64))
        self.segmentator = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(64, 16, 3), nn.InstanceNorm2d(16, affine=True), nn.ReLU(),
            self._Up(), nn.ReflectionPad2d(4), nn.Conv2d(16, 1, 9), nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.segmentator(self.residual(self.downsampler(x)))


def load_saliency_model(path: str | Path) -> MicroResNet:
    model = MicroResNet()
    if not Path(path).is_file():
        raise WeightsError(f"saliency model {path} does not exist; pass the official saliency_model.pt")
    with open_checkpoint(path) as source:
        state = {k: source.get(k) for k in source.infos}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} is not the official inpainting saliency model: {exc}") from None
    return model.eval().requires_grad_(False)


def saliency_mask(images: Tensor, model: MicroResNet, threshold: float = 0.2, outpaint: bool = False) -> Tensor:
    """Official InpaintFilter without a mask: saliency at 240 px (short side) > threshold (the notebook's 0.2),
    inverted for outpainting, nearest-resized, Gaussian-blurred (kernel 141) and thresholded at 0.5."""
    # torchvision: 3 s to import, and it imports triton, whose compiled/interpreted mode the triton backend
    # must choose first (runtime/backends.py)
    import torchvision.transforms.functional as TF

    small = TF.resize(images.float(), 240, antialias=True)
    salient = model(small) > threshold
    if outpaint:
        salient = ~salient
    full = F.interpolate(salient.float(), size=tuple(images.shape[-2:]), mode="nearest")
    return TF.gaussian_blur(full, 141) > 0.5


def sr_control_input(images: Tensor, effnet: nn.Module, latent_hw: Sequence[int]) -> Tensor:
    """The SR ControlNet's input: the EfficientNet latent of the image at half the output size, nearest-upscaled
    2x (official SREffnetFilter and inference/controlnet.ipynb: effnet(image) interpolated x2, nearest)."""
    half = [32 * math.ceil(s / 2) for s in latent_hw]
    small = F.interpolate(images.float(), size=half, mode="bilinear", antialias=True).clamp(0, 1)
    latent = effnet(normalize_imagenet(small).to(effnet.dtype)).float()
    return F.interpolate(latent, scale_factor=2, mode="nearest")


# ------------------------------------------------------------------------------------------ per prompt
def control_image_tensor(image: Any) -> Tensor:
    from cascade_rt.pipeline import from_pil  # lazy: the pipeline module imports this one

    return from_pil(image)


def prepare_control(
    controlnet: ControlNet,
    kind: str,
    image: Any,
    *,
    latent_hw: Sequence[int],
    batch: int,
    strength: float = 1.0,
    mask: Any = None,
    effnet: nn.Module | None = None,
    saliency: MicroResNet | None = None,
    threshold: float = 0.2,
    outpaint: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """{'cnet': the official projection list} for Stage C's `denoise`: once per prompt (see module docstring).

    The control image (PIL or (B,3,H,W) in [0,1]) is resized (bilinear, antialiased, as the official
    resize_image) to 32x the Stage C latent grid, so the EfficientNetV2 features have that grid.
    """
    control_kind(kind)
    here = next(controlnet.parameters()).device  # the ControlNet's device (it may differ in memory modes)
    device = torch.device(device) if device is not None else here
    pixels = control_image_tensor(image).to(here)
    size = [32 * int(s) for s in latent_hw]
    if kind == "inpainting":
        if mask is not None:
            m = mask_from_image(mask, pixels.shape[-2:]).to(here)
        elif saliency is not None:
            m = saliency_mask(pixels, saliency.to(here), threshold, outpaint)
        else:
            raise ConfigError("inpainting needs a mask (--mask, white = repaint) or the official saliency model "
                              "(--saliency-model saliency_model.pt) to make one")
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True).clamp(0, 1)
        m = F.interpolate(m.float(), size=size, mode="nearest").bool()
        control = inpaint_filter(pixels, m)
    elif kind == "canny":
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True).clamp(0, 1)
        control = canny_filter(pixels).to(here)
    else:
        if effnet is None:
            raise ConfigError("the sr ControlNet needs the EfficientNet encoder; this pipeline has none")
        effnet_device = next(effnet.parameters()).device
        control = sr_control_input(pixels.to(effnet_device), effnet, latent_hw).to(here)
    with torch.inference_mode():
        projections = controlnet.projections_of(control)
    out: list[Tensor | None] = [None] * (max(controlnet.proj_blocks) + 1)
    for idx, p in zip(controlnet.proj_blocks, projections):
        p = interpolate_fp32(p, tuple(latent_hw), dtype or p.dtype) * strength
        if p.shape[0] != batch:
            if batch % p.shape[0]:
                raise ConfigError(f"got {p.shape[0]} control images for a batch of {batch}; give 1 or {batch}")
            p = p.repeat_interleave(batch // p.shape[0], dim=0)
        out[idx] = p.to(device)
    return {"cnet": out}
