"""`cascade-rt bench-serve`: load on the server; throughput and p50/p99 latency against concurrency and max-wait.

    cascade-rt bench-serve --random-weights --preset tiny --dtype fp32 --record          # the CPU figures
    cascade-rt bench-serve --weights weights/ --lite --sizes 1024x1024 --max-batch 4 \\
        --concurrency 1,2,4,8,16 --max-wait-ms 0,20,100 --requests 64 --record            # on a GPU
    cascade-rt bench-serve --url http://host:8000 --concurrency 1,4,16                     # a running server

For each --max-wait-ms value it starts the server in this process (uvicorn on a loopback port, the model loaded
once), and for each concurrency runs closed-loop clients until --requests requests are answered. Writes
results.json, report.md and serve_load.png into --out; --record writes them into benchmarks/results/ too.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from cascade_rt.commands.bench import RESULTS_DIR, _csv, environment_header
from cascade_rt.commands.generate import add_model_args, load_from_args
from cascade_rt.commands.serve import config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench-serve", help="load benchmark of `cascade-rt serve`: throughput, p50/p99 vs concurrency and max-wait",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    g = p.add_argument_group("load")
    g.add_argument("--url", help="benchmark a running server instead of starting one (--max-wait-ms is ignored)")
    g.add_argument("--concurrency", type=_csv(int), default=(1, 2, 4, 8), help="clients in flight (default 1,2,4,8)")
    g.add_argument("--max-wait-ms", type=_csv(float), default=(0.0, 50.0), help="server max-wait values (default 0,50)")
    g.add_argument("--max-batch", type=int, default=4, help="server max batch (default 4)")
    g.add_argument("--requests", type=int, default=16, help="requests per point (default 16)")
    g.add_argument("--sizes", default=None, help="WxH served and requested (default: the preset's default size)")
    g.add_argument("--steps-c", type=int, default=10, help="Stage C steps per request (default 10)")
    g.add_argument("--steps-b", type=int, default=5, help="Stage B steps per request (default 5)")
    g.add_argument("--out", default="out/bench-serve", help="output folder (default out/bench-serve)")
    g.add_argument("--record", action="store_true", help="also write the run into benchmarks/results/")
    p.set_defaults(func=run)


def _server_args(args: argparse.Namespace, max_wait: float) -> argparse.Namespace:
    ns = argparse.Namespace(**vars(args))
    ns.max_wait_ms, ns.max_queue, ns.request_timeout, ns.warmup_steps, ns.overlap = max_wait, 1024, 3600.0, 2, True
    return ns


def run(args: argparse.Namespace) -> int:
    import torch  # the handler imports torch and the server: `cascade-rt --help` stays fast

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    from cascade_rt.serve.loadgen import LocalServer, run_load

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    header = environment_header(device, [])
    header["schema"] = "cascade-rt-bench-serve/1"
    shown = ("preset", "dtype", "max_batch", "requests", "steps_c", "steps_b", "url")
    header["command"] = "cascade-rt bench-serve " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in shown and v is not None)
    config = config_from_args(_server_args(args, 0.0))
    height, width = config.sizes[0]
    body = {"prompt": "a photograph of a lighthouse", "size": f"{width}x{height}", "steps_c": args.steps_c,
            "steps_b": args.steps_b}
    rows = []
    if args.url:
        for c in args.concurrency:
            rows.append({"max_wait_ms": None, **run_load(args.url, body, concurrency=c, requests=args.requests)})
            print(_line(rows[-1]), flush=True)
    else:
        args.batch, (args.height, args.width) = args.max_batch, (height, width)
        pipe = load_from_args(args)
        for max_wait in args.max_wait_ms:
            config = config_from_args(_server_args(args, max_wait))
            with LocalServer(lambda: pipe, config) as server:
                run_load(server.url, body, concurrency=1, requests=2)  # warm the HTTP path
                for c in args.concurrency:
                    b0 = server.service.batcher.batches
                    row = {"max_wait_ms": max_wait, **run_load(server.url, body, concurrency=c, requests=args.requests)}
                    row["batches"] = server.service.batcher.batches - b0
                    row["mean_batch_images"] = row["ok"] / max(row["batches"], 1)
                    rows.append(row)
                    print(_line(row), flush=True)
    results = {**header, "workload": {"size": f"{width}x{height}", "steps_c": args.steps_c, "steps_b": args.steps_b,
                                      "max_batch": args.max_batch, "requests_per_point": args.requests,
                                      "preset": args.preset if args.random_weights else "weights"},
               "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "report.md"]
    files[0].write_text(json.dumps(results, indent=2))
    files[1].write_text(report(results))
    plot = _plot(rows, out / "serve_load.png")
    if plot:
        files.append(plot)
    print(report(results))
    if args.record:
        env = header["environment"]
        stamp = header["created"].replace("-", "").replace(":", "").split("+")[0]
        name = "cpu" if device.type == "cpu" else "gpu"
        dest = RESULTS_DIR / f"{stamp}-{name}-serve-{results['workload']['preset']}-{env['git_sha'][:7]}"
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, dest / f.name)
        print(f"recorded in {dest}")
    return 0


def _line(row: dict) -> str:
    extra = f", {row['mean_batch_images']:.2f} images/batch" if "batches" in row else ""
    return (f"max-wait {row['max_wait_ms']} ms, concurrency {row['concurrency']}: {row['images_per_s']:.2f} images/s, "
            f"p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s{extra}, statuses {row['statuses']}")


def report(results: dict) -> str:
    env, wl = results["environment"], results["workload"]
    lines = [
        f"# Serving load: {env['device']} ({env.get('device_detail', '')}), git {env['git_sha'][:7]}",
        "",
        (f"{results['created']}; `{results['command']}`; {wl['preset']} models, {wl['size']}, Stage C "
         f"{wl['steps_c']} steps, Stage B {wl['steps_b']} steps, max batch {wl['max_batch']}, "
         f"{wl['requests_per_point']} requests per point, closed-loop clients; load average at start "
         f"{env.get('load_avg')}."),
        "",
        "| max-wait ms | concurrency | images/s | p50 s | p99 s | images/batch | statuses |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        per_batch = f"{r['mean_batch_images']:.2f}" if "mean_batch_images" in r else "-"
        lines.append(f"| {r['max_wait_ms']} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | "
                     f"{r['p99_s']:.2f} | {per_batch} | {r['statuses']} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plots extra is not installed: the table is enough
        return None
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    for k, wait in enumerate(dict.fromkeys(r["max_wait_ms"] for r in rows)):
        sel, color = [r for r in rows if r["max_wait_ms"] == wait], f"C{k}"
        cs = [r["concurrency"] for r in sel]
        ax_t.plot(cs, [r["images_per_s"] for r in sel], marker="o", color=color, label=f"max-wait {wait} ms")
        ax_l.plot(cs, [r["p50_s"] for r in sel], marker="o", color=color, label=f"p50, max-wait {wait} ms")
        ax_l.plot(cs, [r["p99_s"] for r in sel], marker="x", linestyle="--", color=color,
                  label=f"p99, max-wait {wait} ms")
    ax_t.set(xlabel="concurrent clients", ylabel="images / s", title="throughput")
    ax_l.set(xlabel="concurrent clients", ylabel="seconds", title="end-to-end latency")
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
