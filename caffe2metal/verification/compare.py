"""`caffe2metal compare`: max |A - B| of every weights/bias file two output directories share.

Files are matched by name, in DIR or DIR/metal; dtype from each directory's
manifest.json when it lists the file, otherwise float32.  The manifest is
checked as ``verify`` checks it (only the file objects compare reads); files
are read a block at a time, only regular ones.  A NaN in either file makes
max |A-B| infinite: NaN is never within a tolerance.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import Caffe2MetalError
from ..paths import check_name, open_regular, read_all
from .files import _NP_DTYPES, _Bad, check_manifest, read_manifest


class ComparisonRow(NamedTuple):
    """One file present in both directories (a tuple, so r[5] still reads max_diff)."""
    file: str
    dtype_a: str
    dtype_b: str
    values: int | None           # value count; None when the files cannot be compared
    max_a: float | None          # max |A|
    max_diff: float | None       # max |A - B|
    note: str


@dataclass
class Comparison:
    rows: list[ComparisonRow] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)


def _weight_files(d: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """file name -> path for *.dat / *.bin in d and d/metal; file name -> dtype from a manifest."""
    d = Path(d)
    check_name(d)
    try:
        if not d.is_dir():
            raise Caffe2MetalError("is not a directory", file=d)
        files: dict[str, Path] = {}
        for sub in (d, d / "metal"):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    if p.suffix in (".dat", ".bin") and p.is_file():
                        files.setdefault(p.name, p)
    except OSError as e:
        raise Caffe2MetalError(f"cannot list: {e.strerror or e}",
                               file=e.filename or d) from None
    dtypes: dict[str, str] = {}
    for m in (d / "manifest.json", d.parent / "manifest.json" if d.name == "metal" else None):
        if m is not None and os.path.lexists(m):
            manifest = read_manifest(m)
            try:
                check_manifest(manifest, compare_only=True)
            except _Bad as e:
                raise Caffe2MetalError(f"malformed manifest: {e}", file=m) from None
            for spec in _file_specs(manifest):
                dtypes[Path(spec["file"]).name] = spec["dtype"]
            break
    return files, dtypes


def _file_specs(manifest: dict) -> Iterator[dict]:
    """The file objects of a manifest :func:`check_manifest` has checked for compare."""
    for entry in manifest.get("layers") or []:
        for key in ("weights", "bias"):
            if isinstance(entry.get(key), dict):
                yield entry[key]
        act = entry.get("activation") or {}
        if isinstance(act.get("slopes"), dict):
            yield act["slopes"]
    ssd = manifest.get("ssd") or {}
    if isinstance(ssd.get("priors"), dict):
        yield ssd["priors"]


_BLOCK = 1 << 22                # values compared at a time: memory stays bounded


def _open(path: Path) -> tuple[int, int]:
    fd, st = open_regular(path, "weight file")
    return fd, st.st_size


def _row(name: str, path_a: Path, path_b: Path, da: str, db: str) -> ComparisonRow:
    """max |A| and max |A - B| of two files, a block at a time.  A NaN on either side
    makes max |A - B| infinite (NaN is never within a tolerance); max |A| is of the
    values that are not NaN."""
    ta, tb = np.dtype(_NP_DTYPES[da]), np.dtype(_NP_DTYPES[db])
    fa, size_a = _open(path_a)
    try:
        fb, size_b = _open(path_b)
        try:
            for size, t, dt in ((size_a, ta, da), (size_b, tb, db)):
                if size % t.itemsize:
                    return ComparisonRow(name, da, db, None, None, None,
                                         f"{size} bytes is not a whole number of {dt} values")
            n, m = size_a // ta.itemsize, size_b // tb.itemsize
            if n != m:
                return ComparisonRow(name, da, db, None, None, None, f"{n} values vs {m}")
            peak = delta = 0.0
            nans = 0
            done = 0
            while done < n:
                k = min(_BLOCK, n - done)
                a = _block(fa, k, ta, path_a)
                b = _block(fb, k, tb, path_b)
                bad = np.isnan(a) | np.isnan(b)
                if bad.any():
                    nans += int(bad.sum())
                    a, b = a[~bad], b[~bad]
                if a.size:
                    with np.errstate(over="ignore", invalid="ignore"):
                        d = np.abs(a - b)
                    # inf - inf is NaN: two infinities of the same sign agree
                    d[np.isnan(d)] = 0.0
                    delta = max(delta, float(d.max()))
                    peak = max(peak, float(np.abs(a).max()))
                done += k
            note = ""
            if nans:
                delta = math.inf
                note = f"{nans} value(s) NaN in A or B: never within a tolerance"
            return ComparisonRow(name, da, db, n, peak, delta, note)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _block(fd: int, count: int, dtype: np.dtype, path: Path) -> np.ndarray:
    data = read_all(fd, count * dtype.itemsize, str(path), "weight file",
                    to_end=False) if count else b""
    return np.frombuffer(data, dtype).astype(np.float64)


def compare(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> Comparison:
    files_a, dtypes_a = _weight_files(Path(dir_a))
    files_b, dtypes_b = _weight_files(Path(dir_b))
    result = Comparison(only_a=sorted(set(files_a) - set(files_b)),
                        only_b=sorted(set(files_b) - set(files_a)))
    for name in sorted(set(files_a) & set(files_b)):
        da, db = dtypes_a.get(name, "float32"), dtypes_b.get(name, "float32")
        result.rows.append(_row(name, files_a[name], files_b[name], da, db))
    return result


def render_comparison(c: Comparison, dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> str:
    head = ("file", "dtype A", "dtype B", "values", "max |A|", "max |A-B|")
    body = [(r.file, r.dtype_a, r.dtype_b, "-" if r.values is None else str(r.values),
             "-" if r.max_a is None else f"{r.max_a:.4g}",
             "-" if r.max_diff is None else f"{r.max_diff:.3g}", r.note) for r in c.rows]
    widths = [max([len(head[i])] + [len(v[i]) for v in body]) for i in range(6)]
    lines = [f"A = {dir_a}", f"B = {dir_b}", ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for v in body:
        lines.append("  ".join([v[i].ljust(widths[i]) for i in range(6)] + [v[6]]).rstrip())
    deltas = [r.max_diff for r in c.rows if r.max_diff is not None]
    lines.append("")
    lines.append(f"{len(c.rows)} file(s) in both; largest max |A-B| "
                 f"{max(deltas):.3g}" if deltas else f"{len(c.rows)} file(s) in both")
    lines.append(f"only in A ({len(c.only_a)}): {', '.join(c.only_a) or '-'}")
    lines.append(f"only in B ({len(c.only_b)}): {', '.join(c.only_b) or '-'}")
    return "\n".join(lines)
