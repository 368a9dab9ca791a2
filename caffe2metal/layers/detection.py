"""SSD's DetectionOutput in plain numpy: box decoding, per-class NMS, keep_top_k.

Caffe's definition (weiliu89/caffe ``detection_output_layer.cpp`` Forward_cpu
and ``bbox_util.cpp``), computed in float32 like its ``NormalizedBBox``:

* inputs: ``loc`` [N][num_priors * num_loc_classes * 4] (num_loc_classes = 1
  with ``share_location``, else num_classes), ``conf`` [N][num_priors *
  num_classes] (already a softmax in deploy nets), ``priors`` [1][2][num_priors*4]
  (boxes, then variances: PriorBox's output, ``priors.dat``);
* decode (``DecodeBBox``), per prior p with box (x0, y0, x1, y1), variances v
  (or 1 with ``variance_encoded_in_target``) and prediction l:
  CORNER: box + v*l; CENTER_SIZE: centre c + v[0:2]*l[0:2]*size, size *
  exp(v[2:4]*l[2:4]); CORNER_SIZE: corners + v*l*size.  No clipping
  (DetectionOutput decodes with clip_bbox false);
* per image, per class c except ``background_label_id``: the priors whose
  score > ``confidence_threshold`` (default: every score), best first (a stable
  sort), at most ``top_k`` of them, then greedy NMS: a box is kept when its
  Jaccard overlap with every kept box is <= the threshold, which starts at
  ``nms_threshold`` and is multiplied by ``eta`` after each kept box while eta <
  1 and it is above 0.5 (``ApplyNMSFast``);
* when more than ``keep_top_k`` (> -1) boxes survive in an image, the best
  ``keep_top_k`` by score across classes;
* output [1][1][K][7] rows (image, label, score, xmin, ymin, xmax, ymax), per
  image by label ascending, within a label best first; no detection at all
  gives one row per image of -1 with the image index first.
"""
from __future__ import annotations

import numpy as np

CODE_TYPES = ("CORNER", "CENTER_SIZE", "CORNER_SIZE")


def decode_boxes(loc: np.ndarray, priors: np.ndarray, code_type: str = "CORNER",
                 variance_encoded_in_target: bool = False) -> np.ndarray:
    """Caffe's DecodeBBox for every prior: ``loc`` [..., P, 4], ``priors`` [2][P*4] ->
    [..., P, 4] float32 boxes (xmin, ymin, xmax, ymax)."""
    if code_type not in CODE_TYPES:
        raise ValueError(f"unknown code_type {code_type!r} (Caffe has {', '.join(CODE_TYPES)})")
    f32 = np.float32
    box = np.asarray(priors[0], f32).reshape(-1, 4)
    var = (np.ones_like(box) if variance_encoded_in_target
           else np.asarray(priors[1], f32).reshape(-1, 4))
    loc = np.asarray(loc, f32)
    size = np.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], axis=-1)   # w, h
    if code_type == "CORNER":
        return (box + var * loc).astype(f32)
    if code_type == "CORNER_SIZE":
        return (box + var * loc * np.concatenate([size, size], axis=-1)).astype(f32)
    centre = (box[:, :2] + box[:, 2:]) / f32(2)
    c = var[:, :2] * loc[..., :2] * size + centre
    with np.errstate(over="ignore"):
        wh = np.exp(var[:, 2:] * loc[..., 2:]) * size
    return np.concatenate([c - wh / f32(2), c + wh / f32(2)], axis=-1).astype(f32)


def _sizes(b: np.ndarray) -> np.ndarray:
    """BBoxSize (normalized): 0 for an inverted box."""
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    with np.errstate(over="ignore", invalid="ignore"):      # inf boxes: inf or nan, as in C
        return np.where((w < 0) | (h < 0), np.float32(0), w * h).astype(np.float32)


def jaccard(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Caffe's JaccardOverlap of ``box`` [4] with each of ``others`` [K][4]: 0 unless the
    intersection has a positive width and height, else intersection / union."""
    w = np.minimum(others[:, 2], box[2]) - np.maximum(others[:, 0], box[0])
    h = np.minimum(others[:, 3], box[3]) - np.maximum(others[:, 1], box[1])
    overlap = (w > 0) & (h > 0)
    with np.errstate(over="ignore", invalid="ignore"):
        inter = np.where(overlap, w * h, np.float32(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (_sizes(box[None])[0] + _sizes(others) - inter)
    return np.where(overlap, iou, np.float32(0)).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, confidence_threshold: float,
        nms_threshold: float, eta: float = 1.0, top_k: int = -1) -> list[int]:
    """Caffe's ApplyNMSFast: the indices kept, best first."""
    candidates = np.flatnonzero(scores > np.float32(confidence_threshold))
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if top_k > -1:
        order = order[:top_k]
    kept: list[int] = []
    threshold = float(nms_threshold)
    for idx in order:
        if kept and not (jaccard(boxes[idx], boxes[kept]) <= threshold).all():
            continue
        kept.append(int(idx))
        if eta < 1 and threshold > 0.5:
            threshold *= eta
    return kept


def detection_output(loc: np.ndarray, conf: np.ndarray, priors: np.ndarray, *,
                     num_classes: int, share_location: bool = True,
                     background_label_id: int = 0, nms_threshold: float = 0.3,
                     top_k: int | None = None, eta: float = 1.0, keep_top_k: int = -1,
                     confidence_threshold: float | None = None, code_type: str = "CORNER",
                     variance_encoded_in_target: bool = False) -> np.ndarray:
    """Caffe's DetectionOutput (see the module doc): [1][1][K][7] float32.

    Keyword arguments are ``detection_output_param`` (and its ``nms_param``) with
    Caffe's defaults; ``None`` means unset (top_k: no limit; confidence_threshold:
    every score)."""
    num = loc.shape[0]
    priors = np.asarray(priors, np.float32).reshape(2, -1)
    num_priors = priors.shape[1] // 4
    loc_classes = 1 if share_location else num_classes
    boxes = decode_boxes(np.asarray(loc, np.float32).reshape(num, num_priors, loc_classes, 4)
                         .transpose(0, 2, 1, 3), priors, code_type, variance_encoded_in_target)
    scores = np.asarray(conf, np.float32).reshape(num, num_priors, num_classes)
    threshold = -np.finfo(np.float32).max if confidence_threshold is None \
        else confidence_threshold
    k = -1 if top_k is None else int(top_k)
    rows = []
    for i in range(num):
        kept: dict[int, list[int]] = {}
        for c in range(num_classes):
            if c == background_label_id:
                continue
            kept[c] = nms(boxes[i, 0 if share_location else c], scores[i, :, c], threshold,
                          nms_threshold, eta, k)
        if keep_top_k > -1 and sum(len(v) for v in kept.values()) > keep_top_k:
            ranked = sorted(((scores[i, idx, c], c, idx) for c in sorted(kept)
                             for idx in kept[c]), key=lambda t: -t[0])[:keep_top_k]
            kept = {}
            for _, c, idx in ranked:
                kept.setdefault(c, []).append(idx)
        for c in sorted(kept):
            for idx in kept[c]:
                box = boxes[i, 0 if share_location else c, idx]
                rows.append([i, c, scores[i, idx, c], *box])
    if not rows:
        out = np.full((1, 1, num, 7), -1, np.float32)
        out[0, 0, :, 0] = np.arange(num)
        return out
    return np.asarray(rows, np.float32).reshape(1, 1, -1, 7)
