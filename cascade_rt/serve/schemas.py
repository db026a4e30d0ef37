"""What a request may ask for, checked before it reaches the queue (docs/serving.md, "Requests").

`GenerationBody` is the JSON body of `POST /v1/images/generations` (the OpenAI images API) with the documented
extensions; `parse_generation` turns a body (or a multipart form, for image-to-image and variations) into a
`GenerationSpec`: one request as the batcher sees it. Every refusal is a `RequestError` carrying the HTTP status
(400 for values the model cannot serve, 422 for a body of the wrong shape) and a reason that says what to send.
Resolution rules come from `cascade_rt.stages.check_resolution`; nothing here redeclares them. A ControlNet
control image (its inpainting mask, its strength) is checked here too, against the ControlNet the server loaded
(`ControlSupport`), so that no batch fails on one request's control input.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cascade_rt.errors import ConfigError, FileError
from cascade_rt.images import decode_image_bytes
from cascade_rt.stages import IMG2IMG_STRENGTH, SAMPLING, check_resolution

MAX_STEPS = 100
MAX_PROMPT_CHARS = 4000
MAX_IMAGE_BYTES = 20 * 1024 * 1024
SEED_LIMIT = 2**63
MAX_CONTROL_STRENGTH = 2.0  # the ControlNet projections' multiplier (official cnet_multiplier): 0 = no effect


class RequestError(Exception):
    """A refused request: `status` (400/413/422) and a reason for the body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class GenerationBody(BaseModel):
    """OpenAI `images.generate` fields (model/quality/style/user are accepted and ignored) plus extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1)
    size: str | None = None  # "WIDTHxHEIGHT" (OpenAI order) or "auto"
    response_format: Literal["b64_json", "url"] | None = None
    stream: bool = False
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # extensions (docs/serving.md)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    steps_c: int = Field(SAMPLING["c"].steps, ge=1, le=MAX_STEPS)
    steps_b: int = Field(SAMPLING["b"].steps, ge=1, le=MAX_STEPS)
    cfg_c: float | None = Field(SAMPLING["c"].cfg, ge=0, le=30)
    cfg_b: float | None = Field(SAMPLING["b"].cfg, ge=0, le=30)
    strength: float = Field(IMG2IMG_STRENGTH, gt=0, le=1)  # image-to-image only
    image: str | None = None  # native /v1/generate only: base64 image for image-to-image
    control_image: str | None = None  # native /v1/generate only: base64 ControlNet control image
    mask: str | None = None  # native /v1/generate only: base64 inpainting mask (the inpainting ControlNet)
    control_strength: float | None = Field(None, ge=0, le=MAX_CONTROL_STRENGTH)  # with a control image; default 1


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys may share a batch: same shape, same sampling settings, same kind of conditioning."""

    height: int
    width: int
    steps_c: int
    steps_b: int
    cfg_c: float | None
    cfg_b: float | None
    mode: str = "text"  # text | image (image-to-image) | variation
    strength: float = 1.0


@dataclass(frozen=True)
class ControlSupport:
    """What the server's pipeline can do with a control image: the loaded ControlNet's kind (None: no ControlNet)
    and whether a saliency model makes inpainting masks for requests that send none."""

    kind: str | None = None
    saliency: bool = False


@dataclass
class ControlInput:
    """A request's ControlNet input: its projections are computed once, for its rows only (serve/engine.py)."""

    image: Image.Image
    mask: Image.Image | None = None  # mode 'L' or '1', the control image's size; white = repaint
    strength: float = 1.0


@dataclass
class GenerationSpec:
    prompt: str
    negative_prompt: str
    n: int
    seed: int
    key: BatchKey
    image: Image.Image | None = None  # image-to-image input, or the variation's CLIP image
    stream: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    control: ControlInput | None = None  # the ControlNet's input (any mode; requests with and without share batches)


@dataclass(frozen=True)
class Limits:
    """What this server serves: image sizes warmed at start (height, width) and the largest batch."""

    sizes: tuple[tuple[int, int], ...]
    max_batch: int

    @property
    def default_size(self) -> tuple[int, int]:
        return self.sizes[0]


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def load_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None


def parse_size(size: str | None, limits: Limits) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (height, width), checked against the resolution rules and the served sizes."""
    if size in (None, "auto"):
        return limits.default_size
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise RequestError(400, f"size {size!r} is not WIDTHxHEIGHT (e.g. '1024x1024')", "size") from None
    try:
        check_resolution(height, width)
    except ConfigError as exc:
        raise RequestError(400, str(exc), "size") from None
    if (height, width) not in limits.sizes:
        served = ", ".join(f"{w}x{h}" for h, w in limits.sizes)
        raise RequestError(
            400, f"size {size} is not served here: this server warmed {served} at start (restart it with "
            f"--sizes to add one)", "size",
        )
    return height, width


def decode_image(data: bytes | str, param: str = "image") -> Image.Image:
    """Bytes (or base64 text) of an image -> the decoded PIL image in its own mode (`pipeline.from_pil` converts
    16-bit, palette, CMYK and alpha images correctly; PIL's convert("RGB") would clip 16-bit values to white);
    anything else, a truncated image or a decompression bomb included, is a 400 naming the parameter."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{param} is not base64 text; send a base64-encoded PNG or JPEG", param) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestError(413, f"{param} is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}", param)
    try:  # decoded strictly (truncation and decompression bombs are refused); any PIL mode: from_pil converts it
        return decode_image_bytes(data, "the upload")
    except FileError as exc:
        raise RequestError(400, f"{param} cannot be decoded as an image: {exc}", param) from None


CONTROLNET_HINT = "start the server with --controlnet canny|inpainting|sr (docs/extensions.md)"


def control_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An uploaded inpainting mask -> mode 'L' or '1' (white = repaint), checked against the control image's size
    (PIL order: width, height). A grayscale mask is used as it is; an RGBA / LA mask follows OpenAI's edits
    convention: its transparent pixels (alpha < 128) are the region to repaint."""
    if mask.mode in ("RGBA", "LA"):
        alpha = np.asarray(mask.getchannel("A"))
        if alpha.min() >= 128:
            raise RequestError(400, f"mask is a {mask.mode} image without transparent pixels: in an RGBA mask the "
                                    "transparent pixels mark the region to repaint (OpenAI's convention); make them "
                                    "transparent, or send a grayscale image (white = repaint)", "mask")
        mask = Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), mode="L")
    elif mask.mode not in ("L", "1"):
        raise RequestError(400, f"mask is a {mask.mode} image; send a grayscale ('L') image, white = repaint and "
                                "black = keep, or an RGBA image whose transparent pixels mark the region to repaint",
                           "mask")
    if mask.size != size:
        raise RequestError(400, f"mask is {mask.width}x{mask.height}, the control image {size[0]}x{size[1]}: send a "
                                "mask of the control image's size", "mask")
    return mask


def check_control(image: Image.Image | None, mask: Image.Image | None, strength: float | None,
                  support: ControlSupport) -> ControlInput | None:
    """A request's control image, mask and strength -> its `ControlInput` (None without a control image), checked
    against the loaded ControlNet, so that the batch it joins cannot fail on it."""
    if support.kind is None and (image is not None or mask is not None):
        param = "control_image" if image is not None else "mask"
        raise RequestError(400, f"{param}: this server has no ControlNet loaded, so it takes no control image or "
                                f"inpainting mask; {CONTROLNET_HINT}", param)
    if image is None:
        if mask is not None:
            raise RequestError(400, "mask without a control image: the inpainting mask belongs to a control image; "
                                    "send control_image (or, on /v1/images/edits, image) with it", "mask")
        if strength is not None:
            raise RequestError(400, "control_strength without a control image has nothing to scale; send "
                                    "control_image (or, on /v1/images/edits, image) with it", "control_strength")
        return None
    if mask is not None and support.kind != "inpainting":
        raise RequestError(400, f"mask: only the inpainting ControlNet takes a mask; this server loaded the "
                                f"{support.kind} ControlNet", "mask")
    if support.kind == "inpainting" and mask is None and not support.saliency:
        raise RequestError(400, "mask: the inpainting ControlNet needs a mask (white = repaint) and this server has "
                                "no saliency model to make one (serve --saliency-model saliency_model.pt)", "mask")
    if mask is not None:
        mask = control_mask(mask, image.size)
    return ControlInput(image, mask, 1.0 if strength is None else float(strength))


def parse_generation(data: Any, limits: Limits, *, mode: str = "text", image: Image.Image | None = None,
                     native: bool = False, next_seed: Callable[[], int] | None = None,
                     control_image: Image.Image | None = None, mask: Image.Image | None = None,
                     control: ControlSupport = ControlSupport()) -> GenerationSpec:
    """A JSON-like body -> a checked `GenerationSpec` (RequestError otherwise). A request without a seed gets
    `next_seed()` (the server's --seed sequence) or a random one. `control_image` / `mask`: uploaded files
    (multipart); the native body carries them as base64 fields; `control`: what the server's ControlNet takes."""
    if not isinstance(data, dict):
        raise RequestError(422, f"the request body must be a JSON object, got {type(data).__name__}")
    if not native:
        for name in [n for n in ("image", "control_image", "mask") if n in data]:
            raise RequestError(422, f"{name}: not a field of this endpoint; upload it to /v1/images/edits (multipart) "
                                    "or send it base64-encoded to /v1/generate", name)
    try:
        body = GenerationBody.model_validate(data)
    except ValidationError as exc:
        raise RequestError(422, _reason(exc)) from None
    if body.response_format == "url":
        raise RequestError(400, "response_format 'url' is not supported: images are returned inline; use "
                                "'b64_json'", "response_format")
    if body.n > limits.max_batch:
        raise RequestError(400, f"n={body.n} is more than this server's largest batch ({limits.max_batch}); "
                                f"ask for at most {limits.max_batch} images per request", "n")
    if mode == "text" and not body.prompt.strip():
        raise RequestError(400, "prompt is empty; give a text prompt", "prompt")
    if native and body.image is not None:
        image, mode = decode_image(body.image), "image"
    if native and body.control_image is not None:
        control_image = decode_image(body.control_image, "control_image")
    if native and body.mask is not None:
        mask = decode_image(body.mask, "mask")
    control_input = check_control(control_image, mask, body.control_strength, control)
    height, width = parse_size(body.size, limits)
    if mode == "image" and int(body.steps_c * body.strength) < 1:
        raise RequestError(400, f"steps_c * strength = {body.steps_c} * {body.strength} gives no Stage C step; "
                                "raise either", "strength")
    key = BatchKey(height, width, body.steps_c, body.steps_b, body.cfg_c, body.cfg_b, mode,
                   body.strength if mode == "image" else 1.0)
    if body.seed is not None:
        seed = body.seed
    else:
        seed = next_seed() if next_seed is not None else random.randrange(SEED_LIMIT)
    meta = {"prompt": body.prompt, "negative": body.negative_prompt, "seed": seed, "height": height,
            "width": width, "steps_c": body.steps_c, "steps_b": body.steps_b, "cfg_c": body.cfg_c,
            "cfg_b": body.cfg_b, "mode": mode}
    if mode == "image":
        meta["strength"] = body.strength
    if control_input is not None:
        meta["control"] = {"kind": control.kind, "strength": control_input.strength,
                           "mask": control_input.mask is not None}
    return GenerationSpec(body.prompt, body.negative_prompt, body.n, seed, key, image, body.stream, meta,
                          control_input)


def parse_multipart(content_type: str, raw: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """A multipart/form-data body -> (text fields, file fields). Parsed with the standard library's MIME parser."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError(400, f"send multipart/form-data (an 'image' file and form fields), got {content_type!r}")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    if not message.is_multipart():
        raise RequestError(400, "the multipart body cannot be parsed; check its boundary")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        name = name.removesuffix("[]")
        if part.get_filename() is not None:
            files[name] = payload
        else:
            fields[name] = payload.decode("utf-8", "replace")
    return fields, files


FORM_INTS = ("n", "seed", "steps_c", "steps_b")
FORM_FLOATS = ("cfg_c", "cfg_b", "strength", "control_strength")


def form_to_body(fields: dict[str, str]) -> dict[str, Any]:
    """Multipart text fields -> JSON-like values (numbers parsed; pydantic reports the ones that are not)."""
    body: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ("cfg_c", "cfg_b") and value.lower() in ("none", "null"):
            body[name] = None
        elif name in FORM_INTS + FORM_FLOATS:
            try:
                body[name] = int(value) if name in FORM_INTS else float(value)
            except ValueError:
                raise RequestError(422, f"{name}: {value!r} is not a number", name) from None
        elif name == "stream":
            body[name] = value.lower() in ("1", "true", "yes")
        else:
            body[name] = value
    return body
