"""All-or-nothing output directories.

Everything is written into a fresh sibling of OUT; only when the whole
conversion has succeeded does it take OUT's place (an existing OUT is moved
aside first and removed after).  A failure or Ctrl-C removes the sibling, so
OUT is never left half-written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ExportError


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike):
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ExportError("exists and is not a directory", file=out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)          # mkdtemp's 0700 is not what a user expects
    except OSError as e:
        raise ExportError(f"cannot create the output directory: {e.strerror}", file=out) from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "out")
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old / "out", out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
