"""cascade-rt: a fast, faithful inference runtime for Stable Cascade (Wuerstchen v3).

The package is installed (`pip install -e .`; offline: `pip install --no-deps --no-build-isolation -e .`), which
maps the repository's `export/`, `kernels/` and `benchmarks/` folders to `cascade_rt.export`, `cascade_rt.kernels`
and `cascade_rt.benchmarks` (pyproject.toml's package-dir).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`cascade_rt.load_pipeline` without importing torch and the runtime when the package is imported."""
    if name == "load_pipeline":
        from cascade_rt.runtime.api import load_pipeline  # torch + the runtime: seconds, only when asked for

        return load_pipeline
    raise AttributeError(f"module 'cascade_rt' has no attribute {name!r}")
