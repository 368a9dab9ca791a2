"""caffe2metal.layers.detection: SSD's DetectionOutput in numpy against OpenCV's layer.

Detections are compared as sets (OpenCV lists them in another order than Caffe:
Caffe by label, then score; OpenCV by score): the same (label, score) rows with
boxes within 1e-5 (both decode in float32; measured up to 4.8e-7 apart).
"""
from __future__ import annotations

import numpy as np
import pytest

from caffe2metal.layers.detection import decode_boxes, detection_output, jaccard, nms

PRIORS, CLASSES = 300, 4


def _opencv(loc, conf, priors, params: str):
    cv2 = pytest.importorskip("cv2")
    text = f"""
input: "loc"
input_shape {{ dim: {loc.shape[0]} dim: {loc.shape[1]} }}
input: "conf"
input_shape {{ dim: {conf.shape[0]} dim: {conf.shape[1]} }}
input: "priors"
input_shape {{ dim: 1 dim: 2 dim: {priors.shape[-1]} }}
layer {{ name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "priors"
  top: "det" detection_output_param {{ {params} }} }}
"""
    net = cv2.dnn.readNetFromCaffe(np.frombuffer(text.encode(), np.uint8))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, x in (("loc", loc), ("conf", conf), ("priors", priors)):
        net.setInput(x, name)
    return np.array(net.forward())


def _inputs(seed, loc_classes=1):
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0.1, 0.9, (PRIORS, 2))
    size = rng.uniform(0.05, 0.4, (PRIORS, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1).reshape(-1)
    variances = np.tile([0.1, 0.1, 0.2, 0.2], PRIORS)
    priors = np.stack([boxes, variances])[None].astype(np.float32)
    loc = rng.normal(0, 1, (1, PRIORS * loc_classes * 4)).astype(np.float32)
    logits = rng.normal(0, 2, (PRIORS, CLASSES))
    conf = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return loc, conf.reshape(1, -1).astype(np.float32), priors


def _as_set(det):
    rows = det.reshape(-1, 7)
    return rows[np.lexsort(rows.T[::-1])]


CASES = {
    "center_size": ("code_type: CENTER_SIZE", {"code_type": "CENTER_SIZE"}),
    "corner": ("code_type: CORNER", {"code_type": "CORNER"}),
    "top_k_keep_top_k": ("code_type: CENTER_SIZE nms_param { nms_threshold: 0.3 top_k: 40 } "
                         "keep_top_k: 25",
                         {"code_type": "CENTER_SIZE", "nms_threshold": 0.3, "top_k": 40,
                          "keep_top_k": 25}),
    "per_class_loc": ("code_type: CENTER_SIZE", {"code_type": "CENTER_SIZE",
                                                 "share_location": False}),
    "background_2": ("code_type: CENTER_SIZE background_label_id: 2",
                     {"code_type": "CENTER_SIZE", "background_label_id": 2}),
    "variance_in_target": ("code_type: CENTER_SIZE variance_encoded_in_target: true",
                           {"code_type": "CENTER_SIZE", "variance_encoded_in_target": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_detections_as_opencv(case):
    text, kwargs = CASES[case]
    loc, conf, priors = _inputs(sorted(CASES).index(case),
                                1 if kwargs.get("share_location", True) else CLASSES)
    kwargs = {"num_classes": CLASSES, "confidence_threshold": 0.2, **kwargs}
    share = "true" if kwargs.get("share_location", True) else "false"
    params = f"num_classes: {CLASSES} share_location: {share} confidence_threshold: 0.2 {text}"
    for field, default in (("background_label_id", 0), ("keep_top_k", 10 * PRIORS)):
        if field not in params:                       # OpenCV wants these spelled out
            params += f" {field}: {default}"
    if "nms_param" not in params:   # OpenCV 4.14 crashes (SIGSEGV) without nms_param.top_k
        params += f" nms_param {{ nms_threshold: 0.45 top_k: {PRIORS} }}"
        kwargs.setdefault("nms_threshold", 0.45)
        kwargs.setdefault("top_k", PRIORS)
    kwargs.setdefault("keep_top_k", 10 * PRIORS)    # (OpenCV 4.14 crashes with -1)
    ours = detection_output(loc, conf, priors, **kwargs)
    # OpenCV wants PriorBox's variances left out when they are encoded in the target
    theirs = _opencv(loc, conf, priors[:, :1] if "variance_encoded" in params else priors,
                     params).reshape(-1, 7)
    theirs = theirs[~(theirs == 0).all(axis=1)]     # OpenCV pads to keep_top_k rows of zeros
    assert ours.shape[2] == len(theirs) > 5
    np.testing.assert_allclose(_as_set(ours), _as_set(theirs), rtol=0, atol=1e-5)


def test_caffe_row_order_and_keep_top_k():
    loc, conf, priors = _inputs(7)
    det = detection_output(loc, conf, priors, num_classes=CLASSES, confidence_threshold=0.2,
                           nms_threshold=0.45, keep_top_k=10, code_type="CENTER_SIZE")[0, 0]
    assert det.shape == (10, 7)
    labels = det[:, 1]
    assert (np.diff(labels) >= 0).all() and 0 not in labels           # by label, no background
    for c in np.unique(labels):
        assert (np.diff(det[labels == c, 2]) <= 0).all()              # best first in a label
    every = detection_output(loc, conf, priors, num_classes=CLASSES, confidence_threshold=0.2,
                             nms_threshold=0.45, code_type="CENTER_SIZE")[0, 0]
    assert sorted(det[:, 2]) == sorted(every[:, 2])[-10:]              # the 10 best overall


def test_no_detection_is_one_row_of_minus_ones():
    loc, conf, priors = _inputs(1)
    det = detection_output(loc, conf, priors, num_classes=CLASSES, confidence_threshold=1.5)
    np.testing.assert_array_equal(det, [[[[0, -1, -1, -1, -1, -1, -1]]]])


def test_nms_definitions():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 1, 0.5], [2, 2, 3, 3], [0.1, 0, 1.1, 1]], np.float32)
    np.testing.assert_allclose(jaccard(boxes[0], boxes[1:]), [0.5, 0, 0.9 / 1.1], rtol=1e-6)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    assert nms(boxes, scores, 0.0, 0.6) == [3, 1, 2]      # 0 overlaps 3 by 0.82 > 0.6
    assert nms(boxes, scores, 0.85, 0.6) == [3]            # only scores above 0.85 compete
    assert nms(boxes, scores, 0.0, 0.6, top_k=2) == [3]    # the 2 best: 0 falls to NMS


def test_decode_center_size_by_hand():
    priors = np.array([[0.2, 0.2, 0.6, 0.4], [0.1, 0.1, 0.2, 0.2]], np.float32).reshape(2, 4)
    loc = np.array([[1.0, -1.0, 0.5, 0.0]], np.float32)
    (box,) = decode_boxes(loc, priors, "CENTER_SIZE")
    cx, cy = 0.1 * 1.0 * 0.4 + 0.4, 0.1 * -1.0 * 0.2 + 0.3
    w, h = np.exp(0.2 * 0.5) * 0.4, 0.2
    np.testing.assert_allclose(box, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], rtol=1e-6)


def test_decode_corner_and_corner_size_by_hand():
    """OpenCV's Caffe importer does not know CORNER_SIZE: Caffe's DecodeBBox by hand."""
    priors = np.array([[0.2, 0.2, 0.6, 0.4], [0.1, 0.1, 0.2, 0.2]], np.float32).reshape(2, 4)
    loc = np.array([[1.0, -1.0, 0.5, 2.0]], np.float32)
    (corner,) = decode_boxes(loc, priors, "CORNER")
    np.testing.assert_allclose(corner, [0.2 + 0.1, 0.2 - 0.1, 0.6 + 0.1, 0.4 + 0.4], rtol=1e-6)
    (corner_size,) = decode_boxes(loc, priors, "CORNER_SIZE")
    w, h = 0.4, 0.2
    np.testing.assert_allclose(corner_size, [0.2 + 0.1 * w, 0.2 - 0.1 * h, 0.6 + 0.2 * 0.5 * w,
                                             0.4 + 0.2 * 2.0 * h], rtol=1e-6)
    (encoded,) = decode_boxes(loc, priors, "CORNER", variance_encoded_in_target=True)
    np.testing.assert_allclose(encoded, [1.2, -0.8, 1.1, 2.4], rtol=1e-6)


def _caffe_apply_nms_fast(boxes, scores, score_threshold, nms_threshold, eta, top_k):
    """bbox_util.cpp's GetMaxScoreIndex + ApplyNMSFast + JaccardOverlap, line by line."""
    pairs = [(float(s), i) for i, s in enumerate(scores) if s > score_threshold]
    pairs.sort(key=lambda p: -p[0])                       # std::stable_sort, descending
    if top_k > -1:
        pairs = pairs[:top_k]

    def size(b):
        return 0.0 if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])

    def overlap(a, b):
        if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
            return 0.0
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        if w > 0 and h > 0:
            return w * h / (size(a) + size(b) - w * h)
        return 0.0

    threshold, kept = nms_threshold, []
    for _, idx in pairs:
        keep = True
        for k in kept:
            if not keep:
                break
            keep = overlap(boxes[idx], boxes[k]) <= threshold
        if keep:
            kept.append(idx)
        if keep and eta < 1 and threshold > 0.5:
            threshold *= eta
    return kept


@pytest.mark.parametrize("eta", [1.0, 0.9, 0.7])
def test_nms_with_eta_is_caffe_s(eta):
    """OpenCV 4.14 ignores nms_param.eta (measured: the same 347 detections with eta 0.9
    as with 1.0, where Caffe keeps 276): the reference here is Caffe's code, transcribed."""
    rng = np.random.default_rng(5)
    centre, size = rng.uniform(0.2, 0.8, (400, 2)), rng.uniform(0.05, 0.3, (400, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 400).astype(np.float32)
    ours = nms(boxes, scores, 0.3, 0.7, eta=eta, top_k=200)
    assert ours == _caffe_apply_nms_fast(boxes.astype(np.float64), scores, 0.3, 0.7, eta, 200)
    if eta < 1:
        assert len(ours) < len(nms(boxes, scores, 0.3, 0.7, eta=1.0, top_k=200))


def test_example_model_detections_equal_opencv_s(tmp_path):
    """The built-in MobileNet-SSD-style example: the numpy DetectionOutput on the heads
    OpenCV computes gives OpenCV's detections (as sets)."""
    cv2 = pytest.importorskip("cv2")
    from caffe2metal.examples import build
    from caffe2metal.export.ssd import _detection_params
    from caffe2metal.net.reader import read_model
    from caffe2metal.verification.opencv import opencv_net, opencv_text
    proto, weights = build(tmp_path)
    model = read_model(proto, weights)
    net = opencv_net(opencv_text(model), weights.read_bytes())
    net.setInput(np.random.default_rng(0).uniform(-1, 1, (1, 3, 300, 300)).astype(np.float32))
    loc, conf, priors, det = (np.array(o) for o in net.forward(
        ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox", "detection_out"]))
    params = _detection_params(model.graph.layer("detection_out"))
    del params["layer"]
    ours = detection_output(loc, conf, priors, **params)
    assert ours.shape == det.shape and ours.shape[2] == 100 and cv2 is not None
    np.testing.assert_allclose(_as_set(ours), _as_set(det), rtol=0, atol=1e-5)
