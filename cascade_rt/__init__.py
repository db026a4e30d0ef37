"""cascade-rt: a fast, faithful inference runtime for Stable Cascade (Wuerstchen v3)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level API: `cascade_rt.load_pipeline` (imports torch and the runtime on first use only)."""
    if name == "load_pipeline":
        from cascade_rt.runtime.api import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'cascade_rt' has no attribute {name!r}")
