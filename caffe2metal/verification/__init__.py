"""`caffe2metal verify` and `caffe2metal compare`: prove what `convert` wrote.

verify, layer by layer
    The original model runs once in OpenCV (fusion off) on one input: the
    ``--image`` (``cv2.imread``, resized to the declared input size, float32
    NCHW, BGR, no mean subtraction) or a deterministic uniform [-1, 1) input.
    For every entry of ``manifest.json``'s ``layers`` the weights and bias are
    read back from OUT (dtype, shape from the manifest; size and sha256
    checked) and the layer is recomputed with the numpy model of MPS
    (``caffe2metal.mps``, NHWC, float64 accumulation) on the original layer's input
    activation.  That activation is the output of the layer that wrote the
    bottom's value: the graph's unique blob names say which layer that is, so
    in-place chains (conv -> BatchNorm -> Scale -> ReLU on one blob) are read
    at the right step.  The reference is the original output after the folded
    BatchNorm/Scale (the last folded layer's output, or the layer's own).
    ``priors.dat`` is compared with OpenCV's PriorBox Concat output.

verify, end to end
    Every net output of the original model against the merged Caffe model in
    OUT, both in OpenCV with fusion off.  Then the manifest's plan executed from
    OUT alone by ``caffe2metal.runtime`` (the numpy MPS model) against the
    original in OpenCV: one row per net output (and for one a Softmax/Sigmoid
    computes, its input), and SSD's detections compared as sets (``plan_run``,
    which explains its tolerances: float32 1e-4, float16 weights or activations
    2e-1, a squashed row plus what its input's difference becomes through it).

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
      MobileNet-SSD-style demo net: 8e-5..5.1e-4 per layer; on 13 real
      architectures with synthetic weights: at most 6.3e-4; on a real trained
      model: 8.0e-4.  2e-3 (4 x 2^-11) leaves 2.5x headroom over everything
      measured, while one weight off by
      0.25 in one 1x1 convolution of the demo net gives 1.8e-2.
      This models the weight files only: MPS also keeps activations in float16
      on the GPU, which ``activations="float16"`` models in the plan run.
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

Fork layers OpenCV cannot create
    (found by trying, ``fork_layers``): a type with a numpy ``forward`` role
    (Upsample, Interp, Axpy, ShuffleChannel, ReLU6, Clip, Threshold) runs
    inside OpenCV as a Python layer registered for the verify run only.  A
    type with none (ENet's BN, Python layers, a type nobody registered) is
    cut out of OpenCV's net with every layer computed from it: everything
    before it is checked; the checks that need one of its blobs are listed
    as skipped, with the reason (rows not counted, ``Report.skipped``).

compare
    Max |A - B| of every weights/bias file present in both directories
    (matched by file name, in DIR or DIR/metal), and the files found in only
    one.  dtype from each directory's manifest.json when it lists the file,
    otherwise float32.
"""
from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import numpy as np

from .. import fold
from ..errors import Caffe2MetalError
from ..graph import Graph
from ..net.reader import InputShapes, Model, read_model, read_prototxt
from . import fork_layers
from .compare import Comparison, ComparisonRow, compare, render_comparison
from .files import _entries, load_manifest, manifest_layer, read_array
from .inputs import make_inputs
from .layers import _SHA_NOTE, _check_layer, _check_priors, _downstream, recompute
from .opencv import _forward, _opencv, caffemodel_bytes, opencv_net, opencv_text
from .plan_run import PLAN_TOLERANCE, detection_inputs, plan_rows, squashed_inputs
from .reference import caffe_reference
from .report import END_TO_END_TOLERANCE, TOLERANCE, Report, Row, _measure, render

__all__ = ["END_TO_END_TOLERANCE", "PLAN_TOLERANCE", "TOLERANCE", "Comparison",
           "ComparisonRow", "Report", "Row",
           "caffe_reference", "caffemodel_bytes", "compare", "load_manifest", "make_inputs",
           "opencv_net", "opencv_text", "read_array", "recompute", "render",
           "render_comparison", "verify"]


def verify(prototxt: str | os.PathLike, caffemodel: str | os.PathLike, out: str | os.PathLike,
           *, image: str | os.PathLike | None = None, seed: int = 0,
           input_shapes: InputShapes | None = None, activations: str = "float32",
           model: Model | None = None) -> Report:
    """``model``: the net as ``convert`` just read it from these files (weights attached and
    checked), used instead of reading them again; its layers' blobs are emptied here.

    Memory: the original blobs are released once the layer ends are known (before
    OpenCV, which holds its own copy, runs); Caffe's numpy reference reads them again in
    the rare case it is asked (``_Original``).  One OpenCV net at a time, each freed after
    its single forward pass; every weight file is read once per use and freed after it."""
    out = Path(out)
    manifest = load_manifest(out)
    model, ends = _structure(prototxt, caffemodel, input_shapes, model)
    graph = model.graph
    original = _Original(prototxt, caffemodel, input_shapes)
    feed, described = make_inputs(model, image, seed)
    report = Report(prototxt=str(prototxt), out=str(out), input=described)

    jobs: list[tuple[dict, str, str]] = []
    needed: set[str] = set()
    for entry in _entries(manifest, out):
        name = entry["name"]
        if entry.get("kind") == "channel_affine":
            chain = [manifest_layer(graph, n, out) for n in entry.get("chain") or [name]]
            src, dst = chain[0].bottoms[0], chain[-1].tops[0]
        else:
            if name not in ends:
                raise Caffe2MetalError(f"the manifest lists layer {name!r}, which the folded "
                                       "model does not have (was OUT made from another model?)",
                                       file=out / "manifest.json")
            bottoms, tops = ends[name]
            src, dst = bottoms[0], tops[0]
        jobs.append((entry, src, dst))
        needed.update((src, dst))
    ssd = manifest.get("ssd") or {}
    concat = (manifest_layer(graph, ssd["priorbox_concat"], out) if ssd.get("priorbox_concat")
              else None)
    if concat is not None:
        needed.add(concat.tops[0])
    # a DetectionOutput the export found not to be SSD's (see export.ssd._check_prior_counts)
    # cannot run in OpenCV either: check everything up to it
    drop = tuple({s["type"] for s in manifest.get("metal", {}).get("skipped", [])
                  if s["type"] == "DetectionOutput"})
    forks = fork_layers.plan(graph, drop)
    gone = forks.unavailable
    later = set(_outputs(graph, drop, forks)) | set(detection_inputs(graph, drop))
    later |= set(squashed_inputs(graph, later))      # their logits (the plan run's rows)
    needed.update(later)                 # the end-to-end rows and the plan run's rows for SSD
    needed -= set(gone)
    with fork_layers.registered(forks):
        net = _opencv(opencv_text(model, drop, rename=forks.rename, cut=forks.cut),
                      Path(caffemodel))
        values = _forward(graph, net, feed, needed, drop, forks.cut)
        del net
    # OpenCV computes a few layers wrongly (see _second_opinion); what follows such a layer
    # may read garbage, so rows downstream that disagree get no verdict
    defects: dict[str, str] = {}          # blob OpenCV computes wrongly -> its layer
    tainted: dict[str, str] = {}          # every blob computed from one of those -> that layer
    for entry, src, dst in jobs:
        if src in gone or dst in gone:
            report.layers.append(_skipped(report, entry["name"], entry.get("kind", "?"),
                                          model.shapes.blobs.get(dst), gone[src if src in gone
                                                                          else dst]))
            continue
        row = _check_layer(entry, values[src], values[dst], out, original.graph)
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
        report.layers.append(_skipped(report, "priors", "priors", None, gone[concat.tops[0]])
                             if concat.tops[0] in gone
                             else _check_priors(out, ssd, graph, values[concat.tops[0]]))
    original.release()
    values = {b: v for b, v in values.items() if b in later}   # what the rows below read

    report.outputs = _end_to_end(model, manifest, out, feed, values, drop, forks)
    for row in report.outputs:
        if not row.counted and row.note.startswith("skipped: "):
            report.skipped.append((row.name, row.note.removeprefix("skipped: ")))
    outputs = {graph.blob_names.get(b, b): b for b in _outputs(graph, drop, forks)
               if b in values}
    report.plan = plan_rows(report, manifest, out, feed, graph, model.shapes.blobs, outputs,
                            values, activations)
    report.plan_activations = activations
    _after_defects(report.plan, graph, defects)
    tainted = _downstream(graph, defects)
    for row in report.outputs:
        if row.name in tainted:
            row.counted = False
            row.note = (f"not counted: downstream of '{tainted[row.name]}', which OpenCV "
                        "computes wrongly (see above)")
    return report


def _structure(prototxt, caffemodel, input_shapes: InputShapes | None, model: Model | None
               ) -> tuple[Model, dict[str, tuple[list[str], list[str]]]]:
    """The model read and checked (or ``model``) without its blobs, and each layer's
    (bottoms, tops) in the folded model."""
    if model is None:
        model = read_model(prototxt, caffemodel, input_shapes=input_shapes)
    merged = fold.apply(model.graph, fold.plan(model.graph), lazy=True)   # nothing folded
    ends = {layer.name: (layer.bottoms, layer.tops) for layer in merged.layers}
    for layer in model.graph.layers:
        layer.blobs = []
    return model, ends


class _Original:
    """The original graph with its blobs, for Caffe's numpy reference: read again from the
    files only when a layer disagrees with OpenCV (rare), and released after the per-layer
    rows, so that the caffemodel is not held in memory while OpenCV holds its own copy."""

    def __init__(self, prototxt, caffemodel, input_shapes: InputShapes | None) -> None:
        self.args = (prototxt, caffemodel, input_shapes)
        self.read: Graph | None = None

    def graph(self) -> Graph:
        if self.read is None:
            prototxt, caffemodel, shapes = self.args
            self.read = read_model(prototxt, caffemodel, input_shapes=shapes).graph
        return self.read

    def release(self) -> None:
        self.read = None


def _after_defects(rows: list[Row], graph: Graph, defects: dict[str, str]) -> None:
    """Plan rows whose reference comes after a layer OpenCV computes wrongly: not counted."""
    every = {graph.blob_names.get(b, b): why
             for b, why in _downstream(graph, defects, every_blob=True).items()}
    detections = [graph.blob_names.get(t, t) for layer in graph.layers
                  if layer.type == "DetectionOutput" for t in layer.tops]
    for row in rows:
        after = [every[n] for n in ([row.name] if row.name != "detections" else detections)
                 if n in every]
        if after and row.counted:
            row.counted = False
            row.note = (f"not counted: downstream of '{after[0]}', which OpenCV computes "
                        "wrongly (see above)")


def _skipped(report: Report, name: str, kind: str, shape: tuple | None, reason: str) -> Row:
    """A check that cannot be made: a row not counted, and the report's list of skips."""
    report.skipped.append((name, reason))
    return Row(name, kind, tuple(d for d in shape or () if d is not None),
               counted=False, note=f"skipped: {reason}")


def _outputs(graph: Graph, drop: Collection[str] = (),
             forks: fork_layers.Plan | None = None) -> list[str]:
    """The net's outputs, with the inputs of dropped (or cut) layers standing in for theirs;
    never a blob OpenCV cannot compute."""
    cut = forks.cut if forks is not None else {}
    unavailable = forks.unavailable if forks is not None else {}
    gone = [layer for layer, key in zip(graph.layers, fork_layers.layer_keys(graph), strict=True)
            if layer.type in drop or key in cut]
    tops = {t for layer in gone for t in layer.tops}
    return list(dict.fromkeys(
        [b for b in graph.outputs() if b not in tops]
        + [b for layer in gone for b in layer.bottoms if b not in unavailable]))


def _end_to_end(model: Model, manifest: dict, out: Path, feed: dict[str, np.ndarray],
                v1: dict[str, np.ndarray], drop: Collection[str] = (),
                forks1: fork_layers.Plan | None = None) -> list[Row]:
    merged_files = manifest.get("merged", {})
    proto, weights = out / merged_files["prototxt"], out / merged_files["caffemodel"]
    merged_model = read_prototxt(proto)
    g1, g2 = model.graph, merged_model.graph
    forks2 = fork_layers.plan(g2, drop)
    outs1 = {g1.blob_names.get(b, b): b for b in _outputs(g1, drop, forks1)}
    outs2 = {g2.blob_names.get(b, b): b for b in _outputs(g2, drop, forks2)}
    with fork_layers.registered(forks2):
        net = _opencv(opencv_text(merged_model, drop, rename=forks2.rename, cut=forks2.cut),
                      weights)
        v2 = _forward(g2, net, feed, set(outs2.values()), drop, forks2.cut)
        del net
    rows = []
    if forks1 is not None:       # the net's own outputs that cannot be computed
        stand_ins = set(outs1.values())
        for b in g1.outputs():
            if b in forks1.unavailable and b not in stand_ins:
                producer = g1.producers()[b]
                rows.append(Row(g1.blob_names.get(b, b), producer.type,
                                tuple(d for d in model.shapes.blobs.get(b) or () if d is not None),
                                counted=False, note=f"skipped: {forks1.unavailable[b]}"))
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
