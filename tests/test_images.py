"""Every PIL mode becomes the right RGB values in [0, 1] (`pipeline.from_pil` -> `images.to_rgb_array`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_rt.errors import ConfigError
from cascade_rt.images import open_image
from cascade_rt.pipeline import from_pil

GRADIENT_16 = np.arange(0, 65536, 257, dtype=np.uint16).reshape(1, 256)  # k * 257 = the 16-bit twin of 8-bit k
EIGHT_BIT = torch.arange(256, dtype=torch.float32) / 255


def rgb(image: Image.Image) -> torch.Tensor:
    """(H, W, 3) of from_pil, for readable indexing."""
    out = from_pil(image)
    assert out.shape == (1, 3, image.height, image.width) and out.dtype == torch.float32
    return out[0].permute(1, 2, 0)


def same_channels(x: torch.Tensor) -> torch.Tensor:
    assert torch.equal(x[..., 0], x[..., 1]) and torch.equal(x[..., 1], x[..., 2])
    return x[..., 0]


def test_16bit_gradient_keeps_its_range(tmp_path):
    """An I;16 gradient maps to k/255 at 257*k (PIL's own convert("RGB") made it 99.6 % white)."""
    image = Image.fromarray(GRADIENT_16)
    assert image.mode == "I;16"
    gray = same_channels(rgb(image))[0]
    torch.testing.assert_close(gray, EIGHT_BIT, atol=1e-6, rtol=0)
    assert abs(gray.mean().item() - 0.5) < 1e-3
    path = tmp_path / "gradient16.png"  # a real 16-bit PNG file, opened the way the CLI opens it
    image.save(path)
    reopened = open_image(path)
    assert reopened.mode in ("I;16", "I")
    torch.testing.assert_close(same_channels(rgb(reopened))[0], EIGHT_BIT, atol=1e-6, rtol=0)


def test_16bit_precision_is_not_rounded_to_8_bits():
    image = Image.fromarray(np.array([[1, 256, 65534]], dtype=np.uint16))
    torch.testing.assert_close(same_channels(rgb(image))[0], torch.tensor([1, 256, 65534]) / 65535.0)


def test_16bit_big_endian():
    values = np.array([[0, 1000, 40000, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (4, 1), values.tobytes())
    assert image.mode == "I;16B"
    torch.testing.assert_close(same_channels(rgb(image))[0], torch.tensor([0, 1000, 40000, 65535]) / 65535.0)


def test_mode_I_holds_16bit_samples():
    image = Image.fromarray(GRADIENT_16.astype(np.int32))
    assert image.mode == "I"
    torch.testing.assert_close(same_channels(rgb(image))[0], EIGHT_BIT, atol=1e-6, rtol=0)
    clipped = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32))
    assert same_channels(rgb(clipped))[0].tolist() == [0.0, 1.0]


def test_mode_F_is_taken_as_0_to_1_and_nan_refused():
    values = np.array([[0.0, 0.25, 0.5, 1.0, 1.5]], dtype=np.float32)
    gray = same_channels(rgb(Image.fromarray(values, mode="F")))[0]
    assert gray.tolist() == [0.0, 0.25, 0.5, 1.0, 1.0]
    with pytest.raises(ConfigError, match="NaN or Inf"):
        from_pil(Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32), mode="F"))


def test_L_and_1():
    gray = same_channels(rgb(Image.fromarray(np.arange(256, dtype=np.uint8).reshape(1, 256))))[0]
    torch.testing.assert_close(gray, EIGHT_BIT, atol=1e-6, rtol=0)
    bits = Image.fromarray(np.array([[0, 255, 0, 255]], dtype=np.uint8)).convert("1")
    assert bits.mode == "1" and same_channels(rgb(bits))[0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_palette_with_and_without_transparency():
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2])
    out = rgb(image)
    torch.testing.assert_close(out[0], torch.tensor([[255, 0, 0], [0, 0, 255], [10, 20, 30]]) / 255.0)
    image.info["transparency"] = 0  # palette index 0 (red) is transparent: white on the white background
    out = rgb(image)
    torch.testing.assert_close(out[0], torch.tensor([[255, 255, 255], [0, 0, 255], [10, 20, 30]]) / 255.0)


def test_cmyk_is_converted_with_k():
    cmyk = [(0, 0, 0, 0), (255, 0, 0, 0), (100, 50, 0, 60), (0, 0, 0, 255)]
    image = Image.new("CMYK", (4, 1))
    image.putdata(cmyk)
    expected = torch.tensor([[(255 - c) * (255 - k) / 255, (255 - m) * (255 - k) / 255, (255 - y) * (255 - k) / 255]
                             for c, m, y, k in cmyk]) / 255
    torch.testing.assert_close(rgb(image)[0], expected, atol=0.5 / 255, rtol=0)  # PIL rounds to 8 bits


@pytest.mark.parametrize("mode", ["RGBA", "RGBa"])
def test_rgba_alpha_is_composited_on_white(mode):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 255, 128)])
    image = rgba if mode == "RGBA" else rgba.convert("RGBa")
    a = 128 / 255
    expected = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1 - a, 1 - a, 1.0]])
    tol = 0 if mode == "RGBA" else 1.5 / 255  # premultiplied storage rounds the colour
    torch.testing.assert_close(rgb(image)[0], expected, atol=tol + 1e-6, rtol=0)


def test_la_alpha_is_composited_on_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 128), (200, 255)])
    gray = same_channels(rgb(image))[0]
    torch.testing.assert_close(gray, torch.tensor([1 - 128 / 255, 200 / 255]))


def test_rgb_and_ycbcr():
    colour = (12, 200, 99)
    torch.testing.assert_close(rgb(Image.new("RGB", (2, 2), colour))[1, 1], torch.tensor(colour) / 255.0)
    ycc = Image.new("RGB", (2, 2), colour).convert("YCbCr")
    assert (rgb(ycc)[0, 0] - torch.tensor(colour) / 255.0).abs().max().item() < 3 / 255


def test_modes_agree_on_one_picture():
    """One 8-bit gray picture in L, I;16, I, F, LA (opaque), P and RGB gives one tensor."""
    base = np.random.default_rng(0).integers(0, 256, size=(8, 8), dtype=np.uint8)
    ref = from_pil(Image.fromarray(base))
    variants = {
        "I;16": Image.fromarray(base.astype(np.uint16) * 257),
        "I": Image.fromarray(base.astype(np.int32) * 257),
        "F": Image.fromarray(base.astype(np.float32) / 255, mode="F"),
        "LA": Image.fromarray(base).convert("LA"),
        "P": Image.fromarray(base).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
        "RGB": Image.fromarray(base).convert("RGB"),
    }
    for mode, image in variants.items():
        assert image.mode == mode
        torch.testing.assert_close(from_pil(image), ref, atol=1e-6, rtol=0, msg=mode)


def test_server_uploads_keep_their_mode_and_bombs_are_refused(tmp_path):
    """The server decodes uploads with the same strict decoder; a 16-bit upload reaches from_pil intact."""
    import io

    from cascade_rt.serve.schemas import RequestError, decode_image

    buf = io.BytesIO()
    Image.fromarray(GRADIENT_16).save(buf, format="PNG")
    torch.testing.assert_close(same_channels(rgb(decode_image(buf.getvalue())))[0], EIGHT_BIT, atol=1e-6, rtol=0)
    bomb = io.BytesIO()
    Image.new("1", (10000, 9000)).save(bomb, format="PNG")  # 90 M pixels, a 11 kB file
    with pytest.raises(RequestError, match="decompression-bomb limit") as info:
        decode_image(bomb.getvalue())
    assert info.value.status == 400
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(noise, "PNG")
    with pytest.raises(RequestError, match="truncated or corrupt"):
        decode_image(noise.getvalue()[: len(noise.getvalue()) // 2])
