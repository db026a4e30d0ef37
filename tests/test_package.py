"""The package installs offline the way the README says (no network, no build isolation) and maps its folders."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import cascade_rt, cascade_rt.export.specs, cascade_rt.kernels, cascade_rt.benchmarks.report
for m in (cascade_rt, cascade_rt.export.specs, cascade_rt.kernels, cascade_rt.benchmarks.report):
    print(m.__file__)
try:
    import cascade_rt.tests
except ImportError:
    print("tests: not a subpackage")
"""


@pytest.mark.slow
def test_offline_editable_install_maps_package_dirs(tmp_path):
    """`pip install --no-deps --no-build-isolation -e .` in a fresh environment (what a machine without network
    runs), then the three package-dir folders import under their package names from this checkout."""
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)  # pip and setuptools (>= 77, see pyproject) come from this environment
    python = env_dir / "bin" / "python"
    own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                         text=True, check=True).stdout.strip()
    # this environment's packages (setuptools, torch, ...) stand in for what the offline machine has installed
    Path(own, "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-e", str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    res = subprocess.run([python, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split("\n")
    assert lines[:4] == [
        str(ROOT / "cascade_rt" / "__init__.py"),
        str(ROOT / "export" / "specs.py"),
        str(ROOT / "kernels" / "__init__.py"),
        str(ROOT / "benchmarks" / "report.py"),
    ]
    assert lines[4] == "tests: not a subpackage"  # only pyproject's three package-dir entries are mapped


FLOORS = {  # module -> packages it must not import (docs/DESIGN.md "Floors": imports only go down)
    "cascade_rt.pipeline": ("export", "kernels", "runtime", "serve", "benchmarks", "commands"),
    "cascade_rt.weights": ("export", "kernels", "runtime", "serve", "benchmarks", "commands"),
    "cascade_rt.export.loader": ("runtime", "serve", "benchmarks", "commands"),
    "cascade_rt.runtime.api": ("serve", "benchmarks", "commands"),
}


@pytest.mark.parametrize("module", sorted(FLOORS))
def test_imports_only_go_down(module: str):
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('cascade_rt.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    above = sorted(m for m in loaded if m.split(".")[1] in FLOORS[module])
    assert not above, f"{module} imports {above} from a floor above it"


def test_importing_the_runtime_leaves_tritons_mode_open():
    """Importing triton fixes compiled vs interpreted for the process: the runtime and the CLI must not import it
    before the triton backend chooses (it sets TRITON_INTERPRET=1 on a CPU)."""
    code = ("import sys, cascade_rt.runtime.api, cascade_rt.serve.app, cascade_rt.cli as c; c.build_parser(); "
            "print('triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "False"
