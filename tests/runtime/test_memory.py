"""Memory modes: offload units and hooks (CPU mechanics), the manager, the meta-device estimate (edge preset in
8 GB at 1024²); GPU: measured peaks per mode, and the estimate against them."""

from __future__ import annotations

import pytest
import torch

from cascade_rt.errors import ConfigError
from cascade_rt.models import build_model
from cascade_rt.models.presets import TINY_CLIP_DIMS, get_preset
from cascade_rt.runtime.estimate import GiB, MemoryEstimate, estimate_memory
from cascade_rt.runtime.memory import BlockOffloader, MemoryManager, offload_units

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")


def test_offload_units_are_the_outermost_blocks(tiny_c, tiny_a):
    units = offload_units(tiny_c)
    blocks = [m for group in (*tiny_c.down_blocks, *tiny_c.up_blocks) for m in group]
    assert set(map(id, blocks)) <= set(map(id, units))
    assert tiny_c.down_downscalers[1][1] in units and tiny_c.up_upscalers[0][1] in units  # the level changes
    assert tiny_c.embedding[1] in units and tiny_c.clip_txt_mapper not in units  # loose layers stay resident
    nested = [u for u in units for v in units if u is not v and any(m is u for m in v.modules())]
    assert not nested
    assert tiny_a.up_blocks[1] in offload_units(tiny_a)  # Stage A: the elements of its Sequentials


class PoisonedOffloader(BlockOffloader):
    """Host copies are NaN and the real weights arrive only through `_copy`: a parameter read outside a
    load (e.g. an AttnBlock entered through `attend`, not `forward`) turns the output into NaN."""

    def __init__(self, model):
        super().__init__(model, torch.device("cpu"))
        self.real = {}
        for unit in self.units:
            for t in self._tensors(unit):
                self.real[id(t)] = t.data.clone()
                if t.is_floating_point():
                    t.data = torch.full_like(t.data, float("nan"))

    def _copy(self, idx):
        self.transfers += 1
        return [self.real[id(t)].clone() for t in self._tensors(self.units[idx])]


def _run(model, stage, g):
    dims = TINY_CLIP_DIMS
    r = torch.tensor([0.3, 0.8])
    with torch.inference_mode():  # as the pipeline runs
        if stage == "c":
            cond = model.prepare_conditioning(torch.randn(2, 77, dims["text_hidden"], generator=g),
                                              torch.randn(2, 1, dims["text_pooled"], generator=g),
                                              torch.zeros(2, 1, dims["image"]))
            return model.denoise(torch.randn(2, 16, 4, 4, generator=g), r, **cond)
        if stage == "b":
            cond = model.prepare_conditioning(torch.randn(2, 16, 4, 4, generator=g),
                                              torch.randn(2, 1, dims["text_pooled"], generator=g), latent_hw=(16, 16))
            return model.denoise(torch.randn(2, 4, 16, 16, generator=g), r, **cond)
        return model.decode(torch.randn(1, 4, 8, 8, generator=g))


@pytest.mark.parametrize("stage", ["c", "b", "a"])
def test_block_offloader_loads_every_block_it_runs(stage):
    ref, model = (build_model(f"stage_{stage}_tiny", seed=3) for _ in range(2))
    off = PoisonedOffloader(model)
    for call in range(2):
        out = _run(model, stage, torch.Generator().manual_seed(call))
        assert torch.isfinite(out).all() and torch.equal(out, _run(ref, stage, torch.Generator().manual_seed(call)))
        assert all(torch.isnan(t).all() for u in off.units for t in u.parameters())  # back on the host
    assert off.transfers > 0 and not any(off._depth)
    if stage == "b":  # Stage B repeats levels: one forward calls units more than once
        assert len(off._order) > len(set(off._order))
    off.remove()
    assert not any(name in u.__dict__ for u in off.units for name in ("forward", "attend", "cond_kv"))


def test_memory_manager_modes_on_cpu(tiny_c, tiny_b):
    with pytest.raises(ConfigError, match="unknown memory mode 'swap'"):
        MemoryManager("swap", "cpu", {})
    for mode in ("resident", "sequential", "offload"):
        manager = MemoryManager(mode, "cpu", {"c": tiny_c, "b": tiny_b})
        assert not manager.moves_weights
        for stage in ("c", "c", "b"):
            manager.enter(stage)
        manager.finish()
        assert manager.peaks == {"c": None, "b": None} and manager.current is None
        with manager.stage("c"):
            assert manager.current == "c"
        assert manager.report()["mode"] == mode


@pytest.fixture(scope="module")
def edge_estimate() -> MemoryEstimate:
    return estimate_memory(height=1024, width=1024, batch=1)  # the edge preset: C lite + B lite, bf16, sequential


def test_edge_preset_fits_in_8_gb_at_1024(edge_estimate):
    e = edge_estimate
    assert e.mode == "sequential" and set(e.stages) == {"c", "b", "a", "text"}
    # weights are exact: parameter counts (docs/reference.md §2) x 2 bytes
    assert e.stages["c"].weight_bytes == 2 * get_preset("stage_c_lite").params
    assert e.stages["b"].weight_bytes == 2 * get_preset("stage_b_lite").params
    assert e.stages["text"].weight_bytes == 2 * 694_659_840  # CLIP ViT-bigG-14 text tower
    # activations traced on meta: Stage B at 256x256 (2x batch for CFG) needs more than Stage C at 24x24
    assert 0.1 * GiB < e.stages["c"].activation_bytes < e.stages["b"].activation_bytes < 2 * GiB
    assert e.peak_device <= 8 * GiB and e.fits(8 * GiB)
    assert e.peak_allocated == max(s.weight_bytes + s.activation_bytes for s in e.stages.values())
    assert e.as_dict()["peak_device_gib"] == round(e.peak_device / GiB, 3)


def test_memory_modes_order_their_peaks(edge_estimate):
    peaks = {
        m: MemoryEstimate(m, 1024, 1024, 1, edge_estimate.stages).peak_allocated
        for m in ("resident", "sequential", "offload")
    }
    weights = sum(s.weight_bytes for s in edge_estimate.stages.values())
    assert peaks["offload"] < peaks["sequential"] < peaks["resident"]
    assert peaks["resident"] > weights  # everything resident + the largest activation peak
    assert not MemoryEstimate("resident", 1024, 1024, 1, edge_estimate.stages).fits(6 * GiB)


# ------------------------------------------------------------------------------------------ GPU
@needs_gpu
@pytest.mark.gpu
def test_gpu_memory_modes_peaks_and_estimate():
    """lite models (random weights, bf16) at 1024²: sequential keeps one model at a time, offload less."""
    from cascade_rt.runtime.api import load_pipeline

    est = estimate_memory(height=1024, width=1024, batch=1)
    peaks = {}
    for mode in ("resident", "sequential", "offload"):
        pipe = load_pipeline(random_weights=True, preset="lite", memory=mode, device="cuda", cuda_graphs=False)
        out = pipe("a cat", height=1024, width=1024, seed=0, steps_c=2, steps_b=2)
        peaks[mode] = out.peak_memory
        del pipe, out
        torch.cuda.empty_cache()
    for stage in ("c", "b"):
        assert peaks["offload"][stage] < peaks["sequential"][stage] < peaks["resident"][stage]
    seq_peak = max(v for v in peaks["sequential"].values() if v is not None)
    assert seq_peak <= est.peak_allocated * 1.15, (seq_peak / GiB, est.peak_allocated / GiB)
