"""`bash scripts/gpu_check.sh --dry-run`: the GPU check's own code path on the CPU (tiny presets), so that a typo
cannot cost a GPU window; and its budget rule: what no longer fits is recorded as not run, never dropped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_T0", "GPU_CHECK_BUDGET_S")}
    env["PYTHON"] = sys.executable
    cmd = ["nice", "-n", "10", "bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = (tmp_path / "results.jsonl").read_text().splitlines() if (tmp_path / "results.jsonl").exists() else []
    return res, [json.loads(x) for x in lines]


@pytest.mark.slow
def test_dry_run_runs_every_part(tmp_path):
    res, rows = _run(tmp_path, "--budget-s", "3000")  # the interpreter is slow on a loaded CI machine
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    env, rows = rows[0], rows[1:]
    assert env["kind"] == "environment" and env["dry_run"] and env["torch"] and env["git_sha"]
    by = {(r["part"], r["name"]): r for r in rows}
    assert {r["part"] for r in rows} == {"tests", "steps", "e2e", "kernels"}
    tests = next(r for r in rows if r["part"] == "tests")
    assert tests["status"] == "ok" and tests["collected"] > 0, tests  # the gpu tests import and collect
    for stage in ("c", "b"):
        eager = by[("steps", f"{stage}/eager")]
        assert eager["status"] == "ok" and eager["ms"] > 0 and eager["rel_l2_vs_eager"] == 0.0
        triton = by[("steps", f"{stage}/triton+graphs")]  # the kernels (interpreter) against eager: same numbers
        assert triton["status"] == "ok" and 0 < triton["rel_l2_vs_eager"] < 1e-5, triton
        assert by[("steps", f"{stage}/model")]["tflop_per_step"] > 0
        assert by[("steps", f"{stage}/compile")]["status"] == "skipped"
        diff = by[("steps", f"{stage}/diffusers")]
        assert diff["status"] in ("ok", "failed") and (diff["status"] == "failed" or diff["rel_l2_vs_eager"] < 1e-5)
    assert by[("e2e", "eager")]["status"] == "ok" and by[("e2e", "best")]["rel_l2_vs_eager"] < 1e-3
    kernels = [r for r in rows if r["part"] == "kernels" and r["name"] != "copy bandwidth"]
    assert len(kernels) == 6 and all(r["status"] == "ok" and r["us"] > 0 for r in kernels)
    summary = (tmp_path / "summary.md").read_text()
    assert "dry run on the CPU" in summary and "| c stage_c_tiny | triton+graphs |" in summary


def test_budget_used_up_is_recorded_not_dropped(tmp_path):
    res, rows = _run(tmp_path, "--budget-s", "0", "--parts", "tests,steps,kernels", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [(r["part"], r["status"]) for r in rows[1:]] == [
        ("tests", "not run"), ("steps", "not run"), ("steps", "not run"), ("kernels", "not run")]
    assert "time budget (0 s) was used up" in rows[1]["reason"]
    assert "not run" in (tmp_path / "summary.md").read_text()


def test_refuses_without_a_gpu_unless_dry_run(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal without a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "cascade_rt.benchmarks.gpu_check", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--dry-run" in res.stderr
    assert not list(tmp_path.iterdir())
