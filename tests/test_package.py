"""The package imports from a bare checkout (no install), as on a lent GPU machine with no network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Drop the editable install's finder and import from the checkout on sys.path alone.
SCRIPT = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
sys.path.insert(0, {str(ROOT)!r})
for name in list(sys.modules):
    if name.startswith("cascade_rt"):
        del sys.modules[name]
import cascade_rt.export.specs, cascade_rt.kernels, cascade_rt.benchmarks.report, cascade_rt.runtime
print(cascade_rt.__file__)
print(cascade_rt.export.specs.__file__)
print(cascade_rt.kernels.__file__)
print(cascade_rt.benchmarks.report.__file__)
try:
    import cascade_rt.tests
except ImportError:
    print("tests: not a subpackage")
"""


def test_bare_checkout_maps_package_dirs(tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert lines[0] == str(ROOT / "cascade_rt" / "__init__.py")
    assert lines[1] == str(ROOT / "export" / "specs.py")
    assert lines[2] == str(ROOT / "kernels" / "__init__.py")
    assert lines[3] == str(ROOT / "benchmarks" / "report.py")
    assert res.stdout.strip().endswith("tests: not a subpackage")  # only pyproject's three package-dir entries
