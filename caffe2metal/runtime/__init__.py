"""Execute the manifest's plan in numpy, from OUT alone (manifest.json and metal/).

``run_plan(out, feed)`` runs every op in order (``ops`` holds one function per
kind) and returns the net's outputs (blobs no op reads) by their names in the
file, and SSD's detections.  ``activations="float16"`` rounds every op's output
to float16, as an MPSImage of float16 feature channels stores it on the GPU
(constants and DetectionOutput's rows stay float32: app code on the CPU).
Never reads the prototxt or the caffemodel.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import Caffe2MetalError
from ..graph import Layer
from ..layers import registry
from . import ops
from .checks import check_plan
from .ops import PlanError

ACTIVATIONS = ("float32", "float16")
_NP = {"float32": "<f4", "float16": "<f2"}
__all__ = ["ACTIVATIONS", "PlanError", "RunOutput", "default_feed", "load_plan", "run_plan"]


@dataclass
class RunOutput:
    outputs: dict[str, np.ndarray]                    # file blob name -> value
    detections: list[dict] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)   # unique name


def load_plan(out: Path) -> dict:
    """manifest.json of OUT, version 2 with a plan that ``checks.check_plan`` finds
    runnable as a whole (one-line errors otherwise, before anything is allocated)."""
    path = Path(out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Caffe2MetalError("no manifest.json: is this a `caffe2metal convert` output "
                               "directory?", file=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Caffe2MetalError(f"cannot read the manifest: {e}", file=path) from None
    except RecursionError:
        raise Caffe2MetalError("cannot read the manifest: nested too deeply", file=path) from None
    if not isinstance(manifest, dict) or manifest.get("version") != 2:
        raise Caffe2MetalError("not a version 2 caffe2metal manifest", file=path)
    if not isinstance(manifest.get("plan"), list):
        raise Caffe2MetalError("the manifest has no plan (converted with --no-metal?)",
                               file=path)
    check_plan(manifest, Path(out), path)
    return manifest


def default_feed(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """verify's deterministic input: uniform [-1, 1) per input, in the manifest's order."""
    rng = np.random.default_rng(seed)
    return {i["name"]: rng.uniform(-1, 1, (1, *i["shape"][1:])).astype(np.float32)
            for i in manifest.get("inputs", [])}


def _array(out: Path, spec, owner: str) -> np.ndarray:
    if not isinstance(spec, dict):
        raise PlanError(owner, "file", "is not a file object")
    rel = Path(str(spec.get("file")))
    if rel.is_absolute() or ".." in rel.parts:
        raise PlanError(owner, "file", f"{spec.get('file')!r} leaves the output directory")
    dtype = spec.get("dtype")
    if dtype not in _NP:
        raise PlanError(owner, "dtype", f"unknown dtype {dtype!r}")
    shape = tuple(int(d) for d in spec.get("shape", []))
    try:
        data = (Path(out) / rel).read_bytes()
    except OSError as e:
        raise PlanError(owner, "file", f"cannot read {rel}: {e.strerror}") from None
    if len(data) != math.prod(shape) * np.dtype(_NP[dtype]).itemsize:
        raise PlanError(owner, "file", f"{rel} has {len(data)} bytes, not {list(shape)} "
                        f"{dtype}")
    if spec.get("sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise PlanError(owner, "file", f"{rel} does not match its sha256")
    # read-only; float32 files are used as read (no second copy of fc6's 411 MB)
    return np.frombuffer(data, _NP[dtype]).reshape(shape).astype(np.float32, copy=False)


def run_plan(out, feed: dict[str, np.ndarray] | None = None,
             activations: str = "float32") -> RunOutput:
    out = Path(out)
    if activations not in ACTIVATIONS:
        raise Caffe2MetalError(f"--activations {activations!r}: use float32 or float16")
    manifest = load_plan(out)
    feed = default_feed(manifest) if feed is None else feed
    entries = {e.get("name"): e for e in manifest.get("layers", []) if isinstance(e, dict)}
    ssd = manifest.get("ssd") or {}
    values: dict[str, np.ndarray] = {}
    for name, x in feed.items():
        values[name] = np.asarray(x, np.float32)
    read: set[str] = set()
    rows = None
    for i, op in enumerate(manifest["plan"]):
        if not isinstance(op, dict) or not isinstance(op.get("name"), str):
            raise PlanError(f"#{i}", "name", "an op without a name")
        for key in ("bottoms", "tops"):
            if not isinstance(op.get(key), list) or not all(isinstance(b, str)
                                                            for b in op[key]):
                raise PlanError(op["name"], key, "is not a list of blob names")
        missing = [b for b in op["bottoms"] if b not in values]
        if missing:
            raise PlanError(op["name"], "bottoms", f"{missing[0]!r} is not computed before "
                            "this op")
        xs = [values[b] for b in op["bottoms"]]
        read.update(op["bottoms"])
        if (op.get("app") or {}).get("op") == "input" and not xs:
            absent = [t for t in op["tops"] if t not in values]
            if absent:
                raise PlanError(op["name"], "tops", f"input {absent[0]!r} is not fed")
            ys = [values[t] for t in op["tops"]]
        else:
            ys = _execute(op, xs, out, entries, ssd)
        if len(ys) != len(op["tops"]):
            raise PlanError(op["name"], "tops", f"{len(op['tops'])} tops for {len(ys)} values")
        for top, y in zip(op["tops"], ys, strict=True):
            rounded = activations == "float16" and "mps" in op
            values[top] = y.astype(np.float16).astype(np.float32) if rounded else y
        if (op.get("app") or {}).get("op") == "detection_output":
            rows = ys[0]
    names = manifest.get("blob_names") or {}
    produced = [t for op in manifest["plan"] for t in op["tops"]]
    outputs = {names.get(t, t): values[t] for t in produced if t not in read}
    dets = [] if rows is None else [
        {"label": int(r[1]), "score": float(r[2]), "box": [float(v) for v in r[3:7]]}
        for r in rows.reshape(-1, 7) if r[1] >= 0]
    return RunOutput(outputs, dets, values)


def _execute(op: dict, xs: list, out: Path, entries: dict, ssd: dict) -> list[np.ndarray]:
    name = op["name"]
    m, app = op.get("mps"), op.get("app")
    if isinstance(m, dict) and "entry" in m:
        entry = entries.get(m["entry"])
        if entry is None:
            raise PlanError(name, "mps.entry", f"{m['entry']!r} is not in the manifest's layers")
        w = _array(out, entry.get("weights"), name)
        b = _array(out, entry.get("bias"), name)
        return [ops.weighted({**op, "_entry": entry}, m, xs[0], w, b)]
    if isinstance(m, dict):
        kernel = m.get("kernel")
        if kernel in ("MPSCNNPoolingMax", "MPSCNNPoolingAverage"):
            return [ops.pooling(op, m, xs[0])]
        if isinstance(kernel, str) and kernel.startswith("MPSCNNNeuron") and \
                kernel != "MPSCNNNeuronPReLU":
            return [ops.neuron(op, m, xs[0])] * len(op["tops"])
        if kernel == "MPSCNNNeuronPReLU":
            slopes = _array(out, m.get("slopes"), name).reshape(-1)
            return [ops.prelu(op, m, xs[0], slopes)]
        if kernel == "MPSCNNSoftMax":
            return [ops.softmax(xs[0], 1)]
        if kernel in ("MPSCNNAdd", "MPSCNNMultiply"):
            return [ops.eltwise(op, m, xs)]
        if kernel == "destinationFeatureChannelOffset":
            return [ops.concat_channels(op, m, xs)]
        if app is None:
            raise PlanError(name, "mps.kernel", f"{kernel!r} is not a kernel run executes")
    if not isinstance(app, dict):
        raise PlanError(name, "app", "an op needs mps or app")
    return _app(op, app, xs, out, ssd)


def _app(op: dict, app: dict, xs: list, out: Path, ssd: dict) -> list[np.ndarray]:
    kind, name = app.get("op"), op["name"]
    shapes = op.get("shapes") or {}

    def top_shape(i: int = 0) -> tuple:
        s = shapes.get(op["tops"][i])
        if not isinstance(s, list) or not all(isinstance(d, int) for d in s):
            raise PlanError(name, f"shapes.{op['tops'][i]}", "is not a known shape")
        return (1, *s[1:])
    if kind in ("identity", "input"):
        return [xs[0]] * len(op["tops"]) if xs else []
    if kind == "none":
        return []
    if kind == "reshape":
        return [xs[0].reshape(top_shape())]
    if kind == "transpose":
        return [np.ascontiguousarray(xs[0].transpose(app.get("order")))]
    if kind == "concat":
        return [np.concatenate(xs, axis=int(app.get("axis", 1)))]
    if kind in _ELEMENTWISE:
        return [_ELEMENTWISE[kind](op, app, xs)]
    if kind == "slice":
        axis = int(app["axis"])
        return [np.take(xs[0], range(s, s + n), axis=axis)
                for s, n in zip(app["starts"], app["sizes"], strict=True)]
    if kind == "constant":
        priors = _array(out, ssd.get("priors"), name).reshape(2, -1)
        start, count = (int(v) for v in app.get("columns", [0, -1]))
        if start < 0 or count <= 0 or start + count > priors.shape[1]:
            raise PlanError(name, "app.columns", f"[{start}, {count}] is outside priors.dat's "
                            f"{priors.shape[1]} columns")
        return [priors[:, start:start + count][None]]
    if kind == "normalize":
        return [ops.normalize(op, app, xs[0], _array(out, app.get("scale"), name).reshape(-1))]
    if kind == "unavailable":
        raise PlanError(name, "app.reason", str(app.get("reason")))
    if kind == "detection_output":
        return [ops.detections(op, *xs[:3])]
    return _fork(op, app, xs)


def _fork(op: dict, app: dict, xs: list) -> list[np.ndarray]:
    """A layer type with no MPS kernel whose numpy ``forward`` role we have (fork layers:
    Upsample, Axpy, ShuffleChannel, ...), computed from the op's Caffe parameters."""
    name, caffe_type = op["name"], app.get("caffe_type")
    forward = registry.forward(caffe_type) if isinstance(caffe_type, str) else None
    if forward is None:
        raise PlanError(name, "app.op", f"{app.get('op')!r} has no numpy implementation in run")
    params = app.get("params")
    if not isinstance(params, dict):
        raise PlanError(name, "app.params", "is not an object")
    layer = Layer(name=name, type=str(caffe_type), bottoms=list(op["bottoms"]),
                  tops=list(op["tops"]), params=params)
    try:
        return [np.asarray(y, np.float32) for y in forward(layer, xs)]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise PlanError(name, "app.params", f"{type(e).__name__}: {e}") from None


_ELEMENTWISE = {
    "softmax": lambda op, app, xs: ops.softmax(xs[0], int(app.get("axis", 1))),
    "clip": lambda op, app, xs: np.clip(xs[0], app["min"], app["max"]).astype(np.float32),
    "max": lambda op, app, xs: np.max(np.stack(xs), axis=0),
    "scale_by": lambda op, app, xs: ops.scale_by(op, app, *xs[:2]),
    "lrn": lambda op, app, xs: ops.lrn(op, app, xs[0]),
}
"""App ops of one top computed from the bottoms and the op's parameters alone."""
