"""Stable Cascade models, mirroring the official classes (attribute names = checkpoint keys)."""

from cascade_rt.models.effnet import EfficientNetEncoder, normalize_imagenet
from cascade_rt.models.presets import PRESETS, Preset, build_model, count_parameters, get_preset
from cascade_rt.models.previewer import Previewer
from cascade_rt.models.stage_a import StageA
from cascade_rt.models.stage_b import StageB
from cascade_rt.models.stage_c import StageC

__all__ = [
    "EfficientNetEncoder", "Preset", "PRESETS", "Previewer", "StageA", "StageB", "StageC",
    "build_model", "count_parameters", "get_preset", "normalize_imagenet",
]
