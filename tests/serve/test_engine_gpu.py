"""On CUDA: the next batch's Stage C on one stream while this batch's Stage B/A runs on another gives the images
the batches give one after the other; with a ControlNet, batches mixing requests with and without control images
replay the warmed CUDA graphs (the GPU plan's `tests` step runs them; skipped without a GPU)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

pytest.importorskip("pydantic")  # the request schemas; the GPU image gets it from the carried wheels

from cascade_rt.serve.batcher import Batcher  # noqa: E402
from cascade_rt.serve.engine import BatchEngine  # noqa: E402
from cascade_rt.serve.schemas import BatchKey, ControlInput, GenerationSpec  # noqa: E402
from cascade_rt.stages import SAMPLING  # noqa: E402

KEY = BatchKey(256, 256, 4, 3, SAMPLING["c"].cfg, SAMPLING["b"].cfg)


def run_batches(engine, specs: list[GenerationSpec], max_batch: int) -> tuple[list, int]:
    """All specs queued before the scheduler starts (so the batches are the same whatever the engine), then run
    through the batcher; returns each request's images and the number of batches."""

    async def main():
        batcher = Batcher(engine, max_batch=max_batch, max_wait=0.05, max_queue=len(specs))
        jobs = [batcher.submit(spec, timeout=600) for spec in specs]
        batcher.start()
        images = await asyncio.gather(*(job.future for job in jobs))
        await batcher.stop()
        return images, batcher.batches

    return asyncio.run(main())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the overlap runs on CUDA streams)")
def test_overlapped_batches_equal_sequential_batches_on_cuda():
    from cascade_rt import load_pipeline

    specs = [GenerationSpec(f"prompt {i}", "", 1, 300 + i, KEY) for i in range(6)]
    results = {}
    for overlap in (False, True):
        pipe = load_pipeline(random_weights=True, preset="tiny", device="cuda", dtype=torch.float32, seed=0)
        engine = BatchEngine(pipe, overlap=overlap)
        assert engine.overlap is overlap
        engine.warmup([(256, 256)], max_batch=2)
        results[overlap], batches = run_batches(engine, specs, max_batch=2)
        assert batches == 3
    for seq, ovl in zip(results[False], results[True]):
        diff = np.abs(np.asarray(seq[0], dtype=int) - np.asarray(ovl[0], dtype=int))
        assert diff.max() <= 1, diff.max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs, streams)")
def test_control_batches_replay_the_warmed_graphs_and_match_the_pipeline_on_cuda():
    from PIL import Image

    from cascade_rt import load_pipeline

    pipe = load_pipeline(random_weights=True, preset="tiny", device="cuda", dtype=torch.float32, seed=0,
                         controlnet="inpainting")
    engine = BatchEngine(pipe, overlap=True)
    engine.warmup([(256, 256)], max_batch=2)
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 160))
    control = ControlInput(Image.new("RGB", (256, 256), (30, 160, 90)), mask, 1.5)
    specs = [GenerationSpec(f"prompt {i}", "", 1, 400 + i, KEY, control=control if i % 2 == 0 else None)
             for i in range(4)]
    images, batches = run_batches(engine, specs, max_batch=2)
    assert batches == 2
    stats = {stage: dict(g.stats) for stage, g in pipe.graphed.items()}
    assert stats and all(s["fallbacks"] == 0 and s["replays"] > 0 for s in stats.values()), stats
    for spec, got in zip(specs, images):
        kw = {}
        if spec.control is not None:
            kw = dict(control_image=control.image, mask=control.mask, control_strength=control.strength)
        want = pipe(spec.prompt, seed=spec.seed, height=256, width=256, steps_c=KEY.steps_c, steps_b=KEY.steps_b,
                    **kw).images[0]
        diff = np.abs(np.asarray(got[0], dtype=np.float64) - np.asarray(want, dtype=np.float64))
        assert diff.mean() < 1.0 and np.mean(diff > 8) < 0.01, (diff.mean(), np.mean(diff > 8))
