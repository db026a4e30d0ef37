"""User-facing errors. Each message says what is wrong and what to do about it."""


class CascadeError(Exception):
    """Base class: the CLI prints these as one-line errors, without a traceback."""


class WeightsError(CascadeError):
    """Missing, corrupt, truncated, mismatched or wrong-stage weights."""


class ConfigError(CascadeError):
    """Bad user settings: resolution, dtype, steps, backend names, unknown presets."""


class EngineError(CascadeError):
    """A built engine that is stale, foreign, corrupt or fails validation."""


class BackendUnavailable(CascadeError):
    """A backend that cannot run on this machine (no GPU, no TensorRT, ...)."""


class NumericsError(CascadeError):
    """NaN/Inf in an output, or an engine outside its documented tolerance."""


class FileError(CascadeError):
    """An input or output path that cannot be used: missing, a folder, a symlink loop, not an image, truncated,
    too large to decode, unwritable, or a disk that filled up while writing."""
