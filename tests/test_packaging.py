"""An installed fmconvert (a wheel, not this checkout) carries everything it reads at run time: the architecture
tables and the verify text. Built from a copy of the sources, so the checkout gets no build/ directory."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_architecture_table(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "fmconvert", src / "fmconvert", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("fmconvert-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = ROOT / "fmconvert" / "configs"
    tables = sorted(str(f.relative_to(configs)) for f in configs.rglob("*.toml"))
    assert len(tables) >= 8 and any(t.startswith("wrappers/") for t in tables)
    missing = [t for t in tables if f"fmconvert/configs/{t}" not in names]
    assert not missing, missing
    data = [f"fmconvert/data/{f.name}" for f in (ROOT / "fmconvert" / "data").iterdir()]
    assert data and all(d in names for d in data)
