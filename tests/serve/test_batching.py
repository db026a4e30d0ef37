"""Dynamic batching: concurrent requests share model batches, and each gets the images it would get alone."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from tests.serve.conftest import FAST


def generate(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)


def pixels(response: httpx.Response) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))), dtype=np.float64)
            for d in response.json()["data"]]


def test_concurrent_requests_share_batches_and_match_one_by_one(server):
    bodies = [{"prompt": f"prompt {i}", "seed": 100 + i, "n": 1 + (i == 1), **FAST} for i in range(5)]
    before = server.batches()
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: generate(server.url, b), bodies))
    batches = server.batches() - before
    assert [r.status_code for r in responses] == [200] * len(bodies)
    # 6 images, max_batch 4, max_wait 300 ms: at least two requests shared a batch (fewer batches than requests)
    assert 2 <= batches < len(bodies), batches
    refs = [server.pipe(b["prompt"], images_per_prompt=b["n"], seed=b["seed"], height=256, width=256, **FAST)
            for b in bodies]
    for body, response, ref in zip(bodies, responses, refs):
        got = pixels(response)
        assert len(got) == body["n"]
        for image, want in zip(got, ref.images):
            # per-request generators make the noise identical; what differs is the CPU kernels' batch-size
            # dependent fp32 rounding (~5e-7 per model call), which untrained random weights amplify over the
            # steps. Images of different seeds differ by ~100 levels on average.
            diff = np.abs(image - np.asarray(want, dtype=np.float64))
            assert diff.mean() < 1.0 and np.mean(diff > 8) < 0.01, (diff.mean(), np.mean(diff > 8))
    other = np.abs(pixels(responses[0])[0] - pixels(responses[2])[0]).mean()
    assert other > 20, other


def test_different_settings_queue_separately(server):
    bodies = [{"prompt": "a", "seed": 1, **FAST}, {"prompt": "a", "seed": 1, "steps_c": 3, "steps_b": 2}]
    before = server.batches()
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda b: generate(server.url, b), bodies))
    assert [r.status_code for r in responses] == [200, 200]
    assert server.batches() - before == 2  # different steps: never merged
    assert np.abs(pixels(responses[0])[0] - pixels(responses[1])[0]).mean() > 1


def test_load_generator_counts_every_request(server):
    from cascade_rt.serve.loadgen import run_load

    before = server.batches()
    row = run_load(server.url, {"prompt": "load", **FAST}, concurrency=3, requests=6)
    assert row["ok"] == 6 and row["statuses"] == {200: 6}
    assert 0 < row["p50_s"] <= row["p99_s"] and row["images_per_s"] > 0
    assert server.batches() - before < 6  # three clients in flight share batches


def test_row_generators_draw_each_requests_rows_from_its_own_seed():
    import pytest
    import torch

    from cascade_rt.errors import ConfigError
    from cascade_rt.sampling import RowGenerators, draw_noise

    gens = RowGenerators([(torch.Generator().manual_seed(s), n) for s, n in ((5, 1), (9, 2), (5, 1))])
    like = torch.empty(4, 3, 2, 2)
    first, second = draw_noise(like, gens), draw_noise(like, gens)
    for rows, seed, n in ((slice(0, 1), 5, 1), (slice(1, 3), 9, 2), (slice(3, 4), 5, 1)):
        alone = torch.Generator().manual_seed(seed)
        assert torch.equal(first[rows], torch.randn((n, 3, 2, 2), generator=alone))
        assert torch.equal(second[rows], torch.randn((n, 3, 2, 2), generator=alone))  # the next draw continues
    with pytest.raises(ConfigError, match="batch of 5 rows"):
        gens.randn((5, 3))


def test_overlapped_phases_keep_every_answer(server):
    """The pipelined schedule (the next batch's prior while this batch's decoder runs, as on CUDA) run on the CPU's
    two worker threads: same answers, fewer batches than requests."""
    engine = server.service.engine
    engine.overlap = True
    try:
        bodies = [{"prompt": f"overlap {i}", "seed": 200 + i, **FAST} for i in range(6)]
        before = server.batches()
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: generate(server.url, b), bodies))
        assert [r.status_code for r in responses] == [200] * 6
        assert server.batches() - before < 6
    finally:
        engine.overlap = False
    for body, response in zip(bodies, responses):
        want = server.pipe(body["prompt"], seed=body["seed"], height=256, width=256, **FAST).images[0]
        diff = np.abs(pixels(response)[0] - np.asarray(want, dtype=np.float64))
        assert diff.mean() < 1.0 and np.mean(diff > 8) < 0.01, (diff.mean(), np.mean(diff > 8))
