"""What `convert` wrote, read back: the manifest, its layer entries and the files it lists.

A manifest is checked before anything uses it (:func:`check_manifest`): every
key ``verify`` and ``compare`` read has the type and range the schema gives
(``export/manifest.schema.json``), file paths stay inside OUT, shapes are
lists of positive integers with a bounded product, dtypes are known.  A
hostile or damaged manifest is therefore one :class:`Caffe2MetalError`
naming the file and the field, never a traceback.  The manifest itself is
at most ``MAX_MANIFEST_BYTES``; a weight file is refused unread when its
size is not what its shape needs (``fstat`` first), and only regular files
are read (a FIFO never blocks the run).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from .. import mps
from ..errors import Caffe2MetalError
from ..graph import Graph, Layer
from ..paths import kind_of, open_regular, read_all, read_regular

_NP_DTYPES = {"float32": "<f4", "float16": "<f2"}

MAX_MANIFEST_BYTES = 64 << 20
MAX_ELEMENTS = 1 << 31          # of one file: more than any caffemodel can hold (2 GiB)
MAX_GEOMETRY = 1 << 14          # stride, pad, dilation: far above any real net's
MAX_GROUPS = 1 << 24
# weight file dimensions per kind (schema: the allOf rules on layers[].weights.shape)
_WEIGHT_AXES = {"convolution": 4, "convolution_transpose": 4, "fully_connected": 4,
                "depthwise_convolution": 3, "channel_affine": 1}


class _Bad(Exception):
    """A manifest field that is not what it must be (where, what)."""


def _where(path: tuple) -> str:
    text = ""
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "the top level"


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


_WANT = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _get(obj: dict, key: str, path: tuple, kind: type, optional: bool = False,
         nullable: bool = True) -> Any:
    """``obj[key]`` if it is a ``kind`` (a bool is no integer); None when ``optional``
    and absent (or null, when ``nullable``)."""
    if key not in obj:
        if optional:
            return None
        if len(path) >= 2 and path[0] == "layers":
            rest = _where(path[2:] + (key,))
            raise _Bad(f"layer entry {path[1]} lacks {rest} ({_where(path + (key,))})")
        raise _Bad(f"{_where(path + (key,))} is missing")
    v = obj[key]
    if optional and nullable and v is None:
        return None
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise _Bad(f"{_where(path + (key,))} is {_type_name(v)}, expected {_WANT[kind]}")
    return v


def _int(obj: dict, key: str, path: tuple, lo: int, hi: int) -> int:
    v = _get(obj, key, path, int)
    if not lo <= v <= hi:
        raise _Bad(f"{_where(path + (key,))} is {v}, expected {lo} to {hi}")
    return v


def _pair(obj: dict, key: str, path: tuple, lo: int) -> None:
    v = _get(obj, key, path, list)
    if len(v) != 2 or any(isinstance(d, bool) or not isinstance(d, int)
                          or not lo <= d <= MAX_GEOMETRY for d in v):
        raise _Bad(f"{_where(path + (key,))} is {_short(v)}, expected two integers "
                   f"{lo} to {MAX_GEOMETRY}")


def _names(obj: dict, key: str, path: tuple) -> None:
    v = _get(obj, key, path, list, optional=True)
    if v is not None and not all(isinstance(n, str) for n in v):
        raise _Bad(f"{_where(path + (key,))} is {_short(v)}, expected a list of names")


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _file_spec(obj: dict, key: str, path: tuple, axes: int | None = None,
               optional: bool = False) -> None:
    """A file object: file inside OUT, known dtype, shape of positive ints, bounded."""
    spec = _get(obj, key, path, dict, optional)
    if spec is None:
        return
    here = path + (key,)
    rel = _get(spec, "file", here, str)
    _check_relative(rel, here + ("file",))
    dtype = _get(spec, "dtype", here, str)
    if dtype not in _NP_DTYPES:
        raise _Bad(f"{_where(here + ('dtype',))} is {_short(dtype)}, expected one of "
                   f"{', '.join(_NP_DTYPES)}")
    shape = _get(spec, "shape", here, list)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape) \
            or len(shape) > 32:
        raise _Bad(f"{_where(here + ('shape',))} is {_short(shape)}, expected a list of "
                   "1 to 32 positive integers")
    if math.prod(shape) > MAX_ELEMENTS:
        raise _Bad(f"{_where(here + ('shape',))} {_short(shape)} has {math.prod(shape)} "
                   f"elements, more than {MAX_ELEMENTS}")
    if axes is not None and len(shape) != axes:
        raise _Bad(f"{_where(here + ('shape',))} is {_short(shape)}, expected {axes} axes")
    sha = spec.get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise _Bad(f"{_where(here + ('sha256',))} is {_type_name(sha)}, expected a string")


def _check_relative(rel: str, path: tuple) -> None:
    p = Path(rel)
    if (not rel or "\x00" in rel or p.is_absolute() or ".." in p.parts or "\\" in rel
            or rel.startswith("/") or p.drive):
        raise _Bad(f"{_where(path)} {_short(rel)} leaves the output directory")


def _plain_file(obj: dict, key: str, path: tuple) -> None:
    name = _get(obj, key, path, str)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise _Bad(f"{_where(path + (key,))} {_short(name)} is not a file name in the output "
                   "directory")


def _check_entry(e: Any, path: tuple) -> None:
    if not isinstance(e, dict):
        raise _Bad(f"{_where(path)} is {_type_name(e)}, expected an object")
    _get(e, "name", path, str)
    kind = _get(e, "kind", path, str)
    if kind not in mps.KINDS:
        raise _Bad(f"{_where(path + ('kind',))} is {_short(kind)}, expected one of "
                   f"{', '.join(mps.KINDS)}")
    _file_spec(e, "weights", path, _WEIGHT_AXES.get(kind))
    _file_spec(e, "bias", path, 1)
    _pair(e, "stride", path, 1)
    _pair(e, "pad", path, 0)
    _pair(e, "dilation", path, 1)
    _int(e, "groups", path, 1, MAX_GROUPS)
    _names(e, "chain", path)
    _names(e, "folded", path)
    act = _get(e, "activation", path, dict, optional=True)
    if act is not None:
        _file_spec(act, "slopes", path + ("activation",), optional=True)


def _check_ssd(ssd: dict, path: tuple) -> None:
    _file_spec(ssd, "priors", path)
    _get(ssd, "priorbox_concat", path, str, optional=True)
    heads = _get(ssd, "heads", path, list, optional=True) or []
    for i, h in enumerate(heads):
        if not isinstance(h, dict):
            raise _Bad(f"{_where(path + ('heads', i))} is {_type_name(h)}, expected an object")
        _get(h, "priorbox", path + ("heads", i), str)


def check_manifest(manifest: Any, compare_only: bool = False) -> None:
    """Raise _Bad for the first key verify (or, ``compare_only``, compare) reads that is
    not what it must be."""
    if not isinstance(manifest, dict):
        raise _Bad(f"the manifest is {_type_name(manifest)}, expected an object")
    if not compare_only:
        merged = _get(manifest, "merged", (), dict)
        _plain_file(merged, "prototxt", ("merged",))
        _plain_file(merged, "caffemodel", ("merged",))
        metal = _get(manifest, "metal", (), dict, optional=True, nullable=False)
        if metal is not None:
            skipped = _get(metal, "skipped", ("metal",), list, optional=True) or []
            for i, s in enumerate(skipped):
                if not isinstance(s, dict):
                    raise _Bad(f"metal.skipped[{i}] is {_type_name(s)}, expected an object")
                _get(s, "type", ("metal", "skipped", i), str)
    layers = _get(manifest, "layers", (), list, optional=compare_only) or []
    for i, e in enumerate(layers):
        if compare_only:
            if not isinstance(e, dict):
                raise _Bad(f"layers[{i}] is {_type_name(e)}, expected an object")
            _file_spec(e, "weights", ("layers", i), optional=True)
            _file_spec(e, "bias", ("layers", i), optional=True)
            act = _get(e, "activation", ("layers", i), dict, optional=True)
            if act is not None:
                _file_spec(act, "slopes", ("layers", i, "activation"), optional=True)
        else:
            _check_entry(e, ("layers", i))
    ssd = _get(manifest, "ssd", (), dict, optional=True)
    if ssd is not None:
        if compare_only:
            _file_spec(ssd, "priors", ("ssd",), optional=True)
        else:
            _check_ssd(ssd, ("ssd",))


def read_manifest(path: Path) -> Any:
    """The JSON of ``path``: bounded in size, a regular file, nesting bounded (an error
    naming the file, never a RecursionError)."""
    data = read_regular(path, MAX_MANIFEST_BYTES, "the manifest")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Caffe2MetalError(f"cannot read the manifest: not UTF-8 at byte {e.start}",
                               file=path) from None
    except RecursionError:
        raise Caffe2MetalError("cannot read the manifest: nested too deeply",
                               file=path) from None
    except ValueError as e:     # JSONDecodeError, and an integer of more than 4300 digits
        raise Caffe2MetalError(f"cannot read the manifest: {e}", file=path) from None


def load_manifest(out: Path) -> dict:
    path = Path(out) / "manifest.json"
    if not os.path.lexists(path):
        raise Caffe2MetalError("no manifest.json: is this a `caffe2metal convert` output "
                               "directory?", file=path)
    manifest = read_manifest(path)
    if not isinstance(manifest, dict) or manifest.get("format") != "caffe2metal":
        raise Caffe2MetalError("not a caffe2metal manifest (format is not \"caffe2metal\")",
                               file=path)
    version = manifest.get("version")
    if version not in (1, 2) or isinstance(version, bool):
        raise Caffe2MetalError(f"manifest version {_short(version)} is not supported "
                               "(this caffe2metal reads versions 1 and 2)", file=path)
    try:
        check_manifest(manifest)
    except _Bad as e:
        raise Caffe2MetalError(f"malformed manifest: {e}", file=path) from None
    for key in ("prototxt", "caffemodel"):      # OpenCV reads these by name: never a FIFO
        _regular_inside(Path(out), manifest["merged"][key], f"merged.{key}")
    return manifest


def _regular_inside(out: Path, rel: str, what: str, owner: str | None = None) -> Path:
    """``out / rel``, refused unless it is a regular file inside OUT (links resolved)."""
    path = out / rel
    try:
        real = Path(os.path.realpath(path))
        inside = real.is_relative_to(Path(os.path.realpath(out)))
        st = os.stat(path)
    except OSError as e:
        raise Caffe2MetalError(f"cannot read {what}: {e.strerror or e}", file=path,
                               layer=owner) from None
    except ValueError as e:         # a NUL in the name
        raise Caffe2MetalError(f"cannot read {what}: {e}", file=path, layer=owner) from None
    if not inside:
        raise Caffe2MetalError(f"{what} leads outside the output directory (a link?)",
                               file=path, layer=owner)
    if not stat.S_ISREG(st.st_mode):
        raise Caffe2MetalError(f"cannot read {what}: {kind_of(st.st_mode)}, not a regular file",
                               file=path, layer=owner)
    return path


def read_array(out: Path, spec: dict, owner: str | None = None) -> tuple[np.ndarray, bool]:
    """The array a manifest file object describes, and whether its sha256 matches.

    The file's size is checked against its shape before a byte is read."""
    try:
        _file_spec({"f": spec}, "f", ())
    except _Bad as e:
        raise Caffe2MetalError(f"malformed manifest file object: {e}", layer=owner) from None
    rel = spec["file"]
    path = _regular_inside(Path(out), rel, "weight file", owner)
    dtype = spec["dtype"]
    shape = tuple(spec["shape"])
    want = math.prod(shape) * np.dtype(_NP_DTYPES[dtype]).itemsize
    fd, st = open_regular(path, "weight file")
    try:
        if st.st_size != want:
            raise Caffe2MetalError(f"has {st.st_size} bytes; shape {list(shape)} as {dtype} "
                                   f"needs {want}", file=path, layer=owner)
        data = read_all(fd, want, str(path), "weight file")
    finally:
        os.close(fd)
    sha_ok = hashlib.sha256(data).hexdigest() == spec.get("sha256")
    array = np.frombuffer(data, _NP_DTYPES[dtype]).reshape(shape)   # read-only
    return array.astype(np.float32, copy=False), sha_ok


def _entries(manifest: dict, out: Path) -> list[dict]:
    """The manifest's layer entries, with the keys verify reads checked (exit 2, no traceback)."""
    where = Path(out) / "manifest.json"
    try:
        check_manifest(manifest)
    except _Bad as e:
        raise Caffe2MetalError(f"malformed manifest: {e}", file=where) from None
    return manifest.get("layers", [])


def manifest_layer(graph: Graph, name: str, out: Path) -> Layer:
    """The layer of the model that the manifest in ``out`` names (one error line if none)."""
    try:
        return graph.layer(name)
    except (KeyError, TypeError):
        raise Caffe2MetalError(f"the manifest names layer {name!r}, which the model does not "
                               "have", file=Path(out) / "manifest.json") from None
