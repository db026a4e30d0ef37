"""Per-request ControlNet inputs over HTTP (`serve --controlnet`): the tiny pipeline with a random inpainting
ControlNet. A served image equals `pipe(prompt, control_image=..., mask=..., seed=...)`; requests with different
control images (and none) share a batch and each gets what it gets alone; bad inputs are refused before the queue.

The random tiny models make the control's effect on the final image small (a fraction of a grey level: the tiny
Stage B barely follows Stage C) but far above the batch-size rounding, so each batched image is checked to be
much closer to its own reference than to any other request's."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.serve.conftest import FAST, start_server

SIZE = dict(height=256, width=256)


@pytest.fixture(scope="module")
def cnet_pipe():
    from cascade_rt import load_pipeline

    return load_pipeline(random_weights=True, preset="tiny", seed=0, device="cpu", dtype=torch.float32,
                         controlnet="inpainting")


@pytest.fixture(scope="module")
def cnet_server(cnet_pipe):
    running = start_server(cnet_pipe, max_batch=3, max_wait_ms=500, max_queue=6)
    yield running
    running.stop()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def gradient(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256]
    base = np.stack([xx, yy, 255 - xx], -1) + rng.integers(0, 40, (256, 256, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def rect_mask(box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, box)
    return mask


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def native(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", json=body, timeout=120)


def test_served_control_image_equals_the_pipeline_and_changes_the_image(cnet_server, cnet_pipe):
    control, mask = gradient(0), rect_mask((64, 64, 192, 160))
    body = {"prompt": "a house", "seed": 3, "control_image": b64(control), "mask": b64(mask),
            "control_strength": 1.5, **FAST}
    r = native(cnet_server.url, body)
    assert r.status_code == 200, r.text
    served = Image.open(io.BytesIO(r.content))
    meta = json.loads(served.text["cascade-rt"])
    assert meta["control"] == {"kind": "inpainting", "strength": 1.5, "mask": True}
    want = cnet_pipe("a house", seed=3, control_image=control, mask=mask, control_strength=1.5, **SIZE, **FAST)
    assert np.array_equal(as_array(served), as_array(want.images[0]))  # a batch of one request: bit for bit

    plain = native(cnet_server.url, {"prompt": "a house", "seed": 3, **FAST})
    assert plain.status_code == 200, plain.text
    uncontrolled = as_array(Image.open(io.BytesIO(plain.content)))
    assert np.array_equal(uncontrolled, as_array(cnet_pipe("a house", seed=3, **SIZE, **FAST).images[0]))
    assert np.abs(uncontrolled - as_array(served)).mean() > 0.2  # the control image changed the image
    assert httpx.get(f"{cnet_server.url}/readyz").json()["controlnet"] == "inpainting"


def test_edits_image_is_the_control_image_and_control_image_keeps_image_to_image(cnet_server, cnet_pipe):
    control, source = gradient(1), gradient(2).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # OpenAI's edits mask: RGBA, transparent where the image is to be edited
    rgba = np.full((256, 256, 4), 255, dtype=np.uint8)
    rgba[32:128, 96:224, 3] = 0
    mask = Image.fromarray(rgba, mode="RGBA")
    grey = rect_mask((96, 32, 224, 128))  # the same region as a grayscale mask: white = repaint

    r = httpx.post(f"{cnet_server.url}/v1/images/edits", timeout=120,
                   files={"image": ("c.png", png(control), "image/png"), "mask": ("m.png", png(mask), "image/png")},
                   data={"prompt": "a boat", "seed": "4", "size": "256x256", **{k: str(v) for k, v in FAST.items()}})
    assert r.status_code == 200, r.text
    got = as_array(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
    want = cnet_pipe("a boat", seed=4, control_image=control, mask=grey, **SIZE, **FAST)
    assert np.array_equal(got, as_array(want.images[0]))

    r = httpx.post(f"{cnet_server.url}/v1/images/edits", timeout=120,
                   files={"image": ("s.png", png(source), "image/png"),
                          "control_image": ("c.png", png(control), "image/png"),
                          "mask": ("m.png", png(grey), "image/png")},
                   data={"prompt": "a boat", "seed": "4", "strength": "0.5", "control_strength": "0.7",
                         **{k: str(v) for k, v in FAST.items()}})
    assert r.status_code == 200, r.text
    got = as_array(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
    want = cnet_pipe("a boat", seed=4, image=source, strength=0.5, control_image=control, mask=grey,
                     control_strength=0.7, **SIZE, **FAST)
    assert np.array_equal(got, as_array(want.images[0]))


def test_requests_with_different_control_images_share_a_batch_and_match_each_alone(cnet_server, cnet_pipe):
    inputs = [
        dict(control_image=gradient(3), mask=rect_mask((64, 64, 192, 160)), control_strength=2.0),
        dict(control_image=gradient(4), mask=rect_mask((0, 0, 256, 256)), control_strength=0.5),
        {},  # no control: zero projections in the batch, none alone
    ]
    bodies = []
    for kw in inputs:
        body = {"prompt": "a house", "seed": 30, **FAST}  # the same seed: the references differ by their control
        if kw:
            body.update(control_image=b64(kw["control_image"]), mask=b64(kw["mask"]),
                        control_strength=kw["control_strength"])
        bodies.append(body)
    before = cnet_server.batches()
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: native(cnet_server.url, b), bodies))
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    assert cnet_server.batches() - before == 1  # three requests, max_batch 3: one model batch
    got = [as_array(Image.open(io.BytesIO(r.content))) for r in responses]
    refs = [as_array(cnet_pipe("a house", seed=b["seed"], **SIZE, **FAST, **kw).images[0])
            for b, kw in zip(bodies, inputs)]
    for i, image in enumerate(got):
        # the tolerance of test_batching.py: the CPU kernels' batch-size dependent fp32 rounding
        diff = np.abs(image - refs[i])
        assert diff.mean() < 1.0 and np.mean(diff > 8) < 0.01, (diff.mean(), np.mean(diff > 8))
        # and each row got its own projections: far closer to its own reference than to the others'
        others = [np.abs(image - ref).mean() for j, ref in enumerate(refs) if j != i]
        assert 4 * diff.mean() < min(others), (i, diff.mean(), others)


def rgb_png(size=(256, 256)) -> str:
    return b64(Image.new("RGB", size, (10, 200, 30)))


GREY = b64(rect_mask((0, 0, 10, 10)))
OPAQUE = b64(Image.new("RGBA", (256, 256), (0, 0, 0, 255)))  # an RGBA mask with nothing transparent
BAD = [  # (endpoint, body kwargs for httpx, expected status, words in the reason)
    ("generate", {"json": {"prompt": "a", "mask": GREY}}, 400, "mask without a control image"),
    ("generate", {"json": {"prompt": "a", "control_image": rgb_png()}}, 400,
     "needs a mask (white = repaint) and this server has no saliency model"),
    ("generate", {"json": {"prompt": "a", "control_image": rgb_png(), "mask": b64(Image.new("L", (128, 64)))}}, 400,
     "mask is 128x64, the control image 256x256"),
    ("generate", {"json": {"prompt": "a", "control_image": rgb_png(), "mask": rgb_png()}}, 400,
     "mask is a RGB image; send a grayscale ('L') image"),
    ("generate", {"json": {"prompt": "a", "control_image": rgb_png(), "mask": OPAQUE}}, 400,
     "mask is a RGBA image without transparent pixels"),
    ("generate", {"json": {"prompt": "a", "control_image": rgb_png(), "mask": GREY, "control_strength": 2.5}}, 422,
     "control_strength: Input should be less than or equal to 2"),
    ("generate", {"json": {"prompt": "a", "control_image": rgb_png(), "mask": GREY, "control_strength": -1}}, 422,
     "control_strength: Input should be greater than or equal to 0"),
    ("generate", {"json": {"prompt": "a", "control_strength": 0.5}}, 400, "control_strength without a control image"),
    ("generate", {"json": {"prompt": "a", "control_image": "%%%", "mask": GREY}}, 400, "control_image is not base64"),
    ("generations", {"json": {"prompt": "a", "control_image": rgb_png()}}, 422,
     "control_image: not a field of this endpoint"),
    ("edits", {"files": {"image": ("x.png", base64.b64decode(rgb_png()), "image/png")},
               "data": {"prompt": "a", "strength": "0.5"}}, 400, "strength: with a ControlNet loaded, image is the "
                                                                  "control image"),
    ("edits", {"files": {"image": ("x.png", base64.b64decode(rgb_png()), "image/png"),
                         "mask": ("m.png", base64.b64decode(rgb_png((64, 64))), "image/png")},
               "data": {"prompt": "a"}}, 400, "mask is a RGB image"),
]
PATHS = {"generations": "/v1/images/generations", "edits": "/v1/images/edits", "generate": "/v1/generate"}


@pytest.mark.parametrize("endpoint,kwargs,status,reason", BAD, ids=[f"{b[0]}-{b[3][:24]}" for b in BAD])
def test_bad_control_input_is_refused_before_the_queue(cnet_server, endpoint, kwargs, status, reason):
    before = cnet_server.batches()
    r = httpx.post(cnet_server.url + PATHS[endpoint], timeout=30, **kwargs)
    assert r.status_code == status, r.text[:300]
    assert reason in r.json()["error"]["message"], r.json()
    assert cnet_server.batches() == before and cnet_server.service.batcher.waiting == 0


def test_check_control_against_other_controlnets():
    from cascade_rt.serve.schemas import ControlSupport, RequestError, check_control

    image, mask = Image.new("RGB", (64, 32)), Image.new("L", (64, 32))
    with pytest.raises(RequestError, match="only the inpainting ControlNet takes a mask; this server loaded the canny"):
        check_control(image, mask, None, ControlSupport("canny"))
    with pytest.raises(RequestError, match="has no ControlNet loaded") as info:
        check_control(image, None, 1.0, ControlSupport())
    assert info.value.status == 400 and info.value.param == "control_image"
    assert check_control(image, None, None, ControlSupport("inpainting", saliency=True)).mask is None  # saliency's
    rgba = Image.new("RGBA", (64, 32), (0, 0, 0, 255))
    rgba.putpixel((3, 2), (0, 0, 0, 0))
    got = check_control(image, rgba, 0.0, ControlSupport("inpainting")).mask
    assert got.mode == "L" and np.argwhere(np.asarray(got) == 255).tolist() == [[2, 3]]  # transparent = repaint


def test_serve_command_loads_the_controlnet():
    import argparse

    from cascade_rt.commands import serve
    from cascade_rt.commands.generate import load_from_args

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--random-weights", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32",
                              "--controlnet", "sr"])
    pipe = load_from_args(args)
    assert pipe.extensions.control == "sr" and pipe.extensions.controlnet_source == "random:seed=7"


def test_the_openai_client_sends_a_control_image_and_an_rgba_mask(cnet_server, cnet_pipe):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{cnet_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    control = gradient(5)
    rgba = np.zeros((256, 256, 4), dtype=np.uint8)  # OpenAI's mask: transparent = edit, here all but a band
    rgba[:, :128, 3] = 255
    result = client.images.edit(image=("c.png", png(control), "image/png"),
                                mask=("m.png", png(Image.fromarray(rgba, mode="RGBA")), "image/png"),
                                prompt="a red cube", size="256x256", extra_body={"seed": 9, "control_strength": 0.6,
                                                                                 **FAST})
    got = as_array(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))
    want = cnet_pipe("a red cube", seed=9, control_image=control, mask=rect_mask((128, 0, 256, 256)),
                     control_strength=0.6, **SIZE, **FAST)
    assert np.array_equal(got, as_array(want.images[0]))
