"""What `convert` wrote, read back: the manifest, its layer entries and the files it lists."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from ..errors import Caffe2MetalError

_NP_DTYPES = {"float32": "<f4", "float16": "<f2"}
_ENTRY_KEYS = ("name", "kind", "weights", "bias", "stride", "pad", "dilation", "groups")
_FILE_KEYS = ("file", "dtype", "shape")


def load_manifest(out: Path) -> dict:
    path = Path(out) / "manifest.json"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise Caffe2MetalError("no manifest.json: is this a `caffe2metal convert` output "
                               "directory?", file=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Caffe2MetalError(f"cannot read the manifest: {e}", file=path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != "caffe2metal":
        raise Caffe2MetalError("not a caffe2metal manifest (format is not \"caffe2metal\")",
                               file=path)
    if manifest.get("version") not in (1, 2):
        raise Caffe2MetalError(f"manifest version {manifest.get('version')!r} is not supported "
                               "(this caffe2metal reads versions 1 and 2)", file=path)
    return manifest


def read_array(out: Path, spec: dict, owner: str | None = None) -> tuple[np.ndarray, bool]:
    """The array a manifest file object describes, and whether its sha256 matches."""
    rel = Path(spec["file"])
    if rel.is_absolute() or ".." in rel.parts:
        raise Caffe2MetalError(f"manifest file path {spec['file']!r} leaves the output directory",
                               layer=owner)
    path = Path(out) / rel
    dtype = spec.get("dtype")
    if dtype not in _NP_DTYPES:
        raise Caffe2MetalError(f"unknown dtype {dtype!r}", file=path, layer=owner)
    shape = tuple(int(d) for d in spec["shape"])
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Caffe2MetalError(f"cannot read: {e.strerror}", file=path, layer=owner) from None
    want = math.prod(shape) * np.dtype(_NP_DTYPES[dtype]).itemsize
    if len(data) != want:
        raise Caffe2MetalError(f"has {len(data)} bytes; shape {list(shape)} as {dtype} needs "
                               f"{want}", file=path, layer=owner)
    sha_ok = hashlib.sha256(data).hexdigest() == spec.get("sha256")
    return np.frombuffer(data, _NP_DTYPES[dtype]).reshape(shape).astype(np.float32), sha_ok


def _entries(manifest: dict, out: Path) -> list[dict]:
    """The manifest's layer entries, with the keys verify reads checked (exit 2, no traceback)."""
    layers = manifest.get("layers", [])
    where = Path(out) / "manifest.json"
    if not isinstance(layers, list):
        raise Caffe2MetalError("'layers' is not a list", file=where)
    for i, e in enumerate(layers):
        missing = [k for k in _ENTRY_KEYS if not isinstance(e, dict) or k not in e]
        missing += [f"{f}.{k}" for f in ("weights", "bias") if f not in missing
                    and isinstance(e, dict) for k in _FILE_KEYS
                    if not isinstance(e[f], dict) or k not in e[f]]
        if missing:
            raise Caffe2MetalError(f"layer entry {i} lacks {', '.join(missing)}", file=where)
    return layers
