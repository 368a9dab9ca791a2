"""Metal weight files: safe names, raw little-endian arrays, sha256 as they are written."""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np

from ..arrays import first_nonfinite
from ..errors import ExportError
from ..mps.rows import RowBlocks

DTYPES = {"float32": "<f4", "float16": "<f2"}
NAMINGS = ("apple", "forge")
METAL_DIR = "metal"
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
             *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


def safe_name(name: str) -> str:
    """A layer name as one harmless file-name component (see the module doc)."""
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    stripped = s.lstrip(".")
    s = "_" * (len(s) - len(stripped)) + stripped or "_"
    stem = s.split(".", 1)[0]
    if stem.upper() in _RESERVED:
        s = stem + "_" + s[len(stem):]
    if len(s) > 120:                       # stay far below 255-byte file-name limits
        s = s[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return s


def file_names(name: str, naming: str = "apple") -> tuple[str, str]:
    """(weights file, bias file) of a layer, without the directory."""
    s = safe_name(name)
    if naming == "apple":
        return f"weights_{s}.dat", f"bias_{s}.dat"
    if naming == "forge":
        return f"{s}_w.bin", f"{s}_b.bin"
    raise ExportError(f"unknown naming '{naming}' (use one of {', '.join(NAMINGS)})")


class Writer:
    """Writes files under OUT/metal and refuses two owners for one file.  With a
    ``WriteBehind`` (``io``) the bytes go to disk on its thread while the next
    block is laid out and hashed here."""

    def __init__(self, out: Path, io=None, streams=None):
        self.out, self.io = Path(out), io
        self.streams = streams
        self.dir = self.out / METAL_DIR
        self.owners: dict[str, tuple[str, str]] = {}   # lower-case file name -> (owner, file)

    def claim(self, file: str, owner: str) -> None:
        key = file.lower()
        if key in self.owners:
            other, other_file = self.owners[key]
            if other_file == file:
                what = f"would both write {METAL_DIR}/{file} (names are made file-safe)"
            else:
                what = (f"would write {METAL_DIR}/{other_file} and {METAL_DIR}/{file}, one file "
                        "on case-insensitive file systems (macOS, Windows)")
            raise ExportError(f"layers '{other}' and '{owner}' {what}: rename one of them",
                              layer=owner)
        self.owners[key] = (owner, file)

    def write(self, file: str, owner: str, array, dtype: str, layout: str) -> dict:
        """Write an array, or a ``RowBlocks`` one block at a time; hash as it goes."""
        self.claim(file, owner)
        path = self.dir / file
        if path.parent != self.dir or file in ("", ".", ".."):     # safe_name makes this impossible
            raise ExportError(f"file name {file!r} would leave {self.dir}", layer=owner)
        spec: dict = {"file": f"{METAL_DIR}/{file}", "dtype": dtype, "shape": list(array.shape),
                "layout": layout}
        digest = self.streams.take(array, path, dtype) if self.streams is not None else None
        if digest is None:                         # (else written while the caffemodel was)
            digest = hashlib.sha256()
            self._write_file(path, owner, array, dtype, digest)
        if self.io is None:
            spec["sha256"] = digest.hexdigest()
        else:                                      # filled in by the hashing thread
            spec["sha256"] = None
            self.io.when_hashed(lambda: spec.__setitem__("sha256", digest.hexdigest()))
        return spec

    def _write_file(self, path: Path, owner: str, array, dtype: str, digest) -> None:
        blocks = array if isinstance(array, RowBlocks) else (array,)
        self.dir.mkdir(exist_ok=True)
        try:
            f = open(path, "xb")       # noqa: SIM115  (closed by the writer thread or below)
        except FileExistsError:
            raise ExportError(f"{path} already exists", layer=owner) from None
        except OSError as e:
            raise ExportError(f"cannot write: {e.strerror}", file=path, layer=owner) from None
        if self.io is None:
            try:
                with f:
                    for block in blocks:
                        data = to_bytes(block, dtype)
                        f.write(data)
                        digest.update(data)
            except OSError as e:
                raise ExportError(f"cannot write: {e.strerror}", file=path,
                                  layer=owner) from None
        else:
            try:
                for block in blocks:
                    data = to_bytes(block, dtype)
                    self.io.hash(digest, data)
                    self.io.write(f, data, name=path)
            finally:
                self.io.close_file(f, name=path)


def to_bytes(block, dtype: str) -> memoryview:
    """The bytes of ``block`` as ``dtype`` in C order (no copy when it already is that)."""
    return np.ascontiguousarray(block, dtype=DTYPES[dtype]).reshape(-1).data.cast("B")


def finite32(values, owner, checked: bool = False) -> np.ndarray:
    """``values`` as float32, checked finite unless they come from ``fold.FoldedWeights``
    (which checks every value it computes)."""
    a = np.asarray(values)
    if a.dtype != np.float32:
        a = np.asarray(a, np.float64)
    bad = None if checked else first_nonfinite(a)
    if bad is not None:
        raise ExportError(f"holds {a.reshape(-1)[bad]} at element {bad}", layer=owner)
    return a.astype(np.float32, copy=False)


def cast(values, dtype, owner, checked: bool = False) -> np.ndarray:
    a = finite32(values, owner, checked)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            h = a.astype(np.float16)
        if not np.isfinite(h).all():
            raise ExportError(f"weights up to {np.abs(a).max():.6g} do not fit in float16 "
                              "(max 65504): use --dtype float32", layer=owner)
        return h
    return a


def json_float(v, layer: str, field: str):
    """A proto float as the shortest decimal that reads back to the same float32.
    JSON has no inf or NaN, and no app can use one here: those are errors."""
    if v is None:
        return None
    if not math.isfinite(v):
        raise ExportError(f"{field} is {v}, which the manifest (JSON) cannot hold and no MPS "
                          "kernel can use", layer=layer)
    v = float(np.float32(v))
    for digits in range(6, 10):
        s = float(f"{v:.{digits}g}")
        if np.float32(s) == np.float32(v):
            return s
    return v
