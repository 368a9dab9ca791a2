"""`caffe2metal verify` and `caffe2metal compare`: prove what `convert` wrote.

verify, layer by layer
    The original model runs once in OpenCV (fusion off) on one input: the
    ``--image`` (``cv2.imread``, resized to the declared input size, float32
    NCHW, BGR, no mean subtraction) or a deterministic uniform [-1, 1) input.
    For every entry of ``manifest.json``'s ``layers`` the weights and bias are
    read back from OUT (dtype, shape from the manifest; size and sha256
    checked) and the layer is recomputed with the numpy model of MPS
    (``mps.py``, NHWC, float64 accumulation) on the original layer's input
    activation.  That activation is the output of the layer that wrote the
    bottom's value: the graph's unique blob names say which layer that is, so
    in-place chains (conv -> BatchNorm -> Scale -> ReLU on one blob) are read
    at the right step.  The reference is the original output after the folded
    BatchNorm/Scale (the last folded layer's output, or the layer's own).
    ``priors.dat`` is compared with OpenCV's PriorBox Concat output.

verify, end to end
    Every net output of the original model against the merged Caffe model in
    OUT, both in OpenCV with fusion off.

Measure and tolerance
    rel = max |diff| / max |ref| per layer (per output).
    * float32 weights: 1e-4 (measured: <= 1.2e-5, mostly ~3e-7; the largest
      values come from OpenCV's Winograd 3x3 convolutions).
    * float16 weights: 2e-3.  Rounding a weight to half changes it by at most
      2^-11 = 4.9e-4 relative.  An output sums K such errors with random
      signs, ~2^-11/sqrt(3) * ||w*x|| against outputs of ~||w*x||, so the
      worst element of a layer sits near 2^-11 of the layer's largest output
      (a worst-case bound, 2^-11 * sum |w*x|, grows ~sqrt(K) times larger but
      needs every rounding to go the same way).  Measured on the built-in
      example: 8e-5..5.1e-4 per layer; on 13 real architectures with
      synthetic weights: at most 6.3e-4.  2e-3 (4 x 2^-11) leaves 3x headroom
      over everything measured, while one weight off by 0.25 in one 1x1
      convolution of the example gives 1.8e-2.
      This models the weight files only: MPS also keeps activations in float16
      on the GPU, which a device test must allow for separately.
    * end to end: 1e-4 (both models are float32); DetectionOutput 1e-3, as
      its box decoding exp(variance * loc) multiplies relative differences by
      |variance * loc| (up to 3.6e-4 measured, MobileNet-SSD at 160x160 with
      synthetic weights).
    Non-finite values (boxes decoded from huge synthetic loc values) must
    match exactly and are left out of max |ref|.

When OpenCV is wrong
    OpenCV 4.x computes some layers against Caffe's definition: a 3x3
    depthwise convolution on a map one pixel wide (reading uninitialised
    memory), InnerProduct with ``transpose: true``, Deconvolution with
    dilation.  When a layer disagrees with OpenCV, verify recomputes Caffe's
    definition in plain numpy from the original blobs (``caffe_reference``).
    Files that match it while OpenCV does not pass, with a note naming the
    OpenCV defect; rows and outputs downstream that then disagree with OpenCV
    are shown but not counted.  A wrong file fails against both.
    OpenCV keeps a requested output alive only for a layer's first top (an
    in-place layer may overwrite a Slice's second top), so those are read in
    a forward pass of their own that stops at their layer.

compare
    Max |A - B| of every weights/bias file present in both directories
    (matched by file name, in DIR or DIR/metal), and the files found in only
    one.  dtype from each directory's manifest.json when it lists the file,
    otherwise float32.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import fold
from .. import mps
from ..errors import Caffe2MetalError
from ..net.reader import read_model, read_prototxt
from ..example.weights import opencv_text

TOLERANCE = {"float32": 1e-4, "float16": 2e-3}
END_TO_END_TOLERANCE = {"": 1e-4, "DetectionOutput": 1e-3}
_NP_DTYPES = {"float32": "<f4", "float16": "<f2"}


@dataclass
class Row:
    name: str
    kind: str
    shape: tuple
    max_ref: float = float("nan")
    max_diff: float = float("nan")
    rel: float = float("nan")
    tolerance: float = float("nan")
    ok: bool = False
    note: str = ""
    counted: bool = True           # False: shown, but not part of the verdict


@dataclass
class Report:
    prototxt: str
    out: str
    input: str
    layers: list[Row] = field(default_factory=list)
    outputs: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.layers + self.outputs if r.counted)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.layers + self.outputs if r.counted and not r.ok]


# ---------------------------------------------------------------- manifest and files

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
    if manifest.get("version") != 1:
        raise Caffe2MetalError(f"manifest version {manifest.get('version')!r} is not supported "
                               "(this caffe2metal reads version 1)", file=path)
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


# ---------------------------------------------------------------- OpenCV

def _opencv(prototxt_text: str, caffemodel: Path):
    import cv2
    from ..example.weights import opencv_net
    try:
        return opencv_net(prototxt_text, Path(caffemodel).read_bytes(), fusion=False)
    except cv2.error as e:
        raise Caffe2MetalError(f"OpenCV cannot load this model: {_cv_message(e)}",
                               file=caffemodel) from None
    except OSError as e:
        raise Caffe2MetalError(f"cannot read: {e.strerror}", file=caffemodel) from None


def _cv_message(e) -> str:
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    return lines[-1].split(") ", 1)[-1] if lines else str(e)


def _cv_pins(graph, net, drop=()) -> dict[tuple[int, int], tuple[str, int]]:
    """(id(layer), top index) -> (OpenCV layer name, output index).

    OpenCV's Caffe importer names a layer as the file does, with ``_1``,
    ``_2``, ... appended to repeated names, except ``Convolution``: one OpenCV
    layer per top, named after that top (blob) name.
    """
    seen: dict[str, int] = {}
    pins = {}
    for layer in graph.layers:
        k = seen.get(layer.name, 0)
        seen[layer.name] = k + 1
        for i, top in enumerate(layer.tops):
            if layer.type == "Convolution":
                pins[(id(layer), i)] = (graph.blob_names.get(top, top), 0)
            else:
                pins[(id(layer), i)] = (layer.name if k == 0 else f"{layer.name}_{k}", i)
    have = set(net.getLayerNames())
    missing = [pins[(id(l), 0)][0] for l in graph.layers if l.type != "Input" and
               l.type not in drop and l.tops and pins[(id(l), 0)][0] not in have]
    if missing:
        raise Caffe2MetalError(f"OpenCV's net has no layer {missing[0]!r}: its layer list does not "
                               "match this prototxt", file=graph.source)
    return pins


def _forward(graph, net, feed: dict, blobs: set[str], drop=()) -> dict[str, np.ndarray]:
    """The value of each unique blob in ``blobs`` after one OpenCV forward pass.

    OpenCV keeps the requested outputs of a layer alive only for its first
    output: a later in-place layer may overwrite the second output of a
    Slice.  So blobs at output index > 0 are read in a pass of their own that
    stops at their layer.
    """
    import cv2
    pins = _cv_pins(graph, net, drop)
    producers = graph.producers()
    where, first, later = {}, [], []
    for b in blobs:
        layer = producers.get(b)
        if layer is None or layer.type == "Input":
            continue
        n, i = pins[(id(layer), layer.tops.index(b))]
        where[b] = (n, i)
        group = first if i == 0 else later
        if n not in group:
            group.append(n)

    def run(names):
        for name, x in feed.items():
            net.setInput(x, name)
        try:
            return [[np.array(o, np.float32) for o in outs]
                    for outs in net.forwardAndRetrieve(names)]
        except cv2.error as e:
            raise Caffe2MetalError(f"OpenCV cannot run this model: {_cv_message(e)}",
                                   file=graph.source) from None

    by_layer = dict(zip(first, run(first))) if first else {}
    early = {n: run([n])[0] for n in later}
    values = {}
    for b in blobs:
        if b in where:
            n, i = where[b]
            values[b] = (by_layer if i == 0 else early)[n][i]
        else:
            values[b] = feed[graph.blob_names.get(b, b)]
    return values


def _net_inputs(model) -> dict[str, tuple]:
    g = model.graph
    shapes = {g.blob_names.get(b, b): s for b, s in g.inputs.items()}
    for layer in g.layers:
        if layer.type == "Input":
            shapes.update({g.blob_names.get(t, t): model.shapes.blobs[t] for t in layer.tops})
    return shapes


def make_inputs(model, image=None, seed: int = 0) -> tuple[dict, str]:
    """Batch-1 inputs for the net (file blob name -> float32 array) and a description."""
    rng = np.random.default_rng(seed)
    feed, described = {}, f"uniform [-1, 1) random, seed {seed}"
    image_used = image is None
    for name, shape in _net_inputs(model).items():
        if shape is None or any(d is None for d in shape):
            raise Caffe2MetalError(f"input '{name}' has no known shape", file=model.prototxt)
        shape = (1,) + tuple(shape[1:])
        if not image_used and len(shape) == 4:
            feed[name] = _load_image(image, shape)
            described = f"image {image} resized to {shape[3]}x{shape[2]}, BGR, no mean subtraction"
            image_used = True
        else:
            feed[name] = rng.uniform(-1, 1, shape).astype(np.float32)
    if not image_used:
        raise Caffe2MetalError("--image given, but the net has no 4-D (N,C,H,W) input",
                               file=model.prototxt)
    return feed, described


def _load_image(path, shape) -> np.ndarray:
    import cv2
    c, h, w = shape[1:]
    if c not in (1, 3):
        raise Caffe2MetalError(f"the net's input has {c} channels; --image needs 1 or 3", file=path)
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR)
    if img is None:
        raise Caffe2MetalError("cannot read this image (missing, or not a format OpenCV reads)",
                               file=path)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    img = img.reshape(h, w, c)
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


# ---------------------------------------------------------------- per-layer recompute

def _hwc(a: np.ndarray) -> np.ndarray:
    """Batch item 0 of an N,C,... activation, channels last, as [H][W][C]."""
    x = np.moveaxis(np.asarray(a)[0], 0, -1)
    if x.ndim == 1:
        return x.reshape(1, 1, -1)
    if x.ndim == 2:
        return x[None]
    if x.ndim == 3:
        return x
    raise ValueError(f"activation of shape {list(a.shape)} is not N,C / N,C,L / N,C,H,W")


def recompute(entry: dict, x: np.ndarray, out: Path) -> tuple[np.ndarray, bool]:
    """One manifest layer on the NCHW activation ``x``, from its files: [H][W][C] and sha ok."""
    w, w_ok = read_array(out, entry["weights"], entry["name"])
    b, b_ok = read_array(out, entry["bias"], entry["name"])
    xh = _hwc(x)
    geo = dict(stride=tuple(entry["stride"]), pad=tuple(entry["pad"]),
               dilation=tuple(entry["dilation"]))
    kind = entry["kind"]
    if kind == "convolution":
        y = mps.conv2d_nhwc(xh, w, b, groups=entry["groups"], **geo)
    elif kind == "depthwise_convolution":
        y = mps.depthwise_nhwc(xh, w, b, **geo)
    elif kind == "convolution_transpose":
        y = mps.conv_transpose_nhwc(xh, w, b, groups=entry["groups"], **geo)
    elif kind == "fully_connected":
        y = mps.fully_connected_nhwc(xh, w, b).reshape(1, 1, -1)
    elif kind == "channel_affine":
        y = mps.channel_affine_nhwc(xh, w, b)
    else:
        raise Caffe2MetalError(f"unknown layer kind {kind!r} in the manifest", layer=entry["name"])
    return y, w_ok and b_ok


def _measure(row: Row, ref: np.ndarray, got: np.ndarray, tolerance: float) -> Row:
    """Fill in max |ref|, max |diff|, rel; non-finite values must match exactly."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    row.tolerance = tolerance
    if ref.shape != got.shape:
        row.note = f"shape {list(got.shape)} != reference {list(ref.shape)}"
        row.ok = False
        return row
    finite = np.isfinite(ref)
    with np.errstate(invalid="ignore", over="ignore"):
        same_special = ~finite & ((ref == got) | (np.isnan(ref) & np.isnan(got)))
        diff = np.where(same_special, 0.0, np.abs(np.where(finite, got - ref, np.inf)))
    diff = np.where(np.isnan(diff), np.inf, diff)
    row.max_ref = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
    row.max_diff = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(row.max_diff):
        row.rel = math.inf
    elif row.max_ref > 0:
        row.rel = row.max_diff / row.max_ref
    else:
        row.rel = 0.0 if row.max_diff == 0 else math.inf
    row.ok = row.rel <= tolerance
    if (~finite).any():
        row.note = f"{int((~finite).sum())} non-finite reference value(s), matched exactly"
    return row


# ---------------------------------------------------------------- second opinion

def caffe_reference(graph, entry: dict, x: np.ndarray) -> np.ndarray:
    """A manifest layer computed the way Caffe defines it, from the ORIGINAL blobs.

    Plain float64 numpy in NCHW (batch item 0), independent of the export
    path: Convolution as a grouped correlation, Deconvolution as its
    scatter-add, InnerProduct as a matrix product, then the folded (or kept)
    BatchNorm/Scale chain as per-channel affines.  verify consults it only
    when OpenCV's output disagrees, to tell a wrong file from a wrong OpenCV.
    """
    from ..net.shapes import conv_geometry
    x = np.asarray(x, np.float64)[0]
    if entry["kind"] == "channel_affine":
        chain = [graph.layer(n) for n in entry["chain"]]
        y = x
    else:
        layer = graph.layer(entry["name"])
        chain = [graph.layer(n) for n in entry["folded"]]
        w = np.asarray(layer.blobs[0], np.float64)
        has_bias = len(layer.blobs) > 1
        if layer.type == "InnerProduct":
            p = layer.params.get("inner_product_param", {})
            w = w.reshape(w.shape[-2], w.shape[-1])
            w = w.T if p.get("transpose", False) else w
            y = w @ x.reshape(-1)
            if has_bias:
                y = y + np.asarray(layer.blobs[1], np.float64).reshape(-1)
        else:
            p = layer.params.get("convolution_param", {})
            geo = conv_geometry(p, 2)
            if layer.type == "ConvolutionDepthwise":
                group = x.shape[0]
            else:
                group = int(p.get("group", 1))
            bias = np.asarray(layer.blobs[1], np.float64).reshape(-1) if has_bias else None
            if layer.type == "Deconvolution":
                y = _caffe_deconv(x, w, bias, group, **geo)
            else:
                y = _caffe_conv(x, w, bias, group, **geo)
    if chain:
        k, c = fold.chain_affine(graph, chain)
        shape = (-1,) + (1,) * (y.ndim - 1)
        y = y * k.reshape(shape) + c.reshape(shape)
    return y[None]


def _caffe_conv(x, w, bias, group, kernel, stride, pad, dilation):
    """Caffe Convolution on x [C][H][W] with W [out][C/g][kH][kW] -> [out][H'][W']."""
    c, h, wd = x.shape
    out, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw))).reshape(group, cg, h + 2 * ph, wd + 2 * pw)
    wg = w.reshape(group, out // group, cg, kh, kw)
    y = np.zeros((group, out // group, ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                       j * dw:j * dw + sw * (wo - 1) + 1:sw]
            y += np.einsum("gchw,goc->gohw", patch, wg[:, :, :, i, j])
    y = y.reshape(out, ho, wo)
    return y if bias is None else y + bias[:, None, None]


def _caffe_deconv(x, w, bias, group, kernel, stride, pad, dilation):
    """Caffe Deconvolution on x [C][H][W] with W [C][out/g][kH][kW]: scatter-add, then crop pad."""
    c, h, wd = x.shape
    _, og, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    full_h, full_w = sh * (h - 1) + dh * (kh - 1) + 1, sw * (wd - 1) + dw * (kw - 1) + 1
    xg = x.reshape(group, c // group, h, wd)
    wg = w.reshape(group, c // group, og, kh, kw)
    y = np.zeros((group, og, full_h, full_w))
    for i in range(kh):
        for j in range(kw):
            y[:, :, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (wd - 1) + 1:sw] += \
                np.einsum("gchw,gco->gohw", xg, wg[:, :, :, i, j])
    y = y.reshape(group * og, full_h, full_w)[:, ph:full_h - ph, pw:full_w - pw]
    return y if bias is None else y + bias[:, None, None]


def _fmt_shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape is not None else "?"


def verify(prototxt, caffemodel, out, *, image=None, seed: int = 0) -> Report:
    out = Path(out)
    manifest = load_manifest(out)
    model = read_model(prototxt, caffemodel)
    graph = model.graph
    merged = fold.apply(graph, fold.plan(graph))
    by_name = {l.name: l for l in merged.layers}
    feed, described = make_inputs(model, image, seed)
    report = Report(prototxt=str(prototxt), out=str(out), input=described)

    jobs, needed = [], set()
    for entry in _entries(manifest, out):
        name = entry["name"]
        if entry.get("kind") == "channel_affine":
            chain = [_layer(graph, n, out) for n in entry.get("chain") or [name]]
            src, dst = chain[0].bottoms[0], chain[-1].tops[0]
        else:
            layer = by_name.get(name)
            if layer is None:
                raise Caffe2MetalError(f"the manifest lists layer {name!r}, which the folded "
                                       "model does not have (was OUT made from another model?)",
                                       file=out / "manifest.json")
            src, dst = layer.bottoms[0], layer.tops[0]
        jobs.append((entry, src, dst))
        needed.update((src, dst))
    ssd = manifest.get("ssd") or {}
    concat = graph.layer(ssd["priorbox_concat"]) if ssd.get("priorbox_concat") else None
    if concat is not None:
        needed.add(concat.tops[0])
    # a DetectionOutput the export found not to be SSD's (see metal._check_prior_counts)
    # cannot run in OpenCV either: check everything up to it
    drop = tuple({s["type"] for s in manifest.get("metal", {}).get("skipped", [])
                  if s["type"] == "DetectionOutput"})
    needed.update(_outputs(graph, drop))
    net = _opencv(opencv_text(model, drop), Path(model.caffemodel))
    values = _forward(graph, net, feed, needed, drop)
    del net
    # OpenCV computes a few layers wrongly (see _second_opinion); what follows such a layer
    # may read garbage, so rows downstream that disagree get no verdict
    defects: dict[str, str] = {}          # blob OpenCV computes wrongly -> its layer
    tainted: dict[str, str] = {}          # every blob computed from one of those -> that layer
    for entry, src, dst in jobs:
        row = _check_layer(entry, values[src], values[dst], out, graph)
        if row.note.endswith("(an OpenCV defect)"):
            if src in tainted:
                row.note = (f"vs numpy Caffe reference: OpenCV's output differs here, after "
                            f"'{tainted[src]}', which OpenCV computes wrongly")
            defects[dst] = tainted.get(src, entry["name"])
            tainted = _downstream(graph, defects, every_blob=True)
        elif not row.ok and src in tainted and row.note != _SHA_NOTE:
            row.counted = False
            row.note = (f"not counted: its input comes after '{tainted[src]}', which OpenCV "
                        "computes wrongly")
        report.layers.append(row)
    if concat is not None:
        report.layers.append(_check_priors(out, ssd, graph, values[concat.tops[0]]))

    report.outputs = _end_to_end(model, manifest, out, feed, values, drop)
    tainted = _downstream(graph, defects)
    for row in report.outputs:
        if row.name in tainted:
            row.counted = False
            row.note = (f"not counted: downstream of '{tainted[row.name]}', which OpenCV "
                        "computes wrongly (see above)")
    return report


_SHA_NOTE = "sha256 differs from the manifest"


def _check_layer(entry, x, ref, out, graph) -> Row:
    """One manifest layer from its files against OpenCV's output (and Caffe's, if they differ)."""
    row = Row(entry["name"], entry["kind"], ref.shape)
    tol = TOLERANCE.get(entry["weights"]["dtype"], TOLERANCE["float32"])
    try:
        got, sha_ok = recompute(entry, x, out)
    except ValueError as e:
        row.tolerance, row.note = tol, f"cannot recompute: {e}"
        return row
    _measure(row, _hwc(ref), got, tol)
    if not row.ok:
        _second_opinion(row, graph, entry, x, ref, got)
    if not sha_ok:
        row.ok, row.note = False, _SHA_NOTE
    return row


def _downstream(graph, defects: dict[str, str], every_blob: bool = False) -> dict[str, str]:
    """Blobs that depend on a blob in ``defects`` -> the defective layer: the net outputs
    by file name, or (``every_blob``) all of them by unique name."""
    users = graph.consumers()
    reached = dict(defects)
    todo = list(defects)
    while todo:
        blob = todo.pop()
        for layer in users.get(blob, []):
            for top in layer.tops:
                if top not in reached:
                    reached[top] = reached[blob]
                    todo.append(top)
    if every_blob:
        return reached
    return {graph.blob_names.get(b, b): reached[b] for b in graph.outputs() if b in reached}


def _second_opinion(row: Row, graph, entry, x, opencv_out, got) -> bool:
    """OpenCV disagrees with the files: ask Caffe's definition which of the two is wrong.

    True (and the row passes, with a note) when the files match Caffe's
    definition and OpenCV does not.
    """
    try:
        caffe_nchw = caffe_reference(graph, entry, x)
        caffe = _hwc(caffe_nchw)
    except (ValueError, KeyError, IndexError):
        return False
    check = _measure(Row(row.name, row.kind, row.shape), caffe, got, row.tolerance)
    opencv = _measure(Row(row.name, row.kind, row.shape), caffe, _hwc(opencv_out), row.tolerance)
    if check.ok and not opencv.ok:
        how = (f"has shape {_fmt_shape(opencv_out.shape)}" if opencv.note.startswith("shape")
               else f"is off by rel {opencv.rel:.3g}")
        row.max_ref, row.max_diff, row.rel, row.ok = check.max_ref, check.max_diff, check.rel, True
        row.shape = caffe_nchw.shape
        row.note = (f"vs numpy Caffe reference: OpenCV's output {how} here (an OpenCV defect)")
        return True
    return False


_ENTRY_KEYS = ("name", "kind", "weights", "bias", "stride", "pad", "dilation", "groups")
_FILE_KEYS = ("file", "dtype", "shape")


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


def _layer(graph, name, out):
    try:
        return graph.layer(name)
    except KeyError:
        raise Caffe2MetalError(f"the manifest names layer {name!r}, which the model does not "
                               "have", file=Path(out) / "manifest.json") from None


def _check_priors(out, ssd, graph, ref) -> Row:
    priors, sha_ok = read_array(out, ssd["priors"], "priors")
    row = Row("priors", "priors", ref.shape)
    _measure(row, ref[0], priors, TOLERANCE["float32"])
    if not sha_ok:
        row.ok, row.note = False, _SHA_NOTE
    boxes = [graph.layer(h["priorbox"]) for h in ssd.get("heads", [])]
    if any("clip" not in l.params.get("prior_box_param", {}) for l in boxes):
        row.counted = False
        row.note = "not counted: OpenCV clips when 'clip' is unset, Caffe does not"
    return row


def _outputs(graph, drop=()) -> list[str]:
    """The net's outputs, with the inputs of dropped layers standing in for theirs."""
    gone = [l for l in graph.layers if l.type in drop]
    tops = {t for l in gone for t in l.tops}
    return [b for b in graph.outputs() if b not in tops] + [b for l in gone for b in l.bottoms]


def _end_to_end(model, manifest, out, feed, v1, drop=()) -> list[Row]:
    merged_files = manifest.get("merged", {})
    proto, weights = out / merged_files["prototxt"], out / merged_files["caffemodel"]
    merged_model = read_prototxt(proto)
    g1, g2 = model.graph, merged_model.graph
    outs1 = {g1.blob_names.get(b, b): b for b in _outputs(g1, drop)}
    outs2 = {g2.blob_names.get(b, b): b for b in _outputs(g2, drop)}
    v2 = _forward(g2, _opencv(opencv_text(merged_model, drop), weights), feed,
                  set(outs2.values()), drop)
    rows = []
    for name, b in outs1.items():
        producer = g1.producers()[b]
        row = Row(name, producer.type, v1[b].shape)
        if name not in outs2:
            row.note = "not an output of the merged model"
            rows.append(row)
            continue
        tol = END_TO_END_TOLERANCE.get(producer.type, END_TO_END_TOLERANCE[""])
        rows.append(_measure(row, v1[b], v2[outs2[name]], tol))
    return rows


def render(report: Report) -> str:
    lines = [f"verify {report.out} against {report.prototxt}", f"input: {report.input}", ""]

    def table(title, rows):
        head = ("layer" if title == "layers" else "output", "kind", "shape", "max |ref|",
                "max |diff|", "rel", "")
        body = []
        for r in rows:
            status = "ok" if r.ok else ("-" if not r.counted else "FAIL")
            vals = (r.name, r.kind, _fmt_shape(r.shape), f"{r.max_ref:.4g}", f"{r.max_diff:.3g}",
                    f"{r.rel:.3g}", status + (f"  {r.note}" if r.note else ""))
            body.append(vals)
        widths = [max([len(head[i])] + [len(v[i]) for v in body]) for i in range(6)]
        out = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in
                         enumerate(zip(head, widths))).rstrip()]
        for v in body:
            out.append("  ".join([v[i].ljust(widths[i]) if i < 3 else v[i].rjust(widths[i])
                                  for i in range(6)] + [v[6]]).rstrip())
        return out

    if report.layers:
        lines += ["per layer: Metal files recomputed with the numpy MPS model vs the original "
                  "model in OpenCV"] + table("layers", report.layers) + [""]
    lines += ["end to end: original vs merged Caffe model (OpenCV, fusion off)"]
    lines += table("outputs", report.outputs) + [""]
    tols = sorted({r.tolerance for r in report.layers + report.outputs if r.counted
                   and not math.isnan(r.tolerance)})
    counted = [r for r in report.layers + report.outputs if r.counted and not math.isnan(r.rel)]
    worst = max(counted, key=lambda r: r.rel, default=None)
    summary = (f"{len(report.layers)} layer check(s), {len(report.outputs)} output(s); "
               f"tolerance rel <= {', '.join(f'{t:g}' for t in tols)}")
    if worst is not None:
        summary += f"; worst rel {worst.rel:.3g} ({worst.name})"
    lines.append(summary)
    if report.ok:
        lines.append("PASS")
    else:
        lines.append(f"FAIL: {len(report.failures)} above tolerance or unreadable: "
                     + ", ".join(r.name for r in report.failures[:10])
                     + (" ..." if len(report.failures) > 10 else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- compare

@dataclass
class Comparison:
    # (file, dtype A, dtype B, value count, max |A|, max |A - B|, note)
    rows: list[tuple] = field(default_factory=list)
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


def _file_specs(manifest):
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


def compare(dir_a, dir_b) -> Comparison:
    files_a, dtypes_a = _weight_files(Path(dir_a))
    files_b, dtypes_b = _weight_files(Path(dir_b))
    result = Comparison(only_a=sorted(set(files_a) - set(files_b)),
                        only_b=sorted(set(files_b) - set(files_a)))
    for name in sorted(set(files_a) & set(files_b)):
        da, db = dtypes_a.get(name, "float32"), dtypes_b.get(name, "float32")
        a, b = _values(files_a[name], da), _values(files_b[name], db)
        if isinstance(a, str) or isinstance(b, str):
            result.rows.append((name, da, db, None, None, None, a if isinstance(a, str) else b))
        elif a.size != b.size:
            result.rows.append((name, da, db, None, None, None,
                                f"{a.size} values vs {b.size}"))
        else:
            delta = float(np.abs(a - b).max()) if a.size else 0.0
            peak = float(np.abs(a).max()) if a.size else 0.0
            result.rows.append((name, da, db, a.size, peak, delta, ""))
    return result


def render_comparison(c: Comparison, dir_a, dir_b) -> str:
    head = ("file", "dtype A", "dtype B", "values", "max |A|", "max |A-B|")
    body = [(r[0], r[1], r[2], "-" if r[3] is None else str(r[3]),
             "-" if r[4] is None else f"{r[4]:.4g}", "-" if r[5] is None else f"{r[5]:.3g}",
             r[6]) for r in c.rows]
    widths = [max([len(head[i])] + [len(v[i]) for v in body]) for i in range(6)]
    lines = [f"A = {dir_a}", f"B = {dir_b}", ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    for v in body:
        lines.append("  ".join([v[i].ljust(widths[i]) for i in range(6)] + [v[6]]).rstrip())
    deltas = [r[5] for r in c.rows if r[5] is not None]
    lines.append("")
    lines.append(f"{len(c.rows)} file(s) in both; largest max |A-B| "
                 f"{max(deltas):.3g}" if deltas else f"{len(c.rows)} file(s) in both")
    lines.append(f"only in A ({len(c.only_a)}): {', '.join(c.only_a) or '-'}")
    lines.append(f"only in B ({len(c.only_b)}): {', '.join(c.only_b) or '-'}")
    return "\n".join(lines)
