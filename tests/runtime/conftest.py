"""Runtime test fixtures: tiny Stage C/B/A models and factories of their sampler inputs.

Triton kernels are imported lazily by the `triton` backend; on a CPU they must run through the interpreter,
which `triton.jit` reads when the kernel module is imported: set it before anything imports them
(scripts/test.sh exports it for the whole suite).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cascade_rt.models import build_model  # noqa: E402
from cascade_rt.models.presets import TINY_CLIP_DIMS  # noqa: E402


def stage_c_inputs(model, batch: int, hw: int, seed: int = 0, device: str = "cpu"):
    """(x, cond, uncond) for a tiny Stage C: text-like random conditioning, uncond from other random text."""
    g = torch.Generator().manual_seed(seed)
    dims = TINY_CLIP_DIMS

    def enc():
        text = torch.randn(batch, 77, dims["text_hidden"], generator=g)
        pooled = torch.randn(batch, 1, dims["text_pooled"], generator=g)
        img = torch.zeros(batch, 1, dims["image"])
        return model.prepare_conditioning(text.to(device), pooled.to(device), img.to(device))

    x = torch.randn(batch, 16, hw, hw, generator=g).to(device)
    return x, enc(), enc()


def stage_b_inputs(model, batch: int, hw: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    effnet = torch.randn(batch, 16, max(hw // 8, 2), max(hw // 8, 2), generator=g).to(device)
    pooled = lambda: torch.randn(batch, 1, TINY_CLIP_DIMS["text_pooled"], generator=g).to(device)  # noqa: E731
    cond = model.prepare_conditioning(effnet, pooled(), latent_hw=(hw, hw))
    uncond = model.prepare_conditioning(torch.zeros_like(effnet), pooled(), latent_hw=(hw, hw))
    x = torch.randn(batch, 4, hw, hw, generator=g).to(device)
    return x, cond, uncond


@pytest.fixture(scope="session")
def c_inputs():
    """c_inputs(model, batch, hw, seed=0, device="cpu") -> (x, cond, uncond)."""
    return stage_c_inputs


@pytest.fixture(scope="session")
def b_inputs():
    return stage_b_inputs


@pytest.fixture(scope="module")
def tiny_c():
    return build_model("stage_c_tiny", seed=2)


@pytest.fixture(scope="module")
def tiny_b():
    return build_model("stage_b_tiny", seed=3)


@pytest.fixture(scope="module")
def tiny_a():
    return build_model("stage_a_tiny", seed=4)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
