"""Memory modes: where the weights of each component (text encoder, Stage C, B, A) live while a prompt runs.

* `resident`   everything on the GPU: fastest; CUDA graphs on.
* `sequential` only the component that is running sits on the GPU, the others wait on the CPU and are moved on
               demand (one large model at a time: 12-16 GB cards, and the 8 GB `edge` preset).
* `offload`    each component's repeated blocks (the elements of its ModuleLists) live in pinned host memory and
               are streamed to the GPU by a forward pre-hook just before they run, the next block prefetched on a
               side stream; the rest (embeddings, heads, scalers) stays resident. Smallest footprint, slowest.

`MemoryManager.enter(name)` is called before a component's work (the runtime's proxies do it): it places the
weights and starts that stage's peak measurement (`torch.cuda.max_memory_allocated` from entering a stage to
entering the next one); `finish()` closes the last one. Weights that move invalidate CUDA graphs, so the runtime
captures graphs only in the resident mode. The 8 GB claim of the `edge` preset is an estimate from parameter
counts and meta-device activation tracking (`runtime/estimate.py`); the GPU check measures the real peaks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cascade_rt.errors import ConfigError

logger = logging.getLogger(__name__)

MEMORY_MODES = ("resident", "sequential", "offload")


CONTAINERS = (nn.ModuleList, nn.Sequential)
ENTRY_METHODS = ("forward", "attend", "cond_kv")  # how the models call their blocks (AttnBlock: not forward)


def offload_units(model: nn.Module) -> list[nn.Module]:
    """The blocks `offload` streams: the outermost non-container elements of ModuleLists / Sequentials that hold
    parameters (UNet blocks, scalers, repeat mappers, 1x1 convs; CLIP layers; Stage A blocks), never one inside
    another. Parameters outside every unit (clip mappers, embeddings of the text tower) stay resident."""
    units: list[nn.Module] = []
    inside: set[int] = set()  # ids of every module within a chosen unit
    for module in model.modules():  # pre-order: a unit is met before anything inside it
        if id(module) in inside or not isinstance(module, CONTAINERS):
            continue
        for child in module:
            if not isinstance(child, CONTAINERS) and any(True for _ in child.parameters()):
                units.append(child)
                inside.update(id(m) for m in child.modules())
    return units or [model]


class BlockOffloader:
    """Streams each unit's tensors from (pinned) host memory to `device` around every call into the unit.

    The unit's entry methods (`forward`, and `attend` / `cond_kv`, which the UNet calls on AttnBlocks directly)
    are wrapped on the instance: on entry the parameters' `.data` point at device copies, on exit back at the
    host tensors (re-entrant: `forward` calling `attend` loads once). On CUDA the next unit of the per-step call
    sequence (recorded on the first forward; units repeat inside one: Stage B repeats levels) is copied on a
    prefetch stream while the current one computes; at most one prefetch is pending. Not graph-safe and not for
    torch.compile (`.data` swaps). Works on any device pair (the CPU tests use cpu -> cpu copies).
    """

    def __init__(self, model: nn.Module, device: torch.device, units: list[nn.Module] | None = None) -> None:
        self.model, self.device = model, torch.device(device)
        self.units = units if units is not None else offload_units(model)
        unit_tensors = {id(t) for u in self.units for t in (*u.parameters(), *u.buffers())}
        cuda = self.device.type == "cuda"
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):  # the rest stays resident on the device
                if id(t) not in unit_tensors:
                    t.data = t.data.to(self.device)
            for unit in self.units:
                for t in (*unit.parameters(), *unit.buffers()):
                    host = t.data.to("cpu")
                    t.data = host.pin_memory() if cuda else host
        self._order: list[int] = []  # unit indices in per-step call order (with repeats)
        self._recording, self._cursor = True, 0
        self._prefetched: tuple[int, list[Tensor], Any] | None = None
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._depth = [0] * len(self.units)
        self._hosts: list[list[Tensor] | None] = [None] * len(self.units)
        self.transfers = 0
        for idx, unit in enumerate(self.units):
            for name in ENTRY_METHODS:
                if callable(getattr(type(unit), name, None)):
                    object.__setattr__(unit, name, self._wrap(idx, unit, name))

    @staticmethod
    def _tensors(unit: nn.Module) -> list[Tensor]:
        return [*unit.parameters(), *unit.buffers()]

    def _wrap(self, idx: int, unit: nn.Module, name: str):
        def entry(*args: Any, **kwargs: Any) -> Any:
            self._enter(idx, step=name != "cond_kv")
            try:
                return getattr(type(unit), name)(unit, *args, **kwargs)  # the class's method: module swaps apply
            finally:
                self._exit(idx)

        return entry

    def _copy(self, idx: int) -> list[Tensor]:
        self.transfers += 1
        return [t.data.to(self.device, non_blocking=True, copy=True) for t in self._tensors(self.units[idx])]

    def _enter(self, idx: int, step: bool) -> None:
        self._depth[idx] += 1
        if self._depth[idx] > 1:
            return
        if step:
            self._advance(idx)
        pending, self._prefetched = self._prefetched, None
        if pending is not None and pending[0] == idx:
            _, copies, event = pending
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for c in copies:
                c.record_stream(current)  # allocated on the prefetch stream, used and freed on this one
        else:  # nothing (or the wrong unit) prefetched: copy now; a wrong prefetch is dropped
            copies = self._copy(idx)
        tensors = self._tensors(self.units[idx])
        self._hosts[idx] = [t.data for t in tensors]
        for t, c in zip(tensors, copies):
            t.data = c
        if step:
            self._prefetch_next()

    def _exit(self, idx: int) -> None:
        self._depth[idx] -= 1
        if self._depth[idx] == 0:
            for t, host in zip(self._tensors(self.units[idx]), self._hosts[idx]):
                t.data = host
            self._hosts[idx] = None

    def _advance(self, idx: int) -> None:
        """Track the position in the per-step call sequence; the first forward records it (it ends when the
        first recorded unit is called again)."""
        if self._recording:
            if self._order and idx == self._order[0]:
                self._recording = False
            else:
                self._order.append(idx)
                self._cursor = len(self._order) - 1
                return
        nxt = (self._cursor + 1) % len(self._order)
        self._cursor = nxt if self._order[nxt] == idx else self._order.index(idx) if idx in self._order else 0

    def _prefetch_next(self) -> None:
        if self._stream is None or self._recording or len(self._order) < 2:
            return
        nxt = self._order[(self._cursor + 1) % len(self._order)]
        if nxt == self._order[self._cursor] or self._depth[nxt]:
            return
        with torch.cuda.stream(self._stream):  # host memory is pinned and never written: no need to wait
            copies = self._copy(nxt)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._prefetched = (nxt, copies, event)

    def remove(self) -> None:
        """Undo the wrapping (weights stay where they are: on the host for the units)."""
        for unit in self.units:
            for name in ENTRY_METHODS:
                unit.__dict__.pop(name, None)


class MemoryManager:
    """Places each component's weights for a memory mode and measures per-stage peaks.

    components: name -> module ("text", "c", "b", "a", ...). In `sequential` mode entering `stage(name)` moves
    every other component to the CPU first, then `name` to the device.
    """

    def __init__(self, mode: str, device: str | torch.device, components: Mapping[str, nn.Module]) -> None:
        if mode not in MEMORY_MODES:
            raise ConfigError(f"unknown memory mode {mode!r}; choose one of: {', '.join(MEMORY_MODES)}")
        self.mode, self.device = mode, torch.device(device)
        self.components = dict(components)
        self.peaks: dict[str, int | None] = {}
        self.offloaders: dict[str, BlockOffloader] = {}
        self._on_device: set[str] = set()
        self.current: str | None = None
        if self.device.type != "cuda" and mode != "resident":
            logger.info(
                "memory mode %r on %s: weights stay where they are (nothing to save on a CPU)", mode, self.device
            )
        self._place()

    @property
    def moves_weights(self) -> bool:
        """True when weight addresses change between calls (CUDA graphs would read freed memory)."""
        return self.device.type == "cuda" and self.mode != "resident"

    def _place(self) -> None:
        for name, module in self.components.items():
            if self.mode == "resident" or self.device.type != "cuda":
                module.to(self.device)
                self._on_device.add(name)
            elif self.mode == "sequential":
                module.to("cpu")
            else:
                self.offloaders[name] = BlockOffloader(module, self.device)

    def _activate(self, name: str) -> None:
        if self.mode != "sequential" or self.device.type != "cuda" or name in self._on_device:
            return
        for other in sorted(self._on_device):
            self.components[other].to("cpu")
            self._on_device.discard(other)
        if name in self.components:
            self.components[name].to(self.device)
            self._on_device.add(name)
            logger.debug("sequential: %s on %s, others on cpu", name, self.device)

    def enter(self, name: str) -> None:
        """`name` is about to run: put its weights in place; close the previous stage's peak measurement."""
        if name == self.current:
            return
        self._close()
        self._activate(name)
        self.current = name
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def finish(self) -> None:
        """End of a request: record the last stage's peak."""
        self._close()
        self.current = None

    def _close(self) -> None:
        if self.current is None:
            return
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        old = self.peaks.get(self.current)
        self.peaks[self.current] = peak if old is None or peak is None else max(old, peak)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """`with manager.stage("b"): ...` = enter("b"), then record its peak on exit."""
        self.enter(name)
        try:
            yield
        finally:
            self.finish()

    def report(self) -> dict[str, Any]:
        return {"mode": self.mode, "device": str(self.device), "peak_bytes": dict(self.peaks)}
