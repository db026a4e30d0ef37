"""Image files in and out: open an input image strictly, convert any PIL mode to RGB in [0, 1], save checked.

* `open_image(path, flag)` (`decode_image_bytes(data)` for an upload): the image fully decoded, or a `FileError`
  naming the path, what is wrong (missing, a folder, a symlink loop, not an image, truncated or corrupt, over
  PIL's decompression-bomb limit) and the fix. Decoding happens here, so a truncated file fails before any model
  is loaded, not after the compute.
* `to_rgb_array(image)`: (H, W, 3) float32 in [0, 1] for every PIL mode, with the bit depth the mode has (a
  16-bit image keeps its 16 bits; PIL's own `convert("RGB")` clips 16-bit values to 255, i.e. white). Alpha is
  composited on white.
* `output_format(path, flag)` and `save_image(image, path, ...)`: the format PIL infers from the extension,
  checked before any work; a failed write (disk full, permissions) is a `FileError` and leaves no partial file.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cascade_rt.errors import ConfigError, FileError

IMAGE_SAVE_HINT = "use .png (or .jpg, .webp)"
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
PREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}


def path_problem(path: str | Path) -> str | None:
    """Why `path` cannot be opened as an existing file or folder (a phrase for a message), or None if it exists."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (a link that points back to itself)"
        if exc.errno == errno.ENOENT:
            return "is a broken symlink (its target does not exist)" if os.path.islink(path) else "does not exist"
        if exc.errno == errno.ENOTDIR:
            return "does not exist (a part of the path is a file, not a folder)"
        if exc.errno == errno.EACCES:
            return "cannot be read (permission denied)"
        return f"cannot be read ({exc.strerror or exc})"
    return None


def open_image(path: str | Path, flag: str = "image") -> Image.Image:
    """Open and fully decode an image file; every failure is a `FileError` with the path and the fix.

    PIL's decompression-bomb warning (more than `Image.MAX_IMAGE_PIXELS` pixels) is an error here: no supported
    input needs more than 2048 x 2048 pixels.
    """
    problem = path_problem(path)
    if problem:
        raise FileError(f"{flag} {path} {problem}: give the path of an image file (PNG, JPEG, WebP, ...)")
    if os.path.isdir(path):
        raise FileError(f"{flag} {path} is a folder: give the path of an image file (PNG, JPEG, WebP, ...)")
    return _decode(path, f"{flag} {path}")


def decode_image_bytes(data: bytes, what: str = "image") -> Image.Image:
    """`open_image` for the bytes of an image file (an upload): fully decoded, or a `FileError` saying why."""
    return _decode(io.BytesIO(data), what)


def _decode(source: Any, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FileError(
            f"{what} has more pixels than PIL's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS} pixels): "
            "it is damaged or hostile, or far larger than any supported size; resize it to at most 2048 px a side"
        ) from None
    except UnidentifiedImageError:
        raise FileError(f"{what} is not an image PIL can read: give a PNG, JPEG, WebP, BMP or TIFF file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL reports truncation/corruption as these
        raise FileError(f"{what} is truncated or corrupt ({exc}): re-export or re-copy the image") from None
    return image


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a PIL image of any mode.

    * 8-bit modes (L, P, RGB, CMYK, YCbCr, LAB, HSV, RGBX, 1): value / 255 after PIL's conversion to RGB (CMYK:
      R = (1 - C)(1 - K)); mode 1 gives 0 or 1.
    * 16-bit modes (I;16, I;16L, I;16B, I;16N): value / 65535, full precision (no 8-bit rounding).
    * I (32-bit integers, what PIL reads some 16-bit PNG/TIFF files as): value / 65535, clipped to [0, 1].
    * F (32-bit float): taken as [0, 1] values and clipped; NaN/Inf is refused.
    * Alpha (RGBA, LA, PA, RGBa, La, and P or L or RGB with a transparency colour): composited on a white
      background, rgb * a + (1 - a), as an image viewer shows it on a white page.
    """
    mode = image.mode
    if mode in PREMULTIPLIED:
        image, mode = image.convert(PREMULTIPLIED[mode]), PREMULTIPLIED[mode]
    if mode in ("P", "PA", "L", "RGB", "1") and ("transparency" in image.info or mode == "PA"):
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in SIXTEEN_BIT or mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if mode == "F":
            if not np.isfinite(values).all():
                raise ConfigError("the image (mode F, 32-bit float) contains NaN or Inf values; fix the image")
        else:
            values = values / 65535.0
        gray = np.clip(values, 0.0, 1.0).astype(np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA"):
        arr = np.asarray(image.convert("RGBA")).astype(np.float32) / 255.0
        rgb, alpha = arr[..., :3], arr[..., 3:4]
        return (rgb * alpha + (1.0 - alpha)).astype(np.float32)
    return np.asarray(image.convert("RGB")).astype(np.float32) / 255.0


def output_format(path: str | Path, flag: str = "-o") -> str:
    """The PIL format that saving to `path` uses (from its extension), or a `FileError` with the fix."""
    Image.init()
    suffix = Path(path).suffix.lower()
    if not suffix:
        raise FileError(f"{flag} {path} has no extension, so the image format is unknown: {IMAGE_SAVE_HINT}")
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE or not _writes_rgb(fmt):
        raise FileError(f"{flag} {path}: PIL cannot write RGB images as {suffix} files: {IMAGE_SAVE_HINT}")
    return fmt


@functools.lru_cache(maxsize=None)
def _writes_rgb(fmt: str) -> bool:
    """Whether PIL can save an RGB image in `fmt` (some writers take only other modes, some need a plugin)."""
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception:  # noqa: BLE001 - any failure of the writer means: not this format
        return False
    return True


def save_image(image: Image.Image, path: str | Path, flag: str = "-o", **params: Any) -> None:
    """`image.save(path, **params)`; an OS error (disk full, permissions) becomes a `FileError`, and the partial
    file is removed."""
    path = Path(path)
    try:
        image.save(path, **params)
    except OSError as exc:
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
        fix = "free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
        reason = exc.strerror or exc
        raise FileError(f"could not write {flag} {path}: {reason}; {fix} or choose another {flag}") from None
