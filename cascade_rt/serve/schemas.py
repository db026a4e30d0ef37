"""What a request may ask for, checked before it reaches the queue (docs/serving.md, "Requests").

`GenerationBody` is the JSON body of `POST /v1/images/generations` (the OpenAI images API) with the documented
extensions; `parse_generation` turns a body (or a multipart form, for image-to-image and variations) into a
`GenerationSpec`: one request as the batcher sees it. Every refusal is a `RequestError` carrying the HTTP status
(400 for values the model cannot serve, 422 for a body of the wrong shape) and a reason that says what to send.
Resolution rules come from `cascade_rt.stages.check_resolution`; nothing here redeclares them.
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

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cascade_rt.errors import ConfigError, FileError
from cascade_rt.images import decode_image_bytes
from cascade_rt.stages import IMG2IMG_STRENGTH, SAMPLING, check_resolution

MAX_STEPS = 100
MAX_PROMPT_CHARS = 4000
MAX_IMAGE_BYTES = 20 * 1024 * 1024
SEED_LIMIT = 2**63


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


def parse_generation(data: Any, limits: Limits, *, mode: str = "text", image: Image.Image | None = None,
                     native: bool = False, next_seed: Callable[[], int] | None = None) -> GenerationSpec:
    """A JSON-like body -> a checked `GenerationSpec` (RequestError otherwise). A request without a seed gets
    `next_seed()` (the server's --seed sequence) or a random one."""
    if not isinstance(data, dict):
        raise RequestError(422, f"the request body must be a JSON object, got {type(data).__name__}")
    if not native and "image" in data:
        raise RequestError(422, "image: not a field of this endpoint; upload it to /v1/images/edits", "image")
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
    return GenerationSpec(body.prompt, body.negative_prompt, body.n, seed, key, image, body.stream, meta)


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
FORM_FLOATS = ("cfg_c", "cfg_b", "strength")


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
