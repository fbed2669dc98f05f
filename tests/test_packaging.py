"""Packaging: `pip install .` builds a pure-Python wheel in seconds with no compiler, with the
version flashtile reports, its type marker and every subpackage."""

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import flashtile

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_is_pure_python_and_complete(tmp_path):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True)
    seconds = time.perf_counter() - start
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name == f"flashtile-{flashtile.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("flashtile/py.typed", "flashtile/ops.py", "flashtile/kernels/forward.py",
                   "flashtile/distributed/ring.py", "flashtile/integrations/transformers.py",
                   "flashtile/bench/run.py"):
        assert member in names, f"{member} missing from the wheel"
    assert not any(n.endswith((".so", ".pyd", ".c", ".cpp")) for n in names)
    assert seconds < 60, f"building the wheel took {seconds:.0f} s"
