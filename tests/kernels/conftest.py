"""Kernel tests run on the CPU through the Triton interpreter when no CUDA device is present.

``triton.jit`` decides between a compiled and an interpreted kernel when the kernel module is IMPORTED (it reads
``TRITON_INTERPRET`` at decoration time), so the variable must be set before any ``cascade_rt.kernels.*`` module
is imported. This conftest sets it at collection of this directory, which is early enough for the tests here;
``scripts/test.sh`` exports it for the whole suite, so a test elsewhere that imports the kernels first is covered
too. Run by hand with ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/kernels``.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# Absolute error floor per dtype (relative to max(1, |reference|max)): the part of the error budget that is not
# explained by rounding in torch itself, e.g. a different but equally valid summation order.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


def _to(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def assert_close_to_ref(out, ref_fn, args, kwargs=None, *, factor: float = 2.0, floor: float | None = None):
    """The tolerance rule of this project (flash-attention / Triton tutorials):

    ``max|kernel - truth| <= factor * max|torch - truth| + floor``, where ``truth`` is the reference computed in
    float64 (so that fp32 also has a meaningful torch error), ``torch`` is the same reference run in the kernel's
    dtype on the same inputs, and ``floor`` is a small absolute term scaled by the output magnitude.
    """
    kwargs = kwargs or {}
    outs = out if isinstance(out, (tuple, list)) else (out,)
    truths = ref_fn(*[_to(a, torch.float64) for a in args], **kwargs)
    torchs = ref_fn(*args, **kwargs)
    truths = truths if isinstance(truths, (tuple, list)) else (truths,)
    torchs = torchs if isinstance(torchs, (tuple, list)) else (torchs,)
    for i, (o, t, r) in enumerate(zip(outs, truths, torchs)):
        assert o.shape == t.shape, f"output {i}: shape {tuple(o.shape)} != reference {tuple(t.shape)}"
        assert o.dtype == r.dtype, f"output {i}: dtype {o.dtype} != reference {r.dtype}"
        o, t, r = o.double().cpu(), t.double().cpu(), r.double().cpu()
        assert torch.isfinite(o).all(), f"output {i} has non-finite values"
        scale = max(1.0, t.abs().max().item())
        fl = (FLOOR[outs[i].dtype] if floor is None else floor) * scale
        kerr = (o - t).abs().max().item()
        terr = (r - t).abs().max().item()
        assert kerr <= factor * terr + fl, (
            f"output {i}: kernel error {kerr:.3e} > {factor} x torch error {terr:.3e} + floor {fl:.1e}")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def close_to_ref():
    return assert_close_to_ref
