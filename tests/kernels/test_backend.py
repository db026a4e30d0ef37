"""Whole-stage parity: the ``triton`` backend (kernels through the interpreter on a CPU) vs eager, tiny presets.

fp32: the backend must match eager to the runtime's documented ``TritonBackend.tolerance.fp32`` (2e-4 relative).
bf16: both eager-bf16 and triton-bf16 are compared with eager-fp32 run on the same bf16-rounded weights and
inputs (the truth up to fp32 rounding); the backend's error must be within 2x of eager's own bf16 error plus
a small floor: the kernels keep more in fp32 than eager does, so they should not round worse.
On a GPU (no TRITON_INTERPRET) the same tests run on CUDA, with cuDNN's TF32 convolutions off so that eager fp32
is fp32.
"""
import copy

import pytest
import torch

from cascade_rt.kernels.backend import (
    TritonAttnBlock,
    TritonResBlock,
    TritonTimestepBlock,
    apply_triton_kernels,
    remove_triton_kernels,
)
from cascade_rt.models import build_model
from cascade_rt.models.presets import TINY_CLIP_DIMS


def _inputs(stage, g, device):
    return {k: v.to(device) for k, v in _cpu_inputs(stage, g).items()}


def _cpu_inputs(stage, g):
    if stage == "c":
        return dict(x=torch.randn(2, 16, 4, 5, generator=g), r=torch.tensor([0.3, 0.9]),
                    clip_text=torch.randn(2, 77, TINY_CLIP_DIMS["text_hidden"], generator=g),
                    clip_text_pooled=torch.randn(2, 1, TINY_CLIP_DIMS["text_pooled"], generator=g),
                    clip_img=torch.randn(2, 1, TINY_CLIP_DIMS["image"], generator=g))
    if stage == "b":
        return dict(x=torch.randn(2, 4, 16, 16, generator=g), r=torch.tensor([0.5, 0.1]),
                    effnet=torch.randn(2, 16, 3, 3, generator=g),
                    clip=torch.randn(2, 1, TINY_CLIP_DIMS["text_pooled"], generator=g))
    return dict(x=torch.randn(1, 4, 5, 6, generator=g))


def _run(model, stage, inputs):
    with torch.no_grad():
        if stage == "a":
            return model.decode(inputs["x"])
        return model(**inputs)


def _rel(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


PRESET = {"c": "stage_c_tiny", "b": "stage_b_tiny", "a": "stage_a_tiny"}


@pytest.fixture(autouse=True)
def _no_tf32_convs():
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


@pytest.mark.parametrize("stage", ["c", "b", "a"])
def test_fp32_matches_eager(stage, device):
    eager = build_model(PRESET[stage], seed=0).to(device)
    inputs = _inputs(stage, torch.Generator().manual_seed(1), device)
    ref = _run(eager, stage, inputs)
    model = apply_triton_kernels(copy.deepcopy(eager))
    out = _run(model, stage, inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    assert _rel(out, ref) <= 2e-5  # measured ~4e-7 in the interpreter; the runtime documents 2e-4


@pytest.mark.parametrize("stage", ["c", "b", "a"])
def test_bf16_error_within_2x_of_eager_bf16(stage, device):
    ref32 = build_model(PRESET[stage], seed=0).to(device, torch.bfloat16).float()  # weights representable in bf16
    inputs = {k: v.bfloat16().float() for k, v in _inputs(stage, torch.Generator().manual_seed(2), device).items()}
    truth = _run(ref32, stage, inputs)
    eager16 = copy.deepcopy(ref32).to(torch.bfloat16)
    inputs16 = {k: v.bfloat16() if k != "r" else v for k, v in inputs.items()}
    err_eager = _rel(_run(eager16, stage, inputs16), truth)
    out = _run(apply_triton_kernels(eager16), stage, inputs16)
    assert out.dtype == torch.bfloat16
    err_triton = _rel(out, truth)
    assert err_triton <= 2 * err_eager + 2e-3, (err_triton, err_eager)


def test_swap_keeps_parameters_and_state_dict():
    model = build_model("stage_c_tiny", seed=0)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    apply_triton_kernels(model)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    kinds = {type(m) for m in model.modules()}
    assert {TritonResBlock, TritonAttnBlock, TritonTimestepBlock} <= kinds
    apply_triton_kernels(model)  # idempotent
    assert len(model.clf._forward_hooks) == 1
    remove_triton_kernels(model)
    assert not model.clf._forward_hooks
    assert not {TritonResBlock, TritonAttnBlock, TritonTimestepBlock} & {type(m) for m in model.modules()}
    assert all(p is params[n] for n, p in model.named_parameters())
