"""Each manifest layer recomputed from its Metal files and checked against OpenCV.

``recompute`` runs the numpy model of MPS (``mps.py``, NHWC, float64
accumulation) on the layer's input activation; when the result disagrees with
OpenCV, ``_second_opinion`` asks Caffe's definition (``reference.py``) which
of the two is wrong.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import mps
from ..errors import Caffe2MetalError
from ..graph import Graph
from .files import manifest_layer, read_array
from .reference import caffe_reference
from .report import TOLERANCE, Row, _fmt_shape, _measure


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
    kind = mps.KINDS.get(entry["kind"]) if isinstance(entry["kind"], str) else None
    if kind is None:
        raise Caffe2MetalError(f"unknown layer kind {entry['kind']!r} in the manifest",
                               layer=entry["name"])
    y = kind.run(entry, _hwc(x), w, b)
    return y, w_ok and b_ok


_SHA_NOTE = "sha256 differs from the manifest"


def _check_layer(entry: dict, x: np.ndarray, ref: np.ndarray, out: Path,
                 original: Callable[[], Graph]) -> Row:
    """One manifest layer from its files against OpenCV's output (and Caffe's, if they differ:
    ``original()`` is then the original graph with its blobs)."""
    row = Row(entry["name"], entry["kind"], ref.shape)
    tol = TOLERANCE.get(entry["weights"]["dtype"], TOLERANCE["float32"])
    try:
        got, sha_ok = recompute(entry, x, out)
    except ValueError as e:
        row.tolerance, row.note = tol, f"cannot recompute: {e}"
        return row
    _measure(row, _hwc(ref), got, tol)
    if not row.ok:
        _second_opinion(row, original(), entry, x, ref, got)
    if not sha_ok:
        row.ok, row.note = False, _SHA_NOTE
    return row


def _downstream(graph: Graph, defects: dict[str, str], every_blob: bool = False) -> dict[str, str]:
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


def _second_opinion(row: Row, graph: Graph, entry: dict, x: np.ndarray, opencv_out: np.ndarray,
                    got: np.ndarray) -> bool:
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


def _check_priors(out: Path, ssd: dict, graph: Graph, ref: np.ndarray) -> Row:
    priors, sha_ok = read_array(out, ssd["priors"], "priors")
    row = Row("priors", "priors", ref.shape)
    _measure(row, ref[0], priors, TOLERANCE["float32"])
    if not sha_ok:
        row.ok, row.note = False, _SHA_NOTE
    boxes = [manifest_layer(graph, h["priorbox"], out) for h in ssd.get("heads", [])]
    if any("clip" not in layer.params.get("prior_box_param", {}) for layer in boxes):
        row.counted = False
        row.note = "not counted: OpenCV clips when 'clip' is unset, Caffe does not"
    return row
