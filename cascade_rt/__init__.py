"""cascade-rt: a fast, faithful inference runtime for Stable Cascade (Wuerstchen v3)."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# pyproject.toml maps export/, kernels/ and benchmarks/ to cascade_rt.export, .kernels and .benchmarks. An install
# (wheel or editable) provides that mapping; a bare source checkout on sys.path (``PYTHONPATH=.``, e.g. on a lent
# GPU machine with no network to install from) does not, so there a finder maps those three names alone.
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_SUBPACKAGES = ("export", "kernels", "benchmarks")


class _CheckoutFinder:
    """``cascade_rt.<sub>`` -> ``<checkout>/<sub>/`` for the package-dir entries of pyproject.toml."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        prefix, _, sub = fullname.partition(".")
        if prefix != __name__ or sub not in _SUBPACKAGES:
            return None
        from importlib.util import spec_from_file_location

        folder = _os.path.join(_ROOT, sub)
        return spec_from_file_location(fullname, _os.path.join(folder, "__init__.py"),
                                       submodule_search_locations=[folder])


if not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "export")) and all(
    _os.path.isfile(_os.path.join(_ROOT, sub, "__init__.py")) for sub in _SUBPACKAGES
) and not any(isinstance(f, _CheckoutFinder) for f in _sys.meta_path):
    _sys.meta_path.append(_CheckoutFinder())  # after the regular finders: an install's mapping wins


def __getattr__(name: str):
    """Lazy top-level API: `cascade_rt.load_pipeline` (imports torch and the runtime on first use only)."""
    if name == "load_pipeline":
        from cascade_rt.runtime.api import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'cascade_rt' has no attribute {name!r}")
