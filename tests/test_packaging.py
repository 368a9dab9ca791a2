"""The wheel ships the package and its data, and none of the developer tools.

bench and fuzz live in tools/ (outside the package) since the restructure; this
builds the wheel with the venv's pip, the way a user's pip does, and looks inside.
The build runs on a copy of the source without the git-ignored folders: setuptools
builds in the tree it is given, and a stale build/lib would be packed too.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "out", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".hypothesis")


@pytest.mark.slow
def test_wheel_has_the_schema_and_no_tools(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    # the venv's setuptools when it has one (no download); else pip's isolated build
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                          "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = (tmp_path / "dist").glob("caffe2metal-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = [PurePosixPath(n) for n in z.namelist()]
    assert PurePosixPath("caffe2metal/export/manifest.schema.json") in names
    assert PurePosixPath("caffe2metal/__init__.py") in names
    assert [str(n) for n in names if n.parts[0] == "tools"] == []
    assert [str(n) for n in names if n.name.startswith(("bench", "fuzz"))] == []
    # every module of the package is in the wheel (a subpackage missing from pyproject's
    # list would be absent from a user's install while the editable one still finds it)
    source = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "caffe2metal").rglob("*.py")
                    if "__pycache__" not in p.parts)
    packed = {str(n) for n in names}
    assert [m for m in source if m not in packed] == []
