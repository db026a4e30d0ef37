"""HTTP helpers of the application: the OpenAI error body, PNG encoding with metadata, the body size limit, and
the `X-Served-By` header."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cascade_rt.commands.generate import RANDOM_NOTE
from cascade_rt.serve.schemas import MAX_IMAGE_BYTES, RequestError

MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 2**20  # a base64 image at the limit, plus the other fields


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def encode_png(image: Image.Image, meta: dict[str, Any], random_weights: bool) -> bytes:
    info = PngInfo()
    info.add_text("cascade-rt", json.dumps(meta))
    if random_weights:
        info.add_text("cascade-rt-weights", RANDOM_NOTE)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


async def read_body(request: Request) -> bytes:
    """The request body, refused (413) past MAX_BODY_BYTES before it is read when Content-Length says so."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"the body is {declared} bytes; the limit is {MAX_BODY_BYTES} (images up to "
                                f"{MAX_IMAGE_BYTES} bytes)")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"the body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    return body


class ServedBy:
    """Adds `X-Served-By: host:pid` (which process, which Ray Serve replica, answered) to every response. A plain
    ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from the routes."""

    def __init__(self, app: Any) -> None:
        self.app, self.value = app, f"{socket.gethostname()}:{os.getpid()}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-served-by", self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class ClientGone(Exception):
    """The client disconnected before its answer."""


class Refusal(Exception):
    """A request refused before parsing (not ready): status, message, error type, headers."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers
