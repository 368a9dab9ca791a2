"""Execute the manifest's plan from OUT alone (manifest.json and metal/), in numpy or MLX.

``run_plan(out, feed)`` runs every op in order and returns the net's outputs
(blobs no op reads) by their names in the file, and SSD's detections.  The walk,
the checks (``checks.check_plan``), file reading and the output assembly are this
module's, for every backend; ``backend`` picks the per-op compute
(``backend.NumpyBackend``: ``ops``, one numpy function per kind;
``mlx_ops.MlxBackend``: Apple's MLX, ``device`` cpu or gpu).
``activations="float16"`` rounds every MPS op's output to float16, as an MPSImage of
float16 feature channels stores it on the GPU (constants and DetectionOutput's rows stay
float32: app code on the CPU).
Never reads the prototxt or the caffemodel.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import Caffe2MetalError
from ..graph import Layer
from ..layers import registry
from . import ops
from .backend import BACKENDS, DEVICES, select
from .checks import check_plan
from .ops import PlanError

ACTIVATIONS = ("float32", "float16")
FLOAT16_MAX = 65504.0           # IEEE 754 binary16's largest finite value
_NP = {"float32": "<f4", "float16": "<f2"}
__all__ = ["ACTIVATIONS", "BACKENDS", "DEVICES", "PlanError", "RunOutput", "default_feed",
           "load_plan", "run_plan", "select"]


@dataclass
class RunOutput:
    outputs: dict[str, np.ndarray]                    # file blob name -> value
    detections: list[dict] = field(default_factory=list)
    values: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)  # unique name
    skipped: dict[str, str] = field(default_factory=dict)
    """Ops not executed, by name -> why: an ``unavailable`` op (its reason, as convert wrote
    it) and every op reading what such an op would have computed."""
    lost: dict[str, str] = field(default_factory=dict, repr=False)
    """The blobs those ops would have written (unique name -> why)."""
    overflow: dict[str, float] = field(default_factory=dict)
    """With float16 activations: MPS ops whose output exceeds float16's largest finite value
    (65504), name -> max |value| before rounding (stored as inf in a float16 MPSImage)."""


class _Values(Mapping):
    """Every blob's value by unique name, converted to numpy when read (an MLX run keeps its
    arrays: converting the blobs nobody reads would cost a copy each)."""

    def __init__(self, values: dict, to_numpy):
        self._values, self._to_numpy = values, to_numpy

    def __getitem__(self, name: str) -> np.ndarray:
        return self._to_numpy(self._values[name])

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


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
    return np.frombuffer(data, _NP[dtype]).reshape(shape)


def run_plan(out, feed: dict[str, np.ndarray] | None = None, activations: str = "float32",
             backend: str = "numpy", device: str | None = None) -> RunOutput:
    out = Path(out)
    if activations not in ACTIVATIONS:
        raise Caffe2MetalError(f"--activations {activations!r}: use float32 or float16")
    be = select(backend, device)
    manifest = load_plan(out)
    # inf and NaN are values like any other here (float16 overflow is reported by name)
    with be.context(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _walk(out, manifest, default_feed(manifest) if feed is None else feed,
                     activations, be)


def _walk(out: Path, manifest: dict, feed: dict[str, np.ndarray], activations: str,
          be) -> RunOutput:
    entries = {e.get("name"): e for e in manifest.get("layers", []) if isinstance(e, dict)}
    ssd = manifest.get("ssd") or {}
    values: dict = {}
    for name, x in feed.items():
        values[name] = be.from_numpy(np.asarray(x, np.float32))
    read: set[str] = set()
    rows = None
    skipped: dict[str, str] = {}
    lost: dict[str, str] = {}
    overflow: dict[str, float] = {}
    for i, op in enumerate(manifest["plan"]):
        if not isinstance(op, dict) or not isinstance(op.get("name"), str):
            raise PlanError(f"#{i}", "name", "an op without a name")
        for key in ("bottoms", "tops"):
            if not isinstance(op.get(key), list) or not all(isinstance(b, str)
                                                            for b in op[key]):
                raise PlanError(op["name"], key, "is not a list of blob names")
        after = next((lost[b] for b in op["bottoms"] if b in lost), None)
        app: dict = op["app"] if isinstance(op.get("app"), dict) else {}
        if after is not None or app.get("op") == "unavailable":
            skipped[op["name"]] = after or str(app.get("reason"))
            downstream = after or f"after op {op['name']!r}: {app.get('reason')}"
            lost.update((t, downstream) for t in op["tops"])
            continue
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
            ys = _execute(op, xs, out, entries, ssd, be)
        if len(ys) != len(op["tops"]):
            raise PlanError(op["name"], "tops", f"{len(op['tops'])} tops for {len(ys)} values")
        for top, y in zip(op["tops"], ys, strict=True):
            rounded = activations == "float16" and "mps" in op
            if rounded and op["name"] not in overflow:
                largest = be.absmax(y)
                if largest > FLOAT16_MAX:
                    overflow[op["name"]] = largest
            values[top] = be.round16(y) if rounded else y
        if (op.get("app") or {}).get("op") == "detection_output":
            rows = be.to_numpy(ys[0])
    names = manifest.get("blob_names") or {}
    produced = [t for op in manifest["plan"] for t in op["tops"]]
    outputs = {names.get(t, t): be.to_numpy(values[t]) for t in produced
               if t not in read and t in values}
    dets = [] if rows is None else [
        {"label": int(r[1]), "score": float(r[2]), "box": [float(v) for v in r[3:7]]}
        for r in rows.reshape(-1, 7) if r[1] >= 0]
    return RunOutput(outputs, dets, _Values(values, be.to_numpy), skipped, lost, overflow)


def _execute(op: dict, xs: list, out: Path, entries: dict, ssd: dict, be) -> list:
    name = op["name"]
    m, app = op.get("mps"), op.get("app")
    if isinstance(m, dict) and "entry" in m:
        entry = entries.get(m["entry"])
        if entry is None:
            raise PlanError(name, "mps.entry", f"{m['entry']!r} is not in the manifest's layers")
        w = be.weights(_array(out, entry.get("weights"), name))
        b = be.weights(_array(out, entry.get("bias"), name))
        return [be.weighted({**op, "_entry": entry}, m, xs[0], w, b)]
    if isinstance(m, dict):
        kernel = m.get("kernel")
        if kernel in ("MPSCNNPoolingMax", "MPSCNNPoolingAverage"):
            return [be.pooling(op, m, xs[0])]
        if isinstance(kernel, str) and kernel.startswith("MPSCNNNeuron") and \
                kernel != "MPSCNNNeuronPReLU":
            return [be.neuron(op, m, xs[0])] * len(op["tops"])
        if kernel == "MPSCNNNeuronPReLU":
            slopes = _array(out, m.get("slopes"), name).reshape(-1).astype(np.float32)
            return [be.prelu(op, m, xs[0], slopes)]
        if kernel == "MPSCNNSoftMax":
            return [be.softmax(xs[0], 1)]
        if kernel in ("MPSCNNAdd", "MPSCNNMultiply"):
            return [be.eltwise(op, m, xs)]
        if kernel == "destinationFeatureChannelOffset":
            return [be.concat_channels(op, m, xs)]
        if app is None:
            raise PlanError(name, "mps.kernel", f"{kernel!r} is not a kernel run executes")
    if not isinstance(app, dict):
        raise PlanError(name, "app", "an op needs mps or app")
    return _app(op, app, xs, out, ssd, be)


def _app(op: dict, app: dict, xs: list, out: Path, ssd: dict, be) -> list:
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
        return [be.reshape(xs[0], top_shape())]
    if kind == "transpose":
        return [be.transpose(xs[0], app.get("order"))]
    if kind == "concat":
        return [be.concat(xs, int(app.get("axis", 1)))]
    if kind in _ELEMENTWISE:
        return [_ELEMENTWISE[kind](be, op, app, xs)]
    if kind == "slice":
        axis = int(app["axis"])
        return [be.slice(xs[0], axis, s, n)
                for s, n in zip(app["starts"], app["sizes"], strict=True)]
    if kind == "constant":
        priors = _array(out, ssd.get("priors"), name).reshape(2, -1).astype(np.float32)
        start, count = (int(v) for v in app.get("columns", [0, -1]))
        if start < 0 or count <= 0 or start + count > priors.shape[1]:
            raise PlanError(name, "app.columns", f"[{start}, {count}] is outside priors.dat's "
                            f"{priors.shape[1]} columns")
        return [be.from_numpy(priors[:, start:start + count][None])]
    if kind == "normalize":
        scale = _array(out, app.get("scale"), name).reshape(-1).astype(np.float32)
        return [be.normalize(op, app, xs[0], scale)]
    # in numpy whatever the backend: SSD's decoder and NMS (app code on the CPU), and the
    # fork layers' numpy forward roles
    if kind == "detection_output":
        return [be.from_numpy(ops.detections(op, *(be.to_numpy(x) for x in xs[:3])))]
    return [be.from_numpy(y) for y in _fork(op, app, [be.to_numpy(x) for x in xs])]


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
    "softmax": lambda be, op, app, xs: be.softmax(xs[0], int(app.get("axis", 1))),
    "clip": lambda be, op, app, xs: be.clip(xs[0], app["min"], app["max"]),
    "max": lambda be, op, app, xs: be.maximum(xs),
    "scale_by": lambda be, op, app, xs: be.scale_by(op, app, *xs[:2]),
    "lrn": lambda be, op, app, xs: be.lrn(op, app, xs[0]),
}
"""App ops of one top computed from the bottoms and the op's parameters alone."""
