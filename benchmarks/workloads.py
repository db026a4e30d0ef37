"""Benchmark workloads as data: what is run (presets, size, steps, CFG, batch, dtype), never how.

A `Workload` expands into `Case`s, one per (preset set, batch, Stage B cfg); every backend combination runs every
case. The standard workload is the one every peer reports (1024², Stage C 20 steps cfg 4 shift 2, Stage B 10 steps,
Stage A once). Stage B runs both at cfg 1.1 (official notebooks: batch 2B) and at cfg 0 (no CFG, batch B: diffusers,
the TensorRT demo and the official gradio app). The tiny workloads use random tiny presets and run on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from cascade_rt.errors import ConfigError
from cascade_rt.stages import MODEL_SETS, SAMPLING, STAGES

# preset set -> the preset of each stage (models/presets.py); "chart" is the Stability speed chart's
# "small-big" combination (Stage C big, Stage B lite), reproduced on an A100 in StableCascade#139.
PRESET_SETS: dict[str, dict[str, str]] = {
    "big": {s: MODEL_SETS["full"][s] for s in STAGES},
    "lite": {s: MODEL_SETS["lite"][s] for s in STAGES},
    "chart": {"c": MODEL_SETS["full"]["c"], "b": MODEL_SETS["lite"]["b"], "a": MODEL_SETS["full"]["a"]},
    "tiny": {s: MODEL_SETS["tiny"][s] for s in STAGES},
}


@dataclass(frozen=True)
class StageSettings:
    steps: int
    cfg: float  # <= 1 for Stage B at cfg 0 means no CFG (batch B); official cfg 1.1 runs the 2B batch
    shift: float

    @property
    def uses_cfg(self) -> bool:
        return self.cfg > 0 and self.cfg != 1.0


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    height: int
    width: int
    preset_sets: tuple[str, ...]
    batches: tuple[int, ...]
    stage_c: StageSettings = StageSettings(SAMPLING["c"].steps, SAMPLING["c"].cfg, SAMPLING["c"].shift)
    stage_b_steps: int = SAMPLING["b"].steps
    stage_b_cfgs: tuple[float, ...] = (SAMPLING["b"].cfg,)
    stage_b_shift: float = SAMPLING["b"].shift
    dtype: str = "bfloat16"
    device: str = "cuda"
    runs: int = 5  # timed runs per backend combination (median and p90 over these)
    warmup: int = 2  # untimed runs first (lazy compilation, autotuning, allocator warm-up)
    seed: int = 42
    random_weights: bool = True
    fp32_reference: bool = False  # also run eager in fp32 once: every row's error vs fp32 beside eager's own
    notes: tuple[str, ...] = field(default_factory=tuple)

    def cases(self) -> list[Case]:
        return [
            Case(self, preset_set, batch, StageSettings(self.stage_b_steps, cfg, self.stage_b_shift))
            for preset_set in self.preset_sets
            for batch in self.batches
            for cfg in self.stage_b_cfgs
        ]

    def with_overrides(self, **overrides) -> Workload:
        """A copy with CLI overrides applied (None values are ignored)."""
        clean = {k: v for k, v in overrides.items() if v is not None}
        for name in clean.get("preset_sets", ()):
            if name not in PRESET_SETS:
                raise ConfigError(f"unknown preset set {name!r}; choose from {', '.join(PRESET_SETS)}")
        return replace(self, **clean)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    """One point of a workload: a preset set, a batch size and a Stage B cfg."""

    workload: Workload
    preset_set: str
    batch: int
    stage_b: StageSettings

    @property
    def presets(self) -> dict[str, str]:
        return PRESET_SETS[self.preset_set]

    @property
    def stage_c(self) -> StageSettings:
        return self.workload.stage_c

    @property
    def key(self) -> str:
        return f"{self.preset_set}-bs{self.batch}-bcfg{self.stage_b.cfg:g}"

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "preset_set": self.preset_set,
            "presets": self.presets,
            "batch": self.batch,
            "height": self.workload.height,
            "width": self.workload.width,
            "stage_c": asdict(self.stage_c),
            "stage_b": asdict(self.stage_b),
        }


_STANDARD = dict(height=1024, width=1024, dtype="bfloat16", device="cuda", fp32_reference=True)

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "tiny", "tiny random presets, 512², Stage C 20 steps cfg 4, Stage B 10 steps cfg 1.1, Stage A; CPU fp32",
            height=512, width=512, preset_sets=("tiny",), batches=(1,), dtype="float32", device="cpu",
            runs=5, warmup=1,
        ),
        Workload(
            "tiny-quick", "tiny random presets, 256², Stage C 4 steps, Stage B 2 steps: smoke tests",
            height=256, width=256, preset_sets=("tiny",), batches=(1,), stage_c=StageSettings(4, 4.0, 2.0),
            stage_b_steps=2, dtype="float32", device="cpu", runs=2, warmup=1,
        ),
        Workload(
            "standard", "1024², Stage C 20 steps cfg 4 shift 2, Stage B 10 steps at cfg 1.1 (official) and cfg 0 "
            "(diffusers, TensorRT demo), Stage A; big and lite presets, batch 1 and 4, bf16",
            preset_sets=("big", "lite"), batches=(1, 4), stage_b_cfgs=(1.1, 0.0), **_STANDARD,
        ),
        Workload(
            "chart", "the Stability speed chart's setting: batch 4, 1024², Stage C big + Stage B lite, 20 + 10 steps",
            preset_sets=("chart",), batches=(4,), stage_b_cfgs=(1.1,), **_STANDARD,
        ),
    ]
}


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ConfigError(f"unknown workload {name!r}; choose one of: {', '.join(WORKLOADS)}") from None
