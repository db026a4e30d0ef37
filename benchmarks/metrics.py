"""Measurement primitives: accuracy against the eager reference, stage timers, latency statistics, peak memory.

Timers: on CUDA a stage is bracketed by CUDA events (read after one synchronize at the end of a run, so timing
never adds a host sync inside the run); on the CPU by `time.perf_counter`. Peak memory: CUDA max allocated on a GPU;
on the CPU the process peak RSS (VmHWM), reset between measurements through /proc/self/clear_refs where the kernel
allows it, else the never-reset `ru_maxrss` (then the number is the process peak so far, and says so).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

# --- accuracy ---------------------------------------------------------------------------------------------------


def relative_l2(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64 (0 for identical tensors; inf when ref is all zeros and x is not)."""
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs reference {tuple(ref.shape)}")
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    num, den = torch.linalg.vector_norm(x - ref).item(), torch.linalg.vector_norm(ref).item()
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def psnr(image: Tensor, ref: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, data_range]; identical images give +inf."""
    if image.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(image.shape)} vs reference {tuple(ref.shape)}")
    mse = torch.mean((image.detach().double().cpu() - ref.detach().double().cpu()) ** 2).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def finite_or_none(value: float | None) -> float | str | None:
    """JSON-safe float: +-inf become the strings 'inf'/'-inf', NaN becomes 'nan' (strict JSON has none of them)."""
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def as_float(value: float | str | None) -> float | None:
    """Inverse of `finite_or_none`."""
    return float(value) if isinstance(value, str) else value


# --- latency statistics -----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    if not values:
        raise ValueError("percentile of an empty list")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float]:
    """median / p90 / min / max / mean of a list of timings (same unit in, same unit out)."""
    return {
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "min": min(values),
        "max": max(values),
        "mean": sum(values) / len(values),
        "n": len(values),
    }


# --- stage timers -----------------------------------------------------------------------------------------------


class StageTimer:
    """Times named sections of one run; `elapsed_ms()` after `finish()` gives {section: ms}.

    CUDA: events recorded on the current stream around each section, resolved after one synchronize.
    CPU: perf_counter around each section.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list[tuple[str, object, object]] = []
        self._t0: object = None
        self._t1: object = None

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._t0 = self._now()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        begin = self._now()
        yield
        self._marks.append((name, begin, self._now()))

    def finish(self) -> None:
        self._t1 = self._now()
        if self.cuda:
            torch.cuda.synchronize()

    def _ms(self, a: object, b: object) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3  # type: ignore[union-attr, operator]

    def elapsed_ms(self) -> dict[str, float]:
        out = {name: self._ms(a, b) for name, a, b in self._marks}
        if self._t0 is not None and self._t1 is not None:
            out["total"] = self._ms(self._t0, self._t1)
        return out


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- peak memory ------------------------------------------------------------------------------------------------


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device | str) -> bool:
    """Start a new peak-memory window. Returns False when the peak cannot be reset here (CPU without clear_refs)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak resident set size (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def current_memory(device: torch.device | str) -> int | None:
    """Bytes in use now: CUDA memory allocated, or the process RSS (None where it cannot be read)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.memory_allocated())
    rss = _read_status_kib("VmRSS")
    return rss * 1024 if rss is not None else None


def peak_memory(device: torch.device | str) -> dict[str, object]:
    """{"bytes": peak, "kind": what was measured} for the current window (see `reset_peak_memory`)."""
    if torch.device(device).type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated()), "kind": "cuda_max_allocated"}
    hwm = _read_status_kib("VmHWM")
    if hwm is not None:
        return {"bytes": hwm * 1024, "kind": "process_peak_rss"}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "kind": "process_peak_rss_since_start"}
