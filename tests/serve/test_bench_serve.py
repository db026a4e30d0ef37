"""`cascade-rt bench-serve` end to end on the tiny preset: rows per (max-wait, concurrency), report and plot."""

from __future__ import annotations

import json

from cascade_rt.cli import main


def test_bench_serve_writes_rows_report_and_plot(tmp_path):
    out = tmp_path / "bench"
    code = main(["bench-serve", "--random-weights", "--preset", "tiny", "--dtype", "fp32", "--device", "cpu",
                 "--concurrency", "1,3", "--max-wait-ms", "0,200", "--requests", "3", "--max-batch", "3",
                 "--steps-c", "1", "--steps-b", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["max_wait_ms"], r["concurrency"]) for r in rows] == [(0.0, 1), (0.0, 3), (200.0, 1), (200.0, 3)]
    assert all(r["ok"] == 3 and r["statuses"] == {"200": 3} for r in rows)
    assert all(r["p50_s"] <= r["p99_s"] for r in rows)
    assert rows[0]["batches"] == 3  # one client: one request per batch
    assert rows[3]["batches"] == 1  # three clients and a 200 ms wait: one batch of three
    assert results["environment"]["git_sha"] and results["workload"]["steps_c"] == 1
    assert "| 200.0 | 3 |" in (out / "report.md").read_text()
    assert (out / "serve_load.png").stat().st_size > 1000
