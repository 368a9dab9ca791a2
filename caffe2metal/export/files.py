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
    (which checks every value it computes).  Values computed in float64 (a kept
    BatchNorm/Scale's ``channel_affine``) are checked after rounding too: a finite
    float64 beyond float32's 3.4e38 would otherwise be written as inf."""
    a = np.asarray(values)
    if a.dtype != np.float32:
        a = np.asarray(a, np.float64)
    bad = None if checked else first_nonfinite(a)
    if bad is not None:
        raise ExportError(f"holds {a.reshape(-1)[bad]} at element {bad}", layer=owner)
    if a.dtype == np.float32:
        return a
    with np.errstate(over="ignore"):
        f = a.astype(np.float32)
    bad = None if checked else first_nonfinite(f)
    if bad is not None:
        raise ExportError(f"holds {a.reshape(-1)[bad]:.6g} at element {_element(a.shape, bad)}, "
                          "beyond float32 (max 3.4e38)", layer=owner)
    return f


def _element(shape, flat: int, first_row: int = 0) -> str:
    """Flat index ``flat`` of an array of ``shape`` as ``[i][j]...`` (row first)."""
    if not shape:
        return "[0]"
    index = [int(i) for i in np.unravel_index(flat, shape)]
    index[0] += first_row
    return "".join(f"[{i}]" for i in index)


HALF_EPS = 2.0 ** -11          # float16's unit roundoff: 11 significant bits
HALF_TINY = 2.0 ** -14         # smallest normal float16 (6.1e-5); below it, 2^-24 steps


def half_problem(a: np.ndarray) -> tuple[int, float, float, float] | None:
    """Where float16 would lose a weight that matters: ``(flat index, value, float16 value,
    scale)`` of the first one, or None.  ``a``: float32, output channels on axis 0 (every
    MPS layout; a 1-D array, ``channel_affine``'s [C], is one value per channel).

    The rule: each value's float16 rounding error must stay within float16's own
    precision at the scale of its output channel, unless the whole channel is
    negligible at the layer's scale:

        |half(w) - w| <= 2^-11 * max|W[row]|,   or   max|W[row]| < 2^-11 * max|W|,

    where ``max|W|`` is over the array (for layers written in blocks of rows, over the
    block: never looser).  A normal float16 (|w| >= 2^-14 = 6.1e-5) is within 2^-11 of
    |w|, and a subnormal one within 2^-25 = 3e-8 (half its 2^-24 = 6e-8 spacing); values
    below 2^-25 flush to 0.  So in effect a row whose largest |w| is below 2^-14 is
    refused, its weights flushed to zero or kept with fewer bits than float16 gives
    other rows, unless it is below 2^-11 of the layer's largest value (a dead channel:
    its error, at most |w|, is then below float16's rounding of the layer's largest
    weight).  Tiny values inside a row that also holds larger ones (trained weights
    hold many: 1e-7 beside 0.05) are harmless: their error, at most 3e-8, is below
    the rounding error of the row's largest value.  Rows of zeros are exact.

    Measured (``--dtype float16`` on the built-in example and 19 real architectures of
    ../shared/models with synthetic weights, 271 M weights): 1.1% of the weights are
    float16 subnormals (|w| < 6.1e-5) and 2,617 flush to 0, all inside rows whose
    maximum is far larger; the smallest row maximum per net is >= 4.9e-4 (8x above
    2^-14) except one depthwise row of MobileNetV2-SSDLite, [3][3] of maximum 4.5e-5
    in a layer of maximum 3.9 (1.2e-5 of it: negligible, so accepted).  Nothing is
    refused.  The stricter rule "refuse any value >= 2^-11 of its row's maximum that
    becomes subnormal" would refuse 19 of the 20 nets (1.9 M values: 4e-5 in a row of
    maximum 0.08 is subnormal yet above 2^-11 * 0.08), for errors of at most 3e-8
    against a row whose largest value float16 already rounds by up to 4e-5."""
    if a.size == 0:
        return None
    mag = np.abs(a)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    err = np.abs(h.astype(np.float32) - a)
    rows = mag.reshape(len(a), -1).max(axis=1) if a.ndim > 1 else mag
    eps = np.float32(HALF_EPS)
    limit = np.where(rows < eps * mag.max(), np.float32(np.inf), eps * rows)
    bad = err > limit.reshape((-1,) + (1,) * (a.ndim - 1))
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad.reshape(-1))[0])
    row = i // max(1, a[:1].size)
    return i, float(a.reshape(-1)[i]), float(h.reshape(-1)[i]), float(rows[row])


def cast(values, dtype, owner, checked: bool = False, first_row: int = 0) -> np.ndarray:
    """``values`` as the weights file's dtype; float16 refuses values beyond 65504 and
    weights that float16 would flush or keep too coarsely (:func:`half_problem`).
    ``first_row``: the row of the layer that ``values`` starts at (a block of rows), for
    the element named in errors."""
    a = finite32(values, owner, checked)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            h = a.astype(np.float16)
        i = first_nonfinite(h)
        if i is not None:
            raise ExportError(f"weight {a.reshape(-1)[i]:.6g} at element "
                              f"{_element(a.shape, i, first_row)} does not fit in float16 "
                              "(max 65504): use --dtype float32", layer=owner)
        problem = half_problem(a)
        if problem is not None:
            i, v, hv, scale = problem
            raise ExportError(
                f"weight {v:.6g} at element {_element(a.shape, i, first_row)} would be "
                f"{hv:.6g} in float16, an error beyond float16's precision (2^-11) at its "
                f"output channel's largest |weight| {scale:.3g} (float16 keeps 11 bits only "
                "from 6.1e-5 up): use --dtype float32", layer=owner)
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
