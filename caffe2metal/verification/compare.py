"""`caffe2metal compare`: max |A - B| of every weights/bias file two output directories share.

Files are matched by name, in DIR or DIR/metal; dtype from each directory's
manifest.json when it lists the file, otherwise float32.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import Caffe2MetalError
from .files import _NP_DTYPES


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
    if not d.is_dir():
        raise Caffe2MetalError("is not a directory", file=d)
    files: dict[str, Path] = {}
    for sub in (d, d / "metal"):
        if sub.is_dir():
            for p in sorted(sub.iterdir()):
                if p.is_file() and p.suffix in (".dat", ".bin"):
                    files.setdefault(p.name, p)
    dtypes: dict[str, str] = {}
    for m in (d / "manifest.json", d.parent / "manifest.json" if d.name == "metal" else None):
        if m is not None and m.is_file():
            try:
                manifest = json.loads(m.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise Caffe2MetalError(f"cannot read the manifest: {e}", file=m) from None
            for spec in _file_specs(manifest):
                dtypes[Path(spec["file"]).name] = spec.get("dtype", "float32")
            break
    return files, dtypes


def _file_specs(manifest: dict) -> Iterator[dict]:
    for entry in manifest.get("layers", []) or []:
        for key in ("weights", "bias"):
            if isinstance(entry.get(key), dict):
                yield entry[key]
        act = entry.get("activation") or {}
        if isinstance(act.get("slopes"), dict):
            yield act["slopes"]
    ssd = manifest.get("ssd") or {}
    if isinstance(ssd.get("priors"), dict):
        yield ssd["priors"]


def _values(path: Path, dtype: str) -> np.ndarray | str:
    data = path.read_bytes()
    np_dtype = np.dtype(_NP_DTYPES.get(dtype, "<f4"))
    if len(data) % np_dtype.itemsize:
        return f"{len(data)} bytes is not a whole number of {dtype} values"
    return np.frombuffer(data, np_dtype).astype(np.float64)


def compare(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> Comparison:
    files_a, dtypes_a = _weight_files(Path(dir_a))
    files_b, dtypes_b = _weight_files(Path(dir_b))
    result = Comparison(only_a=sorted(set(files_a) - set(files_b)),
                        only_b=sorted(set(files_b) - set(files_a)))
    for name in sorted(set(files_a) & set(files_b)):
        da, db = dtypes_a.get(name, "float32"), dtypes_b.get(name, "float32")
        a, b = _values(files_a[name], da), _values(files_b[name], db)
        if isinstance(a, str):
            result.rows.append(ComparisonRow(name, da, db, None, None, None, a))
        elif isinstance(b, str):
            result.rows.append(ComparisonRow(name, da, db, None, None, None, b))
        elif a.size != b.size:
            result.rows.append(ComparisonRow(name, da, db, None, None, None,
                                             f"{a.size} values vs {b.size}"))
        else:
            delta = float(np.abs(a - b).max()) if a.size else 0.0
            peak = float(np.abs(a).max()) if a.size else 0.0
            result.rows.append(ComparisonRow(name, da, db, a.size, peak, delta, ""))
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
