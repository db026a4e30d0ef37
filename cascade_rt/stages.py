"""The ground floor: the vocabulary every layer of cascade-rt shares, declared once.

* stage names (`STAGES`, `COMPONENTS`, `TITLES`) and the aliases users may type;
* the model presets that make up each pipeline size (`MODEL_SETS`: tiny / lite / full) and the runtime presets
  built on them (`RUNTIME_PRESETS`: + memory mode; `edge` = lite models, one at a time);
* the official sampling defaults (`SAMPLING`) and the default image size per pipeline size;
* the resolution rules (`check_resolution`) and the latent shapes that follow from a resolution (`latent_shape`).

Everything else (models, weights, pipeline, export, runtime, CLI, server, benchmarks) imports these names; none of
them declares its own table. The facts behind the numbers are in docs/reference.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cascade_rt.errors import ConfigError

# ------------------------------------------------------------------------------------------ stages
STAGES = ("c", "b", "a")  # the generation path, in order: prior (C), decoder (B), VQGAN decoder (A)
DENOISERS = ("c", "b")  # the stages that are sampled (GDF); Stage A decodes once
COMPONENTS = ("c", "b", "a", "effnet", "previewer")  # model families with a checkpoint file each
TITLES = {
    "text": "the text encoder",
    "c": "Stage C",
    "b": "Stage B",
    "a": "Stage A",
    "effnet": "the EfficientNet encoder",
    "previewer": "the Previewer",
}
STAGE_ALIASES = {
    "c": "c", "stage_c": "c", "prior": "c",
    "b": "b", "stage_b": "b", "decoder": "b",
    "a": "a", "stage_a": "a", "vqgan": "a",
}

# ------------------------------------------------------------------------------------------ presets
# pipeline size -> the model preset of each component (names of cascade_rt.models.presets / text encoder presets)
MODEL_SETS = {
    "tiny": {"text": "text_tiny", "c": "stage_c_tiny", "b": "stage_b_tiny", "a": "stage_a_tiny", "effnet": "effnet",
             "previewer": "previewer_tiny"},
    "lite": {"text": "text", "c": "stage_c_lite", "b": "stage_b_lite", "a": "stage_a", "effnet": "effnet",
             "previewer": "previewer"},
    "full": {"text": "text", "c": "stage_c", "b": "stage_b", "a": "stage_a", "effnet": "effnet",
             "previewer": "previewer"},
}
TEXT_PRESETS = ("text", "text_tiny")

# Random-weight models: component k of a pipeline built with seed s uses seed s + RANDOM_SEED_OFFSETS[k], so
# `generate --random-weights --seed s`, `export --random-weights --seed s` and the benchmarks build the same weights
# (and share cached engines).
RANDOM_SEED_OFFSETS = {"text": 0, "image": 1, "c": 2, "b": 3, "a": 4, "effnet": 5, "previewer": 6}


@dataclass(frozen=True)
class RuntimePreset:
    """What `load_pipeline(preset=...)` means: a pipeline size and the memory mode it runs in by default."""

    size: str  # a key of MODEL_SETS
    memory: str  # resident | sequential | offload


RUNTIME_PRESETS = {
    "tiny": RuntimePreset("tiny", "resident"),
    "lite": RuntimePreset("lite", "resident"),
    "full": RuntimePreset("full", "resident"),
    "edge": RuntimePreset("lite", "sequential"),  # Stage C lite + Stage B lite in bf16, one model on the GPU at a time
}


def model_set(size: str) -> dict[str, str]:
    """The component -> preset table of a pipeline size ('tiny', 'lite', 'full')."""
    try:
        return MODEL_SETS[size]
    except KeyError:
        raise ConfigError(f"unknown preset {size!r}; choose one of {', '.join(MODEL_SETS)}") from None


def runtime_preset(name: str) -> RuntimePreset:
    try:
        return RUNTIME_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(RUNTIME_PRESETS)}") from None


# ------------------------------------------------------------------------------------------ sampling defaults
@dataclass(frozen=True)
class StageSampling:
    """One denoiser's official sampling setting: GDF steps, CFG scale (None or <= 1: no CFG), schedule shift."""

    steps: int
    cfg: float | None
    shift: float


SAMPLING = {"c": StageSampling(20, 4.0, 2.0), "b": StageSampling(10, 1.1, 1.0)}  # official inference notebooks
IMG2IMG_STRENGTH = 0.8


def default_size(size: str) -> int:
    """The default image side: 1024 (the released models' training size), 256 for the tiny CPU preset."""
    return 256 if size == "tiny" else 1024


# ------------------------------------------------------------------------------------------ resolution, latents
RESOLUTION_MIN, RESOLUTION_MAX, RESOLUTION_STEP = 256, 2048, 128
STAGE_C_COMPRESSION = 42.67  # official calculate_latent_sizes
STAGE_B_COMPRESSION = 4.0
STAGE_C_CHANNELS, STAGE_B_CHANNELS = 16, 4


def check_resolution(height: int, width: int) -> None:
    """Each side a multiple of 128 in [256, 2048]: Stage B works on a latent of size/4 that its levels halve
    three times, so the latent must stay divisible by 32."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value % RESOLUTION_STEP or not (
            RESOLUTION_MIN <= value <= RESOLUTION_MAX
        ):
            raise ConfigError(
                f"{name}={value} is not supported: each side must be a multiple of {RESOLUTION_STEP} between "
                f"{RESOLUTION_MIN} and {RESOLUTION_MAX} (e.g. 1024, 1152, 1536); Stable Cascade's Stage B works on "
                "a latent of size/4 that its down/up levels halve three times"
            )


def stage_c_latent_hw(height: int, width: int) -> tuple[int, int]:
    """Stage C latent grid: ceil(H / 42.67) (1024 -> 24, 1536 -> 36, 768 -> 18)."""
    return math.ceil(height / STAGE_C_COMPRESSION), math.ceil(width / STAGE_C_COMPRESSION)


def stage_b_latent_hw(height: int, width: int) -> tuple[int, int]:
    """Stage B (and Stage A) latent grid: ceil(H / 4) (1024 -> 256)."""
    return math.ceil(height / STAGE_B_COMPRESSION), math.ceil(width / STAGE_B_COMPRESSION)


def latent_shape(stage: str, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The sampled latent of a stage: 'c' -> (B, 16, hc, wc); 'b' (and 'a', its input) -> (B, 4, hb, wb)."""
    key = stage.removeprefix("stage_")
    if key == "c":
        return (batch, STAGE_C_CHANNELS, *stage_c_latent_hw(height, width))
    if key in ("b", "a"):
        return (batch, STAGE_B_CHANNELS, *stage_b_latent_hw(height, width))
    raise ConfigError(f"latent_shape: stage must be 'c' or 'b', got {stage!r}")


def latent_shapes(batch: int, height: int, width: int) -> dict[str, tuple[int, int, int, int]]:
    """{'c': Stage C's latent shape, 'b': Stage B's} for a batch of images of height x width."""
    return {"c": latent_shape("c", batch, height, width), "b": latent_shape("b", batch, height, width)}
