"""Every Triton kernel compiled for real GPUs, on the CPU (no GPU needed): ``cascade_rt.kernels.gpu_compile``.

At the released models' launch shapes (1024², model batch 2 = one prompt with CFG, bf16 and fp32; traced like
test_autotune_configs.py), Triton lowers each kernel to PTX and its bundled ptxas builds the cubin and reports
registers, spills and shared memory:

* sm_90 (H100/H200): every config the kernel's prune keeps at every launch shape;
* sm_80, sm_86, sm_89, sm_87: one config per kernel, dtype and constexpr specialisation (the heaviest kept one).

Fails on a compile error, on a launch shape whose kept configs all spill on sm_90, on any kept config that spills
on sm_90, and on sm_90 shared memory above the per-block limit. Cold, the 589 compiles take about 400 CPU-seconds
(about 4 minutes on 2 free cores; two ``nice``d workers); the Triton cache lives under the temp dir, and with it
warm the file takes under a minute. The whole matrix for all targets, with its table:
``benchmarks/kernel_compile_report.py``.
"""
from __future__ import annotations

import os

import pytest
import torch
import triton

from cascade_rt.kernels import gpu_compile as gc

WORKERS = max(1, min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def compiled():
    jobs = gc.compile_jobs()
    return jobs, gc.run_jobs(jobs, workers=WORKERS)


def _describe(job, res) -> str:
    return f"{job.kernel} sm_{job.target} {job.config} at {job.shapes[0]}: {res}"


@pytest.mark.slow
def test_every_kept_config_compiles_for_five_targets(compiled):
    jobs, results = compiled
    assert {j.target for j in jobs} == {90, 80, 86, 89, 87}
    assert {j.kernel for j in jobs} == set(gc.BY_NAME)
    failed = [_describe(j, r) for j, r in zip(jobs, results) if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(jobs)} compiles failed:\n" + "\n".join(failed[:10])
    assert all(r["registers"] > 0 for r in results)


@pytest.mark.slow
def test_no_kept_config_spills_on_sm90(compiled):
    jobs, results = compiled
    hopeless = gc.all_spilling_shapes(jobs, results, 90)
    assert not hopeless, "launch shapes where every kept config spills on sm_90:\n" + "\n".join(hopeless)
    spilling = [_describe(j, r) for j, r in zip(jobs, results)
                if j.target == 90 and r["ok"] and (r["spill_stores"] or r["spill_loads"])]
    assert not spilling, f"{len(spilling)} kept configs spill on sm_90:\n" + "\n".join(spilling[:20])
    limit = gc.TARGETS[90][1]
    over = [_describe(j, r) for j, r in zip(jobs, results) if j.target == 90 and r["ok"] and r["shared"] > limit]
    assert not over, "kept configs above sm_90's shared memory per block:\n" + "\n".join(over[:20])


@pytest.mark.slow
def test_the_checks_can_fail():
    """A config the prune would never keep (fp32 attention, 128x128 tile on 4 warps) spills, and the shape it is
    the only config of is reported as all-spilling; ptxas's report is parsed."""
    launch = next(x for x in gc.traced("stage_c", 1024, 2, torch.float32) if x.kernel == "attention")
    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=2)
    assert not gc.BY_NAME["attention"].predicate(big, launch.args)
    sig, cx, attrs, opts = gc._specialise(gc.BY_NAME["attention"], launch, big, 90)
    job = gc.Job("attention", 90, str(big), sig, cx, attrs, opts, ["stage_c"], [gc.shape_id(launch, torch.float32)])
    (res,) = gc.run_jobs([job], workers=1)
    assert res["ok"] and res["spill_stores"] > 0, res
    assert gc.all_spilling_shapes([job], [res]) == ["attention[N=576, S=85, HEAD_DIM=64, PRECISION=ieee, float32]"]
    bad = gc.run_jobs([gc.Job("attention", 90, str(big), {**sig, "N": "i1024"}, cx, attrs, opts)], workers=1)
    assert not bad[0]["ok"] and bad[0]["error"]
    assert gc.parse_ptxas("ptxas info    : Used 40 registers, used 1 barriers, 24 bytes stack frame, "
                          "8 bytes spill stores, 12 bytes spill loads") == {
        "registers": 40, "spill_stores": 8, "spill_loads": 12, "stack_frame": 24}
