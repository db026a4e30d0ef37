"""PNG plots of a results dict (matplotlib, Agg backend) and the sample image grid.

Per case, one figure with three panels sharing the backend axis: per-stage time as stacked bars, e2e speed-up
over eager, and accuracy beside it (final-image PSNR against eager; identical images are drawn at a cap and
labelled "identical"). The sample grid shows each backend's first-run images, one row per backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from cascade_rt.benchmarks.metrics import as_float

STAGE_COLORS = {"stage_c": "#4C72B0", "stage_b": "#DD8452", "stage_a": "#55A868"}
PSNR_MIN_CAP = 60.0  # "identical" (inf) is drawn 10 % beyond the largest finite PSNR, and at least here


def _pyplot():
    import matplotlib  # optional (the plots extra); the benchmark runs and reports without it

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def plot_case(entry: dict[str, Any], title: str, path: Path) -> Path | None:
    """Stacked per-stage bars, speed-up over eager and PSNR for one case; None when nothing was measured."""
    rows = [r for r in entry["results"] if r["status"] == "ok"]
    if not rows:
        return None
    plt = _pyplot()
    labels = [r["label"] + (" (peer)" if r["kind"] == "peer" else "") for r in rows]
    y = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 1.2 + 0.55 * len(rows)), sharey=True,
                             gridspec_kw={"width_ratios": [2.2, 1, 1]})
    left = [0.0] * len(rows)
    for stage, color in STAGE_COLORS.items():
        widths = [r["stage_ms"][stage]["median"] for r in rows]
        axes[0].barh(y, widths, left=left, color=color, label=stage.replace("_", " ").title())
        left = [a + b for a, b in zip(left, widths)]
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("median ms per run (stacked by stage)")
    axes[0].legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)

    speedups = [r.get("speedup_vs_eager", {}).get("e2e", float("nan")) for r in rows]
    axes[1].barh(y, speedups, color="#8172B3")
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("speed-up over eager (e2e)")
    for yi, s in zip(y, speedups):
        if math.isfinite(s):
            axes[1].text(s, yi, f" {s:.2f}×", va="center", fontsize=8)

    psnrs = [as_float(r.get("accuracy", {}).get("psnr_db")) for r in rows]
    cap = 1.1 * max([PSNR_MIN_CAP] + [p for p in psnrs if p is not None and math.isfinite(p)])
    drawn = [cap if p is not None and math.isinf(p) else (p if p is not None else 0.0) for p in psnrs]
    axes[2].barh(y, drawn, color="#937860")
    axes[2].set_xlabel("final-image PSNR vs eager (dB)")
    for yi, p in zip(y, psnrs):
        text = "identical" if p is not None and math.isinf(p) else ("–" if p is None else f"{p:.1f}")
        axes[2].text(drawn[yi], yi, f" {text}", va="center", fontsize=8)
    axes[2].set_xlim(0, cap * 1.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(thumbnails: dict[str, torch.Tensor], title: str, path: Path) -> Path | None:
    """One row per backend, one column per image of the batch."""
    if not thumbnails:
        return None
    plt = _pyplot()
    n_rows = len(thumbnails)
    n_cols = max(t.shape[0] for t in thumbnails.values())
    one_row = n_cols == 1  # batch 1: backends side by side
    shape = (1, n_rows) if one_row else (n_rows, n_cols)
    fig, axes = plt.subplots(*shape, figsize=(2.2 * shape[1] + 1.0, 2.2 * shape[0] + 0.6), squeeze=False)
    for i, (label, images) in enumerate(thumbnails.items()):
        for j in range(n_cols):
            ax = axes[0][i] if one_row else axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < images.shape[0]:
                ax.imshow(images[j].clamp(0, 1).permute(1, 2, 0).numpy())
            else:
                ax.axis("off")
            if one_row:
                ax.set_title(label, fontsize=9)
            elif j == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], thumbnails: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> list[Path]:
    """All plots of a run into out_dir: `timings_<case>.png` and `samples_<case>.png`."""
    written = []
    random_note = " (random weights)" if results.get("random_weights") else ""
    device = results.get("environment", {}).get("device", "")
    for entry in results.get("cases", []):
        key = entry["case"]["key"]
        title = f"{results.get('workload', {}).get('name')} {key} on {device}{random_note}"
        p = plot_case(entry, title, out_dir / f"timings_{_slug(key)}.png")
        if p:
            written.append(p)
        g = image_grid(
            thumbnails.get(key, {}), f"sample images, {key}{random_note}", out_dir / f"samples_{_slug(key)}.png"
        )
        if g:
            written.append(g)
    return written
