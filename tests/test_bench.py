"""Benchmarks: metrics on known inputs, FLOP counting on meta against analytic counts, workloads, report
rendering, and the tiny workload end to end through `cascade-rt bench` (eager + onnxruntime, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from cascade_rt.benchmarks import metrics, roofline
from cascade_rt.benchmarks.report import csv_rows, render_markdown
from cascade_rt.benchmarks.workloads import WORKLOADS, get_workload
from cascade_rt.errors import ConfigError

# ------------------------------------------------------------------------------------------ metrics


def test_psnr_identical_is_inf_and_json_safe():
    x = torch.rand(1, 3, 8, 8)
    assert metrics.psnr(x, x.clone()) == math.inf
    assert metrics.finite_or_none(math.inf) == "inf"
    assert metrics.as_float("inf") == math.inf
    assert json.loads(json.dumps({"p": metrics.finite_or_none(metrics.psnr(x, x))}))["p"] == "inf"


def test_psnr_known_noise_level():
    ref = torch.full((2, 3, 16, 16), 0.5, dtype=torch.float64)
    sign = torch.ones_like(ref)
    sign[..., ::2] = -1  # +-0.1 everywhere: MSE = 0.01 exactly -> PSNR = 10*log10(1/0.01) = 20 dB
    assert metrics.psnr(ref + 0.1 * sign, ref) == pytest.approx(20.0, abs=1e-9)
    assert metrics.psnr(ref + 0.1 * sign, ref, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-9)


def test_relative_l2_known_values():
    ref = torch.tensor([3.0, 4.0])  # ||ref|| = 5
    assert metrics.relative_l2(ref.clone(), ref) == 0.0
    assert metrics.relative_l2(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert metrics.relative_l2(torch.ones(2), torch.zeros(2)) == math.inf
    with pytest.raises(ValueError, match="shape"):
        metrics.relative_l2(torch.ones(3), ref)


def test_percentile_and_summary():
    values = [float(v) for v in range(1, 11)]
    s = metrics.summarize(values)
    assert s["median"] == pytest.approx(5.5) and s["p90"] == pytest.approx(9.1) and s["n"] == 10
    assert metrics.percentile([7.0], 90) == 7.0


def test_cpu_timer_and_peak_memory():
    timer = metrics.StageTimer("cpu")
    timer.start()
    with timer.section("work"):
        torch.randn(256, 256) @ torch.randn(256, 256)
    timer.finish()
    ms = timer.elapsed_ms()
    assert set(ms) == {"work", "total"} and 0 <= ms["work"] <= ms["total"]
    metrics.reset_peak_memory("cpu")
    peak = metrics.peak_memory("cpu")
    assert peak["bytes"] > 0 and peak["kind"].startswith("process_peak_rss")


# ------------------------------------------------------------------------------------------ roofline


def test_flops_on_meta_match_analytic_linear_and_conv():
    with torch.device("meta"):
        lin = nn.Linear(64, 48)
        x = torch.empty(5, 7, 64)
        conv = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        img = torch.empty(2, 16, 12, 10)
        dw = nn.Conv2d(16, 16, kernel_size=3, padding=1, groups=16)
    flops, by_op = roofline.count_flops(lambda: lin(x))
    assert flops == 2 * 5 * 7 * 64 * 48 and set(by_op) == {"addmm"}
    flops, _ = roofline.count_flops(lambda: conv(img))
    assert flops == 2 * 2 * 32 * 12 * 10 * 16 * 3 * 3
    flops, _ = roofline.count_flops(lambda: dw(img))
    assert flops == 2 * 2 * 16 * 12 * 10 * 1 * 3 * 3  # depthwise: one input channel per output channel


def test_activation_bytes_on_meta_count_writes_not_views():
    with torch.device("meta"):
        lin = nn.Linear(64, 48)
        x = torch.empty(5, 7, 64)
    # linear on 3-D input = view, t (weight), addmm, view: only addmm writes (35 x 48 fp32)
    assert roofline.count_activation_bytes(lambda: lin(x)) == 5 * 7 * 48 * 4
    assert roofline.count_activation_bytes(lambda: torch.relu(x).permute(2, 0, 1).contiguous()) == 2 * x.numel() * 4


def test_flops_on_meta_count_attention():
    q = torch.empty(2, 4, 10, 16, device="meta")
    k = torch.empty(2, 4, 13, 16, device="meta")
    flops, _ = roofline.count_flops(lambda: nn.functional.scaled_dot_product_attention(q, k, k))
    assert flops == 2 * (2 * 2 * 4 * 10 * 13 * 16)  # QK^T and PV


def test_stage_c_flops_per_step_at_cfg_batch_2():
    """The 3.6B prior at 1024² (24² latent), CFG batch 2: ~8.2 TFLOP per step (2 x params x tokens estimate).

    Counted: 7.88 TFLOP = 7.46 matmul + 0.40 attention + 0.02 conv. It is 4 % under 2*3.59e9*1152 = 8.27 because
    the conditioning K/V and kv_mapper (0.27B params) run once per prompt, not per step.
    """
    case = next(c for c in WORKLOADS["standard"].cases() if c.preset_set == "big" and c.batch == 1)
    costs = roofline.stage_costs(case, torch.bfloat16)
    c = costs["c"]
    assert c["batch"] == 2 and c["calls"] == 20
    assert c["flops_per_call"] == pytest.approx(8.2e12, rel=0.05)
    assert c["flops_by_op_per_call"]["bmm"] > 0  # attention is counted on meta
    assert c["weight_bytes"] == pytest.approx(3_589_103_632 * 2, rel=1e-3)


# ------------------------------------------------------------------------------------------ workloads


def test_standard_workload_cases():
    wl = get_workload("standard")
    assert (wl.height, wl.width, wl.stage_c.steps, wl.stage_c.cfg, wl.stage_b_steps) == (1024, 1024, 20, 4.0, 10)
    keys = [c.key for c in wl.cases()]
    assert len(keys) == 8 and "big-bs4-bcfg1.1" in keys and "lite-bs1-bcfg0" in keys
    no_cfg = next(c for c in wl.cases() if c.stage_b.cfg == 0)
    assert not no_cfg.stage_b.uses_cfg and no_cfg.stage_c.uses_cfg
    with pytest.raises(ConfigError, match="unknown workload"):
        get_workload("nope")
    with pytest.raises(ConfigError, match="preset set"):
        wl.with_overrides(preset_sets=("huge",))


def test_parse_combo():
    from cascade_rt.benchmarks.combos import parse_combo

    c = parse_combo("c=onnxruntime,b=compile,a=eager")
    assert c.per_stage == {"c": "onnxruntime", "b": "compile", "a": "eager"} and c.kind == "backend"
    g = parse_combo("tensorrt+graphs")
    assert g.graphs == "graph" and g.per_stage == {s: "tensorrt" for s in "cba"}
    assert parse_combo("eager").kind == "reference" and parse_combo("eager+static").kind == "backend"
    assert parse_combo("diffusers").kind == "peer"
    with pytest.raises(ConfigError):
        parse_combo("c=nope")


# ------------------------------------------------------------------------------------------ report


def _fake_results() -> dict:
    ok = {
        "label": "onnxruntime", "kind": "backend", "per_stage": {}, "graphs": False, "status": "ok",
        "cold": {"setup_ms": 1500.0, "first_run_ms": 900.0, "first_run_extra_ms": 400.0},
        "e2e_ms": {"median": 500.0, "p90": 520.0, "min": 490.0}, "images_per_s": 2.0,
        "stage_ms": {s: {"median": m} for s, m in (("stage_c", 200.0), ("stage_b", 250.0), ("stage_a", 50.0))},
        "ms_per_step": {"stage_c": 10.0, "stage_b": 25.0},
        "peak_memory": {"bytes": 3 * 2**30, "kind": "cuda_max_allocated"},
        "accuracy": {"rel_l2_stage_c": 1e-3, "rel_l2_stage_b": 2e-3, "psnr_db": 45.25},
        "speedup_vs_eager": {"e2e": 1.8}, "roofline": {"stage_c": {"tflops": 1.5, "pct_of_matmul": 30.0}},
    }
    ref = {
        **ok, "label": "eager", "kind": "reference", "accuracy": {"psnr_db": "inf"}, "speedup_vs_eager": {"e2e": 1.0}
    }
    missing = {
        "label": "tensorrt", "kind": "backend", "status": "unavailable", "reason": "TensorRT needs an NVIDIA GPU"
    }
    case = {"key": "tiny-bs1-bcfg1.1", "preset_set": "tiny", "batch": 1, "height": 512, "width": 512,
            "presets": {"c": "stage_c_tiny", "b": "stage_b_tiny", "a": "stage_a_tiny"},
            "stage_c": {"steps": 20, "cfg": 4.0, "shift": 2.0}, "stage_b": {"steps": 10, "cfg": 1.1, "shift": 1.0}}
    return {
        "random_weights": True, "created": "2026-01-01T00:00:00+00:00", "command": "cascade-rt bench",
        "environment": {
            "device": "CPU", "torch": "2.x", "git_sha": "abc123", "load_avg": "5.0 4.0 3.0", "cpu_count": 2
        },
        "workload": {"name": "tiny", "dtype": "float32", "seed": 42, "runs": 5, "warmup": 1},
        "matmul_peak": {"tflops": 5.0, "dtype": "float32", "size": 1024, "threads": 2},
        "cases": [{"case": case, "results": [ref, ok, missing]}],
    }


def test_report_renders_table_reasons_and_random_weights_note():
    md = render_markdown(_fake_results())
    assert "Random weights" in md and "(random weights)" in md.splitlines()[0]
    assert "Busy machine" in md and "load average was 5.0 on 2 cores" in md
    assert "| **eager** |" in md and "| onnxruntime | 10.0 | 25.0 | 50.0 | 500 / 520 / 490 |" in md
    assert "45.2" in md and "| inf |" in md  # PSNR, and eager's identical image
    assert "`tensorrt` (unavailable): TensorRT needs an NVIDIA GPU" in md
    rows = csv_rows(_fake_results())
    assert [r["backend"] for r in rows] == ["eager", "onnxruntime", "tensorrt"] and rows[2]["e2e_median_ms"] is None


def test_report_latest_gpu_run(tmp_path):
    from cascade_rt.benchmarks.report import latest, main

    for name, device, created in (("a", "NVIDIA H100 80GB HBM3", "2026-01-01"), ("b", "NVIDIA H200", "2026-02-01"),
                                  ("c", "CPU", "2026-03-01")):
        (tmp_path / name).mkdir()
        data = {**_fake_results(), "created": created, "environment": {"device": device, "git_sha": "x"}}
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    assert latest(tmp_path) == tmp_path / "b" / "results.json"
    assert latest(tmp_path, gpu=False) == tmp_path / "c" / "results.json"
    out = tmp_path / "table.md"
    assert main([str(tmp_path / "b" / "results.json"), "-o", str(out)]) == 0
    assert "on NVIDIA H200" in out.read_text()


# ------------------------------------------------------------------------------------------ end to end


def test_bench_tiny_end_to_end_eager_and_onnxruntime(tmp_path, capsys):
    """`cascade-rt bench` on the quick tiny workload: JSON fields, accuracy, plots; a second run reuses engines."""
    from cascade_rt.cli import main

    out, engines = tmp_path / "out", tmp_path / "engines"
    argv = ["bench", "--workload", "tiny-quick", "--backends", "eager,eager+static,onnxruntime,tensorrt",
            "--peers", "diffusers", "--runs", "2", "--warmup", "1", "--out", str(out), "--engines-dir", str(engines)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Random weights" in printed and "| onnxruntime |" in printed

    results = json.loads((out / "results.json").read_text())
    for key in ("schema", "created", "command", "environment", "workload", "matmul_peak", "cases", "random_weights"):
        assert key in results, key
    env = results["environment"]
    for key in ("device", "torch", "onnxruntime", "git_sha", "load_avg"):
        assert key in env, key
    assert results["random_weights"] is True and results["workload"]["seed"] == 42
    (entry,) = results["cases"]
    assert entry["roofline"]["c"]["flops_per_call"] > 0
    rows = {r["label"]: r for r in entry["results"]}
    assert rows["tensorrt"]["status"] == "unavailable" and "GPU" in rows["tensorrt"]["reason"]
    for label in ("eager", "onnxruntime"):
        row = rows[label]
        assert row["status"] == "ok", row.get("reason")
        for key in ("cold", "e2e_ms", "stage_ms", "ms_per_step", "images_per_s", "peak_memory", "accuracy", "roofline"):
            assert key in row, (label, key)
        assert row["e2e_ms"]["n"] == 2 and row["e2e_ms"]["median"] > 0
    assert rows["eager"]["accuracy"]["psnr_db"] == "inf"
    assert rows["eager+static"]["status"] == "ok" and rows["eager+static"]["graphs"] == "static"
    assert rows["eager+static"]["accuracy"]["psnr_db"] == "inf"  # the graphs' static step, run without graphs
    peer = rows["diffusers"]
    assert peer["status"] == "ok" and peer["kind"] == "peer", peer.get("reason")
    assert peer["accuracy"]["rel_l2_stage_c"] < 1e-4 and peer["accuracy"]["rel_l2_stage_b"] < 1e-4  # same weights
    onnx = rows["onnxruntime"]["accuracy"]
    assert onnx["rel_l2_stage_c"] < 1e-2 and onnx["rel_l2_stage_b"] < 1e-2 and metrics.as_float(onnx["psnr_db"]) > 30
    assert (out / "report.md").read_text().startswith("## cascade-rt benchmark")
    assert (out / "timings_tiny-bs1-bcfg1.1.png").stat().st_size > 0
    assert (out / "samples_tiny-bs1-bcfg1.1.png").stat().st_size > 0

    # second run: the engines are cached, so setting up onnxruntime costs (almost) nothing
    assert main([*argv[:4], "onnxruntime", "--peers", "none", *argv[7:], "--no-plots"]) == 0
    again = json.loads((out / "results.json").read_text())
    cached = {r["label"]: r for r in again["cases"][0]["results"]}["onnxruntime"]
    assert cached["status"] == "ok"
    assert cached["cold"]["setup_ms"] < rows["onnxruntime"]["cold"]["setup_ms"]
