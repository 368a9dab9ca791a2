"""The plan checked whole before ``run`` allocates or computes anything.

``check_plan(manifest, out, where)`` walks the plan once, in execution order, and
raises a one-line :class:`PlanError` (``op 'NAME': FIELD: why``) for the first op a
hand-edited or damaged manifest makes unrunnable:

* structure: an op that is not an object, a name, ``bottoms``/``tops`` that are not
  lists of blob names, more than ``MAX_OPS`` ops;
* order: a bottom that is neither a net input nor an earlier op's top (a cycle, or a
  blob read before it is written), a top written twice;
* shapes: a dimension that is not a non-negative integer (``null`` is an unknown
  one), more than ``MAX_DIMS`` dimensions, ``MAX_ELEMENTS`` values or more in one
  blob (or in all of them), a bottom's recorded shape that disagrees with the shape
  its producer (or the manifest's ``inputs``) records;
* geometry: kernel sizes, strides, dilations, offsets and destinations that are not
  integers, an offset beyond the source and the kernel, a destination that is not
  the top's shape, a padded source far larger than the blobs (an absurd allocation);
* files: a weights, bias, slopes, scale or priors file that leaves OUT, is missing,
  or whose size is not its recorded shape and dtype (``stat`` only: ``run`` reads it
  later and checks its sha256);
* kinds: a kernel ``run`` does not execute, parameters of the wrong type.

Nothing here reads a weights file or builds an array.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NoReturn

from ..errors import Caffe2MetalError
from ..graph import Layer
from ..layers import registry
from ..mps import KINDS
from ..mps.geometry import SLICE, slices, window_start
from .ops import PlanError

MAX_OPS = 1_000_000
MAX_DIMS = 8
MAX_ELEMENTS = 2 ** 31
"""A blob (or all blobs together) of this many values or more is refused (8 GiB as float32)."""
MIN_SCRATCH = 2 ** 24
"""A padded or zero-inserted source may be 16x the blobs it joins, or this many values."""
DTYPES = {"float32": 4, "float16": 2}
NEURONS = ("ReLU", "ReLUN", "Sigmoid", "TanH", "ELU", "Absolute", "Power", "Exponential",
           "Logarithm")
APP_OPS = ("identity", "input", "none", "reshape", "transpose", "concat", "slice", "constant",
           "unavailable", "detection_output", "normalize", "softmax", "clip", "max",
           "scale_by", "lrn")
"""``app.op`` values ``run`` executes besides the fork layers (``app.caffe_type`` with a
numpy forward role)."""


def check_plan(manifest: dict, out: Path, where: Path) -> None:
    """Raise PlanError (or Caffe2MetalError for keys outside the plan) for the first
    problem; return None when every op can run as written."""
    plan = manifest["plan"]
    if len(plan) > MAX_OPS:
        raise Caffe2MetalError(f"plan: {len(plan)} ops, more than {MAX_OPS}", file=where)
    inputs = _inputs(manifest, where)
    ctx = _Context(Path(out), _entries(manifest, where), _object(manifest, "ssd", where))
    names = _object(manifest, "blob_names", where)
    if not all(isinstance(v, str) for v in names.values()):
        raise Caffe2MetalError("blob_names: a value is not a string", file=where)
    for i, op in enumerate(plan):
        _structure(i, op)
    state = _State(inputs)
    for i, op in enumerate(plan):
        _walk(ctx, state, i, op)


def _structure(i: int, op) -> None:
    """Op #i is an object with a name and lists of blob names.  Raised as a plain
    Caffe2MetalError (the same text as PlanError's): a plan that is not a list of ops
    cannot be run in part by cutting one op out (verify's plan rows do that to a PlanError)."""
    if not isinstance(op, dict) or not isinstance(op.get("name"), str):
        raise Caffe2MetalError(f"op '#{i}': name: an op without a name (not an object with a "
                               "string name)")
    for key in ("bottoms", "tops"):
        if not isinstance(op.get(key), list) or not all(isinstance(b, str) for b in op[key]):
            raise Caffe2MetalError(f"op {op['name']!r}: {key}: is not a list of blob names")


class _State:
    """What the ops before the current one wrote: recorded shapes, writers, and the shapes
    of the arrays ``run`` computes (batch 1; None where only the data knows)."""

    def __init__(self, inputs: dict[str, list]):
        self.inputs = inputs
        self.shapes: dict[str, list | None] = dict(inputs)
        self.actual: dict[str, tuple | None] = {n: (1, *s[1:]) for n, s in inputs.items()}
        self.writer = {n: "the manifest's inputs" for n in inputs}
        self.total = 0


def _walk(ctx: _Context, state: _State, i: int, op) -> None:
    """Check op #i (``_structure`` found it well formed) against what the earlier ops
    wrote, then record its tops."""
    name = op["name"]
    own = _own_shapes(op)
    app = op.get("app")
    is_input = isinstance(app, dict) and app.get("op") == "input" and not op["bottoms"]
    for b in op["bottoms"]:
        if b not in state.writer:
            raise PlanError(name, "bottoms", f"{b!r} is read before any op writes it (not a "
                            "net input nor an earlier op's top: ops run in the plan's order, "
                            "a cycle cannot run)")
        _agree(name, b, own, state.shapes.get(b), state.writer[b])
        _computes(name, b, own.get(b), state.actual.get(b), f"{state.writer[b]} computes")
    _tops(name, op["tops"], own, state, is_input)
    if is_input:
        for t in op["tops"]:
            state.writer[t] = f"op {name!r}"
        return
    tops = [own.get(t) for t in op["tops"]]
    bottoms = [state.actual.get(b) or _batch1(own.get(b, state.shapes.get(b)))
               for b in op["bottoms"]]
    outs = _Op(ctx, op, bottoms, tops).check()
    for k, (t, s) in enumerate(zip(op["tops"], tops, strict=True)):
        computed = outs[k] if outs is not None and k < len(outs) else None
        if computed is not None and _known(list(computed)) >= MAX_ELEMENTS:
            raise PlanError(name, f"shapes.{t}", f"this op computes {list(computed)}: "
                            "2^31 values or more")
        _computes(name, t, s, computed, "this op computes")
        state.writer[t] = f"op {name!r}"
        state.actual[t] = computed if computed is not None else _batch1(s)
        state.shapes[t] = s
        state.total += _known(list(state.actual[t] or ())) or _known(s)
        if state.total >= MAX_ELEMENTS:
            raise PlanError(name, f"shapes.{t}", f"the plan's blobs hold {state.total} values "
                            f"in all up to here, 2^{MAX_ELEMENTS.bit_length() - 1} or more")


def _batch1(shape: list | None) -> tuple | None:
    """A recorded shape as the array run computes (batch 1), if every dimension is known."""
    if shape is None or not shape or None in shape:
        return None
    return (1, *shape[1:])


def _computes(name: str, blob: str, recorded: list | None, computed: tuple | None,
              who: str) -> None:
    """The recorded shape is the computed one (batch aside; trailing 1s aside: an N,C blob
    of Caffe's is an MPS image of 1 x 1 pixels)."""
    if recorded is None or computed is None:
        return
    a, b = list(recorded[1:]), list(computed[1:])
    while a and a[-1] == 1:
        a.pop()
    while b and b[-1] == 1:
        b.pop()
    if len(a) != len(b) or any(x is not None and y is not None and x != y
                               for x, y in zip(a, b, strict=True)):
        raise PlanError(name, f"shapes.{blob}", f"{recorded} is not the {list(computed)} "
                        f"{who}")


def _tops(name: str, tops: list, own: dict, state: _State, is_input: bool) -> None:
    seen: set[str] = set()
    for t in tops:
        if t in seen:
            raise PlanError(name, "tops", f"{t!r} twice")
        seen.add(t)
        if is_input:
            if t not in state.inputs:
                raise PlanError(name, "tops", f"input {t!r} is not in the manifest's inputs")
            _agree(name, t, own, state.inputs[t], "the manifest's inputs")
        elif t in state.writer:
            raise PlanError(name, "tops", f"{t!r} is already written by {state.writer[t]}")


def _object(manifest: dict, key: str, where: Path) -> dict:
    v = manifest.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise Caffe2MetalError(f"{key}: is not an object", file=where)
    return v


def _inputs(manifest: dict, where: Path) -> dict[str, list]:
    """The manifest's inputs (``default_feed`` allocates them): name -> positive dims."""
    rows = manifest.get("inputs", [])
    if not isinstance(rows, list):
        raise Caffe2MetalError("inputs: is not a list", file=where)
    found: dict[str, list] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise Caffe2MetalError(f"inputs[{i}]: is not an object with a string name",
                                   file=where)
        try:
            shape = _shape(row.get("shape"), unknown=False, low=1)
        except ValueError as e:
            raise Caffe2MetalError(f"inputs[{i}] {row['name']!r}: shape: {e}",
                                   file=where) from None
        if not shape:
            raise Caffe2MetalError(f"inputs[{i}] {row['name']!r}: shape: is empty", file=where)
        if row["name"] in found:
            raise Caffe2MetalError(f"inputs[{i}] {row['name']!r}: name: listed twice",
                                   file=where)
        found[row["name"]] = shape
    return found


def _entries(manifest: dict, where: Path) -> dict[str, dict]:
    rows = manifest.get("layers", [])
    if not isinstance(rows, list):
        raise Caffe2MetalError("layers: is not a list", file=where)
    entries = {}
    for i, e in enumerate(rows):
        if isinstance(e, dict):
            if not isinstance(e.get("name"), str):
                raise Caffe2MetalError(f"layers[{i}].name: is not a string", file=where)
            entries[e["name"]] = e
    return entries


def _shape(value, unknown: bool = True, low: int = 0) -> list:
    """``value`` as a list of dims (``None`` unknown when ``unknown``); ValueError why not."""
    if not isinstance(value, list):
        raise ValueError(f"{_short(value)} is not a list of dimensions")
    if len(value) > MAX_DIMS:
        raise ValueError(f"{len(value)} dimensions, more than {MAX_DIMS}")
    for d in value:
        if d is None and unknown:
            continue
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"dimension {_short(d)} is not an integer")
        if d < low:
            raise ValueError(f"dimension {d} is less than {low}")
    n = _known(value)
    if n >= MAX_ELEMENTS:
        raise ValueError(f"{_short(value)} holds {n} values, 2^31 or more")
    return value


def _known(shape: list | None) -> int:
    return 0 if shape is None else math.prod(d for d in shape if d is not None)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _own_shapes(op: dict) -> dict[str, list | None]:
    rec = op.get("shapes", {})
    if not isinstance(rec, dict):
        raise PlanError(op["name"], "shapes", "is not an object")
    own: dict[str, list | None] = {}
    for blob, s in rec.items():
        if s is None:
            own[blob] = None
            continue
        try:
            own[blob] = _shape(s)
        except ValueError as e:
            raise PlanError(op["name"], f"shapes.{blob}", str(e)) from None
    return own


def _agree(name: str, blob: str, own: dict, theirs: list | None, writer: str) -> None:
    mine = own.get(blob)
    if mine is None or theirs is None:
        return
    if len(mine) != len(theirs) or any(a is not None and b is not None and a != b
                                       for a, b in zip(mine, theirs, strict=True)):
        raise PlanError(name, f"shapes.{blob}", f"{mine} disagrees with {theirs} recorded by "
                        f"{writer}")


class _Context:
    def __init__(self, out: Path, entries: dict, ssd: dict):
        self.out, self.entries, self.ssd = out, entries, ssd


class _Op:
    """One op's kind-specific checks: ``bottoms`` are the shapes of the arrays it reads
    (tuples, batch 1, or None), ``tops`` the recorded shapes of its tops (or None).
    ``check`` returns the shapes of the arrays it computes."""

    def __init__(self, ctx: _Context, op: dict, bottoms: list, tops: list):
        self.ctx, self.op, self.name = ctx, op, op["name"]
        self.bottoms, self.tops = bottoms, tops

    def fail(self, field: str, message: str) -> NoReturn:
        raise PlanError(self.name, field, message)

    # ---------------------------------------------------------------- helpers

    def need_bottoms(self, n: int, field: str = "bottoms") -> None:
        if len(self.bottoms) < n:
            self.fail(field, f"{len(self.bottoms)} bottoms, this op reads {n}")

    def nchw(self, i: int = 0, top: bool = False) -> tuple:
        """A bottom's array as an MPS image (4-D), or a top's recorded shape as one (an N,C
        blob is an image of 1 x 1 pixels); every dimension known."""
        blobs = self.op["tops"] if top else self.op["bottoms"]
        if i >= len(blobs):
            self.fail("tops" if top else "bottoms", f"{len(blobs)} {'tops' if top else 'bottoms'}"
                      f", this op {'writes' if top else 'reads'} {i + 1}")
        s = (self.tops if top else self.bottoms)[i]
        if s is None or not (2 <= len(s) <= 4 if top else len(s) == 4) or None in s:
            self.fail(f"shapes.{blobs[i]}", f"{s!r} is not a known N,C,H,W shape (an MPS "
                      "image)")
        return (*s, *(1,) * (4 - len(s)))

    def integer(self, v, field: str, low: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(field, f"{_short(v)} is not an integer")
        if low is not None and v < low:
            self.fail(field, f"{v} is less than {low}")
        return v

    def number(self, v, field: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            self.fail(field, f"{_short(v)} is not a finite number")
        return float(v)

    def axis(self, v, ndim: int, field: str) -> int:
        v = self.integer(v, field)
        if not -ndim <= v < ndim:
            self.fail(field, f"{v} is not an axis of a {ndim}-D blob")
        return v

    def file(self, spec, field: str) -> list:
        """A file spec's shape after checking what ``_array`` relies on, without reading."""
        if not isinstance(spec, dict):
            self.fail(field, f"{_short(spec)} is not a file object")
        rel = spec.get("file")
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            self.fail(f"{field}.file", f"{_short(rel)} is not a file name")
        path = Path(rel)
        if path.is_absolute() or ".." in path.parts:
            self.fail(f"{field}.file", f"{rel!r} leaves the output directory")
        dtype = spec.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            self.fail(f"{field}.dtype", f"unknown dtype {_short(dtype)}")
        try:
            shape = _shape(spec.get("shape", []), unknown=False)
        except ValueError as e:
            self.fail(f"{field}.shape", str(e))
        try:
            st = (self.ctx.out / path).stat()
        except (OSError, ValueError) as e:
            self.fail(f"{field}.file", f"cannot read {rel}: "
                      f"{getattr(e, 'strerror', None) or e}")
        size = math.prod(shape) * DTYPES[dtype]
        if not (self.ctx.out / path).is_file():
            self.fail(f"{field}.file", f"{rel} is not a regular file")
        if st.st_size != size:
            self.fail(f"{field}.file", f"{rel} has {st.st_size} bytes, not {shape} {dtype} "
                      f"({size} bytes): missing or short")
        return shape

    def scratch(self, elements: int, field: str, what: str) -> None:
        joined = sum(_known(s) for s in (*self.bottoms[:1], *self.tops[:1]))
        limit = max(16 * joined, MIN_SCRATCH)
        if elements > limit:
            self.fail(field, f"{what} holds {elements} values, more than {limit} (16 times "
                      "the source and destination): an absurd geometry")

    # ---------------------------------------------------------------- kinds

    def check(self) -> list | None:
        """Raise for the first problem; the shapes of the arrays the op computes, one per
        top (None: only the data knows)."""
        op = self.op
        m, app = op.get("mps"), op.get("app")
        if "mps" in op and not isinstance(m, dict):
            self.fail("mps", f"{_short(m)} is not an object")
        if isinstance(m, dict):
            kernel = m.get("kernel")
            if "entry" in m:
                return [self.weighted(m)]
            if kernel in ("MPSCNNPoolingMax", "MPSCNNPoolingAverage"):
                return [self.pooling(m)]
            if kernel == "destinationFeatureChannelOffset":
                return [self.concat_channels(m)]
            if isinstance(kernel, str) and kernel.startswith("MPSCNNNeuron"):
                self.neuron(m, kernel)
                return [self.bottoms[0]] * len(self.tops)
            if kernel == "MPSCNNSoftMax":
                self.need_bottoms(1)
                return [self.bottoms[0]]
            if kernel in ("MPSCNNAdd", "MPSCNNMultiply"):
                self.eltwise(m, kernel)
                return [self.bottoms[0]]
            if app is None:
                self.fail("mps.kernel", f"{_short(kernel)} is not a kernel run executes")
        if not isinstance(app, dict):
            self.fail("app", "an op needs mps or app (an object)")
        return self.app(app)

    def geometry(self, m: dict, dilation: bool) -> tuple:
        def pair(key: str, low: int | None) -> tuple:
            v = m.get(key)
            if not isinstance(v, dict):
                self.fail(f"mps.{key}", f"{_short(v)} is not an object with x and y")
            return tuple(self.integer(v.get(a), f"mps.{key}.{a}", low) for a in "yx")
        k, s = pair("kernelSize", 1), pair("stride", 1)
        d = pair("dilation", 1) if dilation else (1, 1)
        o = pair("offset", None)
        dst = m.get("destination")
        if not isinstance(dst, dict):
            self.fail("mps.destination", f"{_short(dst)} is not an object")
        out = tuple(self.integer(dst.get(a), f"mps.destination.{a}", 1)
                    for a in ("height", "width"))
        src, top = self.nchw(0), self.nchw(0, top=True)
        if out != top[2:]:
            self.fail("mps.destination", f"{out[0]}x{out[1]} is not the top's {top[2]}x"
                      f"{top[3]}")
        if "featureChannels" in dst and dst["featureChannels"] != top[1]:
            self.fail("mps.destination.featureChannels", f"{_short(dst['featureChannels'])} "
                      f"is not the top's {top[1]} channels")
        padded = src[1]
        worst, field = 0.0, "mps.stride"
        for axis, a in enumerate("yx"):
            size, extent = src[2 + axis], d[axis] * (k[axis] - 1) + 1
            if abs(o[axis]) > size + extent:
                self.fail(f"mps.offset.{a}", f"{o[axis]} is beyond the {size}-pixel source "
                          f"and the {extent}-pixel kernel")
            need = (out[axis] - 1) * s[axis] + extent
            before = max(0, -window_start(o[axis], k[axis], d[axis]))
            span = max(need, before + size)
            padded *= span
            if span / max(size, 1) > worst:
                worst = span / max(size, 1)
                field = (f"mps.kernelSize.{a}" if extent * 2 >= need and d[axis] == 1 else
                         f"mps.dilation.{a}" if extent * 2 >= need else f"mps.stride.{a}")
        self.scratch(padded, field, "the padded source")
        return k, s, d, o, out, src, top

    def weighted(self, m: dict) -> tuple:
        self.need_bottoms(1)
        entry_name = m["entry"]
        entry = self.ctx.entries.get(entry_name) if isinstance(entry_name, str) else None
        if entry is None:
            self.fail("mps.entry", f"{_short(entry_name)} is not in the manifest's layers")
        w = self.file(entry.get("weights"), "weights")
        b = self.file(entry.get("bias"), "bias")
        kind = m.get("kind")
        if kind in ("convolution", "depthwise_convolution"):
            k, _, _, _, out, src, top = self.geometry(m, dilation=True)
            depthwise = kind == "depthwise_convolution"
            if len(w) != (3 if depthwise else 4):
                layout = "[C][kH][kW]" if depthwise else "[out][kH][kW][in/groups]"
                self.fail("weights.shape", f"{w} is not {layout}")
            if tuple(w[1:3]) != k:
                self.fail("mps.kernelSize", f"{list(k)} does not match the weights' {w[1:3]}")
            groups = src[1] if depthwise else self.integer(m.get("groups"), "mps.groups", 1)
            per_group = 1 if depthwise else w[3]
            if src[1] % groups or w[0] % groups or src[1] // groups != per_group:
                self.fail("mps.groups", f"{groups} groups: weights {w} for {src[1]} input "
                          "channels")
            if w[0] != top[1]:
                self.fail("weights.shape", f"{w[0]} outputs for the top's {top[1]} channels")
            if math.prod(b) != w[0]:
                self.fail("bias.shape", f"{b} for {w[0]} outputs")
            return (1, w[0], *out)
        if not isinstance(kind, str) or kind not in KINDS:
            self.fail("mps.kind", f"unknown kind {_short(kind)}")
        src = self.nchw(0)
        if kind == "fully_connected":
            if len(w) != 4 or tuple(w[1:]) != (src[2], src[3], src[1]):
                self.fail("weights.shape", f"{w} is not [out][H][W][C] of the source "
                          f"{list(src)}")
            if math.prod(b) != w[0]:
                self.fail("bias.shape", f"{b} for {w[0]} outputs")
            return (1, w[0], 1, 1)
        if kind == "channel_affine":
            if math.prod(w) != src[1] or math.prod(b) != src[1]:
                self.fail("weights.shape", f"{w} and {b} for {src[1]} channels")
            return src
        return self.transpose_geometry(entry, w, b, src)

    def transpose_geometry(self, entry: dict, w: list, b: list, src: tuple) -> tuple:
        if len(w) != 4:
            self.fail("weights.shape", f"{w} is not [out][kH][kW][in/groups]")
        for key, low in (("stride", 1), ("pad", 0), ("dilation", 1)):
            v = entry.get(key)
            if not isinstance(v, list) or len(v) != 2:
                self.fail(f"mps.entry.{key}", f"{_short(v)} is not two integers")
            for x in v:
                self.integer(x, f"mps.entry.{key}", low)
        groups = self.integer(entry.get("groups"), "mps.entry.groups", 1)
        if src[1] % groups or w[0] % groups or src[1] // groups != w[3]:
            self.fail("mps.entry.groups", f"{groups} groups: weights {w} for {src[1]} input "
                      "channels")
        (sh, sw), (ph, pw), (dh, dw) = entry["stride"], entry["pad"], entry["dilation"]
        oh = sh * (src[2] - 1) + dh * (w[1] - 1) + 1 - 2 * ph
        ow = sw * (src[3] - 1) + dw * (w[2] - 1) + 1 - 2 * pw
        if oh <= 0 or ow <= 0:
            self.fail("mps.entry.pad", f"an empty {oh}x{ow} output")
        zh = sh * (src[2] - 1) + 1 + 2 * max(0, dh * (w[1] - 1) - ph)
        zw = sw * (src[3] - 1) + 1 + 2 * max(0, dw * (w[2] - 1) - pw)
        self.scratch(zh * zw * src[1], "mps.entry.stride", "the zero-inserted source")
        if math.prod(b) != w[0]:
            self.fail("bias.shape", f"{b} for {w[0]} outputs")
        return (1, w[0], oh, ow)

    def pooling(self, m: dict) -> tuple:
        self.need_bottoms(1)
        _, _, _, _, out, src, _ = self.geometry(m, dilation=False)
        if m.get("edgeMode") != "clamp":
            self.fail("mps.edgeMode", f"{_short(m.get('edgeMode'))}: Caffe's pooling ignores "
                      "pixels outside the image (clamp)")
        if m["kernel"] == "MPSCNNPoolingAverage":
            for key in ("zeroPadSizeY", "zeroPadSizeX"):
                self.integer(m.get(key), f"mps.{key}", 0)
        return (1, src[1], *out)

    def neuron(self, m: dict, kernel: str) -> None:
        self.need_bottoms(1)
        if kernel == "MPSCNNNeuronPReLU":
            slopes = self.file(m.get("slopes"), "mps.slopes")
            src = self.bottoms[0]
            c = src[1] if src is not None and len(src) > 1 else None
            n = math.prod(slopes)
            if c is not None and n not in ((1,) if m.get("channelShared") else (c,)):
                self.fail("mps.slopes", f"{n} slopes for {c} channels")
            return
        if m.get("neuronType") not in NEURONS:
            self.fail("mps.neuronType", f"{_short(m.get('neuronType'))} is not a neuron run "
                      "knows")
        for key in "abc":
            if key in m:
                self.number(m[key], f"mps.{key}")

    def eltwise(self, m: dict, kernel: str) -> None:
        self.need_bottoms(1)
        self.same_bottoms("bottoms")
        if kernel == "MPSCNNAdd":
            self.number(m.get("primaryScale", 1.0), "mps.primaryScale")
            rest = m.get("secondaryScale", [])
            if not isinstance(rest, list) or len(rest) + 1 != len(self.bottoms):
                self.fail("mps.secondaryScale", f"{_short(rest)}: not {len(self.bottoms) - 1} "
                          "scales")
            for c in rest:
                self.number(c, "mps.secondaryScale")

    def same_bottoms(self, field: str, skip_axis: int | None = None) -> None:
        """Every bottom's recorded shape is the first's (but along ``skip_axis``)."""
        first = self.bottoms[0]
        for blob, s in zip(self.op["bottoms"], self.bottoms, strict=True):
            if first is None or s is None:
                continue
            pairs = enumerate(zip(s, first, strict=False))
            if len(s) != len(first) or any(i != skip_axis and a is not None and b is not None
                                           and a != b for i, (a, b) in pairs):
                self.fail(field if skip_axis is not None else f"shapes.{blob}",
                          f"{s} does not line up with the first bottom's {first}")

    def concat_channels(self, m: dict) -> tuple:
        self.need_bottoms(1)
        srcs = [self.nchw(i) for i in range(len(self.bottoms))]
        if any(s[2:] != srcs[0][2:] for s in srcs):
            self.fail("bottoms", "the sources' heights and widths differ")
        offsets = m.get("destinationFeatureChannelOffsets")
        if not isinstance(offsets, list) or len(offsets) != len(srcs):
            self.fail("mps.destinationFeatureChannelOffsets", f"expected {len(srcs)} offsets")
        room = sum(slices(s[1]) for s in srcs) * SLICE
        for o, s in zip(offsets, srcs, strict=True):
            o = self.integer(o, "mps.destinationFeatureChannelOffsets", 0)
            if o % SLICE or o + s[1] > room:
                self.fail("mps.destinationFeatureChannelOffsets", f"{o} is not a multiple of "
                          f"4 within the {room} channels of the sources' slices")
        return (1, sum(s[1] for s in srcs), *srcs[0][2:])

    # ---------------------------------------------------------------- app ops

    def app(self, app: dict) -> list | None:
        kind = app.get("op")
        if not isinstance(kind, str):
            self.fail("app.op", f"{_short(kind)} is not a string")
        if kind == "unavailable":
            self.fail("app.reason", str(app.get("reason")))
        if kind == "none":
            return []
        if kind == "constant":
            return [self.constant(app)]
        self.need_bottoms(1)
        first = self.bottoms[0]
        if kind in ("identity", "input"):
            return [first] * len(self.tops)
        if kind == "detection_output":
            self.need_bottoms(3)
            if not isinstance(app.get("params"), dict):
                self.fail("app.params", "is not an object")
            return None
        if kind == "slice":
            return self.slice(app, first)
        check = self._APP.get(kind)
        if check is not None:
            return [check(self, app, first)]
        if kind in APP_OPS:
            return [first]
        return self.fork(app)

    def reshape(self, app: dict, first: tuple | None) -> tuple:
        top = self.tops[0] if self.tops else None
        if top is None or None in top:
            self.fail(f"shapes.{self.op['tops'][0] if self.tops else '?'}",
                      "is not a known shape")
        if first is not None and None not in first and \
                math.prod(first[1:]) != math.prod(top[1:]):
            self.fail(f"shapes.{self.op['tops'][0]}", f"{top} does not hold the "
                      f"{list(first)} bottom's values")
        return (1, *top[1:])

    def transpose(self, app: dict, first: tuple | None) -> tuple | None:
        order = app.get("order")
        ndim = None if first is None else len(first)
        if not isinstance(order, list) or not all(
                isinstance(a, int) and not isinstance(a, bool) for a in order) or \
                sorted(order) != list(range(len(order))) or \
                (ndim is not None and len(order) != ndim):
            self.fail("app.order", f"{_short(order)} is not a permutation of the bottom's "
                      f"{ndim} axes")
        return None if first is None else tuple(first[a] for a in order)

    def concat(self, app: dict, first: tuple | None) -> tuple | None:
        if first is None or any(s is None for s in self.bottoms):
            self.fail(f"shapes.{self.op['bottoms'][0]}", "concat of an unknown shape")
        axis = self.axis(app.get("axis", 1), len(first), "app.axis") % len(first)
        self.same_bottoms("app.axis", axis)
        return (*first[:axis], sum(s[axis] for s in self.bottoms), *first[axis + 1:])

    def softmax(self, app: dict, first: tuple | None) -> tuple | None:
        self.axis(app.get("axis", 1), len(first) if first else 1, "app.axis")
        return first

    def clip(self, app: dict, first: tuple | None) -> tuple | None:
        self.number(app.get("min"), "app.min")
        self.number(app.get("max"), "app.max")
        return first

    def maximum(self, app: dict, first: tuple | None) -> tuple | None:
        self.same_bottoms("bottoms")
        return first

    def scale_by(self, app: dict, first: tuple | None) -> tuple | None:
        self.need_bottoms(2)
        self.integer(app.get("axis"), "app.axis", 0)
        return first

    def normalize(self, app: dict, first: tuple | None) -> tuple | None:
        self.file(app.get("scale"), "app.scale")
        return first

    def constant(self, app: dict) -> tuple | None:
        priors = self.file(self.ctx.ssd.get("priors"), "ssd.priors")
        if math.prod(priors) % 2:
            self.fail("ssd.priors.shape", f"{priors} is not two rows")
        cols = app.get("columns", [0, -1])
        if not isinstance(cols, list) or len(cols) != 2:
            self.fail("app.columns", f"{_short(cols)} is not [start, count]")
        for c in cols:
            self.integer(c, "app.columns")
        return (1, 2, cols[1]) if cols[1] > 0 else None

    def slice(self, app: dict, first: tuple | None) -> list:
        if first is None:
            self.fail(f"shapes.{self.op['bottoms'][0]}", "is not a known shape")
        axis = self.axis(app.get("axis"), len(first), "app.axis")
        starts, sizes = app.get("starts"), app.get("sizes")
        if not isinstance(starts, list) or not isinstance(sizes, list) or \
                len(starts) != len(sizes) or len(sizes) != len(self.tops):
            self.fail("app.starts", f"need one start and one size per top ({len(self.tops)})")
        dim = first[axis]
        outs = []
        for s, n in zip(starts, sizes, strict=True):
            s, n = self.integer(s, "app.starts", 0), self.integer(n, "app.sizes", 0)
            if dim is not None and s + n > dim:
                self.fail("app.sizes", f"[{s}, {s}+{n}) is outside the bottom's {dim}")
            outs.append((*first[:axis], n, *first[axis + 1:]))
        return outs

    def lrn(self, app: dict, first: tuple | None) -> tuple | None:
        n = self.integer(app.get("local_size"), "app.local_size", 1)
        for key in ("alpha", "beta"):
            self.number(app.get(key), f"app.{key}")
        self.number(app.get("k", 1.0), "app.k")
        within = app.get("norm_region", "ACROSS_CHANNELS") != "ACROSS_CHANNELS"
        if first is not None and None not in first:
            if within and len(first) != 4:
                self.fail("app.norm_region", f"WITHIN_CHANNEL needs an N,C,H,W bottom, not "
                          f"{first}")
            reach = max(first[2:4]) if within else (first[1] if len(first) > 1 else 1)
            if n > 2 * reach + 1:
                self.fail("app.local_size", f"{n} is wider than twice the bottom's {reach}")
        return first

    def fork(self, app: dict) -> list | None:
        """A type with a numpy forward: what its shape rule makes of the bottoms (the
        forward computes that)."""
        caffe_type = app.get("caffe_type")
        if not isinstance(caffe_type, str) or registry.forward(caffe_type) is None:
            self.fail("app.op", f"{_short(app.get('op'))} has no numpy implementation in run")
        params = app.get("params")
        if not isinstance(params, dict):
            self.fail("app.params", "is not an object")
        spec = registry.get(caffe_type)
        if spec is None or spec.shape is None or any(s is None for s in self.bottoms):
            return None
        layer = Layer(name=self.name, type=caffe_type, bottoms=list(self.op["bottoms"]),
                      tops=list(self.op["tops"]), params=params)
        try:
            tops, _ = spec.shape(layer, list(self.bottoms))
        except registry.Unknown:
            return None
        except Exception as e:      # noqa: BLE001  any parameter a shape rule cannot use
            self.fail("app.params", f"{type(e).__name__}: {e}")
        return [None if t is None or None in t else tuple(t) for t in tops]

    _APP = {"reshape": reshape, "transpose": transpose, "concat": concat, "softmax": softmax,
            "clip": clip, "max": maximum, "scale_by": scale_by, "lrn": lrn,
            "normalize": normalize}
    """App ops of one top with parameters to check (``identity`` has none)."""
