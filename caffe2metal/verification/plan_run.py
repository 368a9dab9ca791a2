"""verify's last section: the plan run from OUT alone against the original model in OpenCV.

``caffe2metal.runtime`` executes the manifest's plan in numpy with MPS semantics
from ``manifest.json`` and ``metal/`` only (never the prototxt or the caffemodel),
on the input verify fed the original.  One row per net output (rel = max |diff| /
max |ref|, as every row); a row a Softmax, Sigmoid or TanH computes (through
Flatten/Reshape: SSD's scores, a classifier's probabilities) comes after a row for
that layer's input, held to the tolerance, while the squashed row is held to the
tolerance plus what the difference measured in its input can become through the
layer's largest slope (``SLOPE``, ``_through``): a saturated softmax hides differences
before it, and large logits make float32 rounding visible after it (mobilenetv2_ssd:
a random one-ulp change of every weight moves its sigmoid scores by 2.3e-4 of max and
its logits by 6e-6); for an SSD net the outputs of
DetectionOutput are its inputs (``loc``, ``conf``: the rows hold the values) plus one
row ``detections`` comparing the two detection lists as sets (as an app reads them; their order in
the 1x1xNx7 blob is no contract; OpenCV's zero rows of the background label, its
padding up to keep_top_k, are none): every detection matches one of the other with
the same label, score within 1e-3 and IoU >= 0.99, and the counts agree (a box with
a non-finite coordinate, decoded from a huge loc value, or without area has no IoU:
its coordinates must then be equal, non-finite ones exactly, as every row matches
non-finite values).  Detections whose score is within 1e-3 of another one of the
same label are compared by count only: their order, hence which of them NMS and
keep_top_k keep, is decided by differences far below the tolerance (the sort's
tie-break), not by the model; the row's note says how many.  On the built-in
example (synthetic weights saturate nearly every score near 1.0) that is almost
all of them: there the rows of DetectionOutput's inputs carry the comparison.

Tolerances
    * float32 weight files: 1e-4, as every float32 row (measured on the built-in
      example: mbox_loc 6.3e-6, mbox_conf_flatten 2.7e-5; detections equal as sets,
      worst score difference 1.8e-7, worst IoU 0.9998).
    * float16 weight files (or ``activations="float16"``): 2e-1.  Each weight is
      rounded to 11 significant bits (the per-layer rows hold each layer's files to
      2e-3); run end to end those roundings compound through every layer, by as much
      as the network amplifies any weight error of that size.  Measured with
      ``python -m tools.precision`` (the example and 17 real architectures, synthetic
      weights, verify's input; rows held to the tolerance itself, i.e. before a
      Softmax/Sigmoid): worst 0.10 (mobilenetv2_ssdlite's logits), then 0.050
      (ArcFace), 0.048 (ERFNet), 0.038; a random perturbation of every weight by
      up to 2^-12 relative (float16's rounding size) moves the same rows by 0.077,
      0.065, 0.057, 0.031: the gap is the network's sensitivity, not the files or
      the plan.  float16 activations alone: worst 0.019.  2e-1 leaves 2x headroom
      over the worst; what the row must catch, a plan that computes something else
      (a wrong op, wiring, geometry or constant), measured 0.5 to 1 (tests/test_plan.py,
      test_verify_plan.py), stays above it.  The detection sets are then not expected
      to be equal: near-tied scores reorder across keep_top_k and NMS (measured: 16
      of 100 detections equal as sets on the example, the counts equal), so the
      ``detections`` row is shown for information (status ``info``), not counted.

An op the runtime cannot execute (a ``PlanError``: an app op it has no numpy
implementation for, a field it cannot use) is cut out of the run with everything
computed from it; the rows that need it say so and are not counted (listed as
skipped), and the rest are checked.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Collection
from pathlib import Path

import numpy as np

from ..graph import Graph
from .report import Report, Row, _measure

PLAN_TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 2e-1}
SCORE_TOLERANCE = 1e-3
MIN_IOU = 0.99


def detection_inputs(graph: Graph, drop: Collection[str] = ()) -> list[str]:
    """The loc and conf blobs of every DetectionOutput OpenCV runs (what the plan rows read)."""
    return [b for layer in graph.layers if layer.type == "DetectionOutput"
            and layer.type not in drop for b in layer.bottoms[:2]]


SLOPE = {"Softmax": 0.5, "Sigmoid": 0.25, "TanH": 1.0}
"""The largest slope of each squashing layer, in the infinity norm: softmax's Jacobian
diag(p) - p p^T has rows summing in absolute value to 2 p_i (1 - p_i) <= 1/2; the
logistic's derivative s (1 - s) <= 1/4; tanh's 1 - t^2 <= 1 (derived)."""


def squashed_input(graph: Graph, blob: str) -> tuple[str, float, str] | None:
    """The input of the Softmax, Sigmoid or TanH that computes ``blob`` (through
    Flatten/Reshape only: SSD's mbox_conf_flatten, a classifier's prob), that layer's
    slope bound and its type, where that input is the last value of its blob name (what the
    plan's value of that name is); else None."""
    producers = graph.producers()
    layer = producers.get(blob)
    while layer is not None and layer.type in ("Flatten", "Reshape"):
        layer = producers.get(layer.bottoms[0])
    if layer is None or layer.type not in SLOPE:
        return None
    x = layer.bottoms[0]
    name = graph.blob_names.get(x, x)
    last = [b for b in producers if graph.blob_names.get(b, b) == name]
    return (x, SLOPE[layer.type], layer.type) if last and last[-1] == x and x in producers \
        else None


def squashed_inputs(graph: Graph, blobs: Collection[str]) -> list[str]:
    """``squashed_input`` of each of ``blobs`` that has one."""
    return [found[0] for b in blobs if (found := squashed_input(graph, b)) is not None]


def _through(slope: float, tol: float, above: Row | None, probs: np.ndarray) -> float:
    """The tolerance of a squashed row: ``tol`` plus what the difference measured in its
    input (the row ``above``) can make of it through the layer, slope * max|dz| (mean
    value theorem), as a fraction of max|p|; rounded up to 2 significant digits."""
    finite = np.abs(probs[np.isfinite(probs)])
    top = float(finite.max()) if finite.size else 0.0
    if above is None or not above.counted or not math.isfinite(above.max_diff) or top <= 0:
        return tol
    bound = tol + slope * above.max_diff / top
    if not math.isfinite(bound):
        return tol
    digits = 10.0 ** (math.floor(math.log10(bound)) - 1)
    return math.ceil(bound / digits) * digits


def plan_rows(report: Report, manifest: dict, out: Path, feed: dict[str, np.ndarray],
              graph: Graph, shapes: dict, outputs: dict[str, str],
              values: dict[str, np.ndarray], activations: str = "float32") -> list[Row]:
    """The rows of the section (empty when OUT has no plan: ``--no-metal``, version 1).

    ``outputs``: the net outputs verify compared end to end (file name -> unique blob of
    ``graph``), ``values``: the original's values in OpenCV by unique blob;
    ``activations``: "float16" runs the plan storing every MPS op's output as float16."""
    plan = manifest.get("plan")
    if not isinstance(plan, list) or manifest.get("version") != 2:
        return []
    metal = manifest.get("metal")
    dtype = metal.get("weights_dtype") if isinstance(metal, dict) else None
    precision = "float16" if "float16" in (dtype, activations) else "float32"
    tol = PLAN_TOLERANCE[precision]
    result, cut, failure = _run(out, manifest, feed, activations)
    names = manifest.get("blob_names")
    if not isinstance(names, dict):        # (a hostile manifest: the run names what is wrong)
        names = {}
    last: dict[str, str] = {}               # file name -> the plan's last value of it
    for op in plan:
        tops = op.get("tops") if isinstance(op, dict) else None
        for t in tops if isinstance(tops, list) else []:
            if isinstance(t, str):
                name = names.get(t, t)
                last[name if isinstance(name, str) else t] = t
    producers = graph.producers()
    rows = []

    def shape_of(b: str) -> tuple:
        return tuple(d for d in shapes.get(b) or () if d is not None)

    def compare(name: str, kind: str, blob: str) -> Row:
        found = squashed_input(graph, blob)
        x, slope, squash = found if found is not None and found[0] in values else (None, 0, "")
        above = None                            # the logits first: a softmax compresses them
        if x is not None:
            above = compare(graph.blob_names.get(x, x), producers[x].type, x)
        ref = values[blob]
        mine = None if result is None else result.values.get(last.get(name, name))
        if mine is None:
            why = failure or f"the plan computes no blob {name!r}"
            why = cut.get(last.get(name, name), why)
            report.skipped.append((f"plan: {name}", why))
            rows.append(Row(name, kind, shape_of(blob), counted=False, note=f"skipped: {why}"))
            return rows[-1]
        if mine.shape != ref.shape and mine.size == ref.size \
                and [d for d in mine.shape if d != 1] == [d for d in ref.shape if d != 1]:
            mine = mine.reshape(ref.shape)      # an MPSImage 1x1xC is Caffe's (1, C)
        row_tol = tol if x is None else _through(slope, tol, above, ref)
        row = _measure(Row(name, kind, ref.shape), ref, mine, row_tol)
        if row_tol > tol:
            row.note = (f"{squash} of the row above: tol {tol:g} + {slope:g} x its max |diff| / "
                        f"max |ref| (a {squash}'s slope is at most {slope:g})")
        rows.append(row)
        return row

    for name, b in outputs.items():
        producer = producers.get(b)
        if producer is not None and producer.type == "DetectionOutput":
            for x in producer.bottoms[:2]:
                compare(graph.blob_names.get(x, x), producers[x].type, x)
            ssd = manifest.get("ssd")
            det = ssd.get("detection_output") if isinstance(ssd, dict) else None
            background = det.get("background_label_id", 0) if isinstance(det, dict) else 0
            rows.append(_detections(report, values[b], result, cut, failure, producer.name,
                                    precision, background))
        else:
            compare(name, producer.type if producer is not None else "?", b)
    return rows


def _detections(report: Report, ref_rows: np.ndarray, result, cut: dict, failure: str | None,
                layer: str, dtype: str, background: object = 0) -> Row:
    # OpenCV 4.14 pads its output to keep_top_k rows of zeros (label 0): no DetectionOutput
    # emits the background label (Caffe's and OpenCV's class loops skip it)
    theirs = [r for r in np.asarray(ref_rows, np.float64).reshape(-1, 7)
              if r[1] >= 0 and r[1] != background]
    row = Row("detections", "sets (label, score, IoU)", (len(theirs),),
              tolerance=SCORE_TOLERANCE)
    ran = result is not None and layer not in cut and failure is None
    if not ran:
        why = cut.get(layer) or failure or f"op {layer!r} did not run"
        report.skipped.append(("plan: detections", why))
        row.counted, row.note = False, f"skipped: {why}"
        return row
    mine = result.detections
    n_ref, n_mine = len(theirs), len(mine)
    row.max_ref = max((float(r[2]) for r in theirs), default=0.0)
    tied = ""
    tied_ref = _tied([(int(r[1]), float(r[2])) for r in theirs])
    tied_mine = _tied([(d["label"], d["score"]) for d in mine])
    if any(tied_ref) or any(tied_mine):
        theirs = [r for r, t in zip(theirs, tied_ref, strict=True) if not t]
        mine = [d for d, t in zip(mine, tied_mine, strict=True) if not t]
        tied = (f"; {sum(tied_ref)} vs {sum(tied_mine)} with scores tied within "
                f"{SCORE_TOLERANCE:g} (same label) compared by count only")
    matched, worst_score, worst_iou = _match(mine, theirs)
    row.max_diff = worst_score
    row.rel = worst_score / row.max_ref if row.max_ref > 0 else 0.0
    row.ok = n_ref == n_mine and matched == len(theirs) == len(mine)
    iou = f"; worst IoU {worst_iou:.4g}" if matched else ""
    if row.ok and not theirs and tied:
        row.note = (f"counts equal ({n_mine}); every detection has a score tied within "
                    f"{SCORE_TOLERANCE:g} with another of its label: compared by count only")
    elif row.ok:
        row.note = (f"equal as sets: {n_mine} detection(s), same labels, scores within "
                    f"{SCORE_TOLERANCE:g}, IoU >= {MIN_IOU:g}{iou}{tied}")
    else:
        row.note = (f"sets differ: {n_ref} vs {n_mine} detection(s), {matched} of "
                    f"{len(theirs)} compared matched (same label, score within "
                    f"{SCORE_TOLERANCE:g}, IoU >= {MIN_IOU:g}){iou}{tied}")
    if dtype == "float16":
        row.counted, row.informational = False, True
        row.note += ("; float16: shown for information (near-tied scores reorder), "
                     "the rows above hold the values")
    return row


def _tied(scored: list[tuple[int, float]]) -> list[bool]:
    """Per detection: another one of its label has a score within SCORE_TOLERANCE."""
    out = [False] * len(scored)
    order = sorted(range(len(scored)), key=lambda i: scored[i])
    for i, j in itertools.pairwise(order):
        if scored[i][0] == scored[j][0] and scored[j][1] - scored[i][1] <= SCORE_TOLERANCE:
            out[i] = out[j] = True
    return out


def _iou(a, b) -> float:
    """IoU of two (xmin, ymin, xmax, ymax) boxes.  A box with a non-finite coordinate (exp
    of a huge loc value) or no area has no IoU: such boxes match (1.0) when their
    non-finite coordinates are equal and the finite ones within 1e-3 relative, else 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    degenerate = (a[2] <= a[0]) | (a[3] <= a[1]) | (b[2] <= b[0]) | (b[3] <= b[1])
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or degenerate:
        fin = np.isfinite(a) & np.isfinite(b)
        same = np.array_equal(np.where(fin, 0, a), np.where(fin, 0, b), equal_nan=True)
        peak = float(np.abs(np.concatenate([a[fin], b[fin]])).max()) if fin.any() else 0.0
        close = not fin.any() or float(np.abs(a[fin] - b[fin]).max()) <= 1e-3 * peak
        return 1.0 if same and close else 0.0
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _match(mine: list[dict], theirs: list) -> tuple[int, float, float]:
    """(reference detections matched one to one, worst score difference, worst IoU) of
    the matched pairs; each reference takes the unused detection of its label with the
    best IoU among those within the score tolerance."""
    free = list(range(len(mine)))
    matched, worst_score, worst_iou = 0, 0.0, 1.0
    for r in theirs:
        best, best_iou = None, MIN_IOU
        for i in free:
            d = mine[i]
            if d["label"] != int(r[1]) or abs(d["score"] - r[2]) > SCORE_TOLERANCE:
                continue
            iou = _iou(r[3:7], d["box"])
            if iou >= best_iou:
                best, best_iou = i, iou
        if best is None:
            continue
        free.remove(best)
        matched += 1
        worst_score = max(worst_score, abs(mine[best]["score"] - float(r[2])))
        worst_iou = min(worst_iou, best_iou)
    return matched, worst_score, worst_iou


def _run(out: Path, manifest: dict, feed: dict[str, np.ndarray], activations: str = "float32"):
    """(RunOutput or None, {blob or op name cut -> why}, why nothing ran or None).

    An op the runtime refuses is cut with everything downstream, and the rest run
    again (from a copy of the manifest beside a link to OUT's metal/)."""
    from ..errors import Caffe2MetalError
    from ..runtime import PlanError, run_plan
    plan = list(manifest["plan"])
    cut: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="caffe2metal-plan-") as tmp:
        where = out
        for _ in range(len(plan) + 1):
            try:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    result = run_plan(where, feed, activations)
                for op, why in result.skipped.items():      # `unavailable` ops, as convert
                    cut.setdefault(op, f"not in the plan: {why}")     # marked them
                for blob, why in result.lost.items():
                    cut.setdefault(blob, f"not in the plan: {why}")
                return result, cut, None
            except PlanError as e:
                failed = next((op for op in plan if isinstance(op, dict)
                               and str(e).startswith(f"op {op.get('name')!r}: ")), None)
                if failed is None:
                    return None, cut, f"run cannot execute the plan: {e}"
                plan = _without(plan, failed, f"run cannot execute {e}", cut)
                where = _copy(out, manifest, plan, Path(tmp))
            except Caffe2MetalError as e:
                return None, cut, f"run cannot execute the plan: {e}"
            except Exception as e:      # noqa: BLE001  a runtime defect: shown, never a crash
                return None, cut, f"run failed: {type(e).__name__}: {e}"
    return None, cut, "run cannot execute the plan"


def _without(plan: list, failed: dict, why: str, cut: dict[str, str]) -> list:
    """``plan`` without ``failed`` and every op reading what it (transitively) computes."""
    gone = set(failed.get("tops", []))
    cut[failed["name"]] = why
    kept = []
    for op in plan:
        if op is failed:
            continue
        if any(b in gone for b in op.get("bottoms", [])):
            gone.update(op.get("tops", []))
            cut[op["name"]] = why
            continue
        kept.append(op)
    for t in gone:
        cut.setdefault(t, why)
    return kept


def _copy(out: Path, manifest: dict, plan: list, tmp: Path) -> Path:
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "plan": plan}, allow_nan=False))
    directory = str((manifest.get("metal") or {}).get("directory") or "metal")
    link = tmp / directory
    if not link.exists() and "/" not in directory and directory not in (".", ".."):
        os.symlink(Path(out).resolve() / directory, link, target_is_directory=True)
    return tmp


__all__ = ["MIN_IOU", "PLAN_TOLERANCE", "SCORE_TOLERANCE", "detection_inputs", "plan_rows",
           "squashed_input", "squashed_inputs"]
