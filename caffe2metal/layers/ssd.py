"""SSD's layers: PriorBox, Normalize, DetectionOutput (weiliu89/caffe).

PriorBox's output depends only on the feature map's and the image's sizes and
its parameters (``priorbox.prior_boxes``): [1][2][H*W*priors_per_cell*4].
Normalize (L2 across channels, then a per-channel or shared scale) has one
blob, its scale: [C], or [1] when channel_shared (Caffe's blob is then 0-D).
DetectionOutput's row count depends on the data: [1][1][?][7].
"""
from __future__ import annotations

import math

import numpy as np

from .priorbox import MAX_PRIORS, prior_boxes, priors_per_cell
from .registry import need, register_plan, shape_rule
from .structure import Refused


def _priorbox_forward(layer, xs: list) -> list:
    """Caffe SSD's PriorBox top [1][2][H*W*P*4] from the feature map's and the image's
    sizes (``priorbox.prior_boxes``; the values of the bottoms are not read)."""
    feat, image = (np.shape(x) for x in xs[:2])
    return [prior_boxes(feat[2:4], image[2:4], **layer.params.get("prior_box_param", {}))[None]]


@shape_rule("PriorBox", forward=_priorbox_forward)
def _priorbox(layer, ins):
    feat = need(ins, 1)[0]
    per_cell = priors_per_cell(**layer.params.get("prior_box_param", {}))
    if len(feat) != 4:
        raise Refused("bottom", f"PriorBox needs a 4-D feature map, has shape {list(feat)}")
    count = feat[2] * feat[3] * per_cell
    if count > MAX_PRIORS:          # checked before priors.dat is computed
        raise Refused("prior_box_param.min_size", f"{feat[2]}x{feat[3]} cells x {per_cell} "
                      f"priors per cell = {count} priors, more than {MAX_PRIORS}")
    return [(1, 2, count * 4)], []


@shape_rule("Normalize")
def _normalize(layer, ins):
    (x,) = need(ins, 1)[:1]
    shared = layer.params.get("norm_param", {}).get("channel_shared", True)
    return [x], [(1,) if shared else (x[1],)]


@shape_rule("DetectionOutput")
def _detection_output(layer, ins):
    """SSD's detection_output_layer.cpp LayerSetUp: ``CHECK(has_num_classes()) << "Must
    specify num_classes"`` (0 classes can match no confidence input: Reshape's
    ``CHECK_EQ(num_priors_ * num_classes_, bottom[1]->channels())``),
    ``CHECK_GE(nms_threshold_, 0.)``, ``CHECK_GT(eta_, 0.)``, ``CHECK_LE(eta_, 1.)``."""
    p = layer.params.get("detection_output_param", {})
    classes = p.get("num_classes")
    if classes is None or classes <= 0:
        raise Refused("detection_output_param.num_classes", "must be set and positive "
                      f"(is {classes})")
    nms = p.get("nms_param", {})
    threshold = nms.get("nms_threshold", 0.3)
    if not (math.isfinite(threshold) and threshold >= 0):
        raise Refused("detection_output_param.nms_param.nms_threshold",
                      f"{threshold} must be finite and non-negative")
    eta = nms.get("eta", 1.0)
    if not 0 < eta <= 1:
        raise Refused("detection_output_param.nms_param.eta", f"{eta} must be in (0, 1]")
    return [(1, 1, None, 7)], []


def _plan(layer, ctx) -> dict:
    """PriorBox is a constant (its columns of ``priors.dat``), or, where the net's priors
    are not SSD's (no priors.dat: FaceBoxes), Caffe's PriorBox computed from the sizes;
    Normalize and DetectionOutput are app code with Caffe's semantics
    (``_normalize_plan``, ``layers.detection``)."""
    if layer.type == "PriorBox":
        ssd = ctx.ssd or {}
        start = 0
        for head in ssd.get("heads", []):
            count = head["num_priors"] * 4
            if head["priorbox"] == layer.name:
                return {"app": {"op": "constant", "file": ssd["priors"]["file"],
                                "columns": [start, count],
                                "note": "priors.dat [2][num_priors*4]: this layer's output "
                                        "[1][2][count] is columns start..start+count of "
                                        "both rows"}}
            start += count
        return {"app": {"op": "prior_box", "caffe_type": "PriorBox", "params": layer.params,
                        "note": "no priors.dat (see metal.skipped): Caffe SSD's PriorBox "
                                "(prior_box_layer.cpp) computed from the feature map's and "
                                "the image's heights and widths alone; a constant for a "
                                "fixed input size"}}
    if layer.type == "Normalize":
        return _normalize_plan(layer, ctx)
    det = (ctx.ssd or {}).get("detection_output")
    if det is None:
        return {"app": {"op": "unavailable", "reason": "DetectionOutput without SSD priors "
                        "(see metal.skipped)"}}
    return {"app": {"op": "detection_output", "params": det,
                    "note": "bottoms: loc, conf (softmaxed), priors; decode each prior's box, "
                            "per-class NMS, keep_top_k (caffe2metal.layers.detection)"}}


def _normalize_plan(layer, ctx) -> dict:
    """weiliu89's normalize_layer.cpp Forward_cpu as an app op: y = x / sqrt(s + eps) * scale,
    s the sum of x^2 over the channels of each pixel (over C, H and W when across_spatial),
    eps added before the square root as Caffe does; the scale file from ``metal.normalize``.
    MPS has no kernel for it (MPSCNNCrossChannelNormalization is LRN's centred window)."""
    q = layer.params.get("norm_param", {})
    scale = ctx.scales.get(layer.name)
    if scale is None:
        return {"app": {"op": "unavailable", "reason": "Normalize without a scale file (no "
                        "learned scale blob)"}}
    return {"app": {"op": "normalize", "across_spatial": bool(q.get("across_spatial", True)),
                    "channel_shared": bool(q.get("channel_shared", True)),
                    "eps": q.get("eps", 1e-10), "scale": scale,
                    "note": "y = x / sqrt(sum of x^2 + eps) * scale[c] (scale[0] when "
                            "channel_shared); the sum is over the channels of each pixel, or "
                            "over the whole C x H x W blob when across_spatial.  No single MPS "
                            "kernel: app code (a compute shader), or MPS pieces: MPSCNNMultiply "
                            "(x*x), MPSNNReduceFeatureChannelsSum, MPSCNNNeuronPower (a=1, "
                            "b=eps, c=-0.5), MPSCNNMultiply by that one-channel image broadcast "
                            "over the channels, then the scale (a depthwise 1x1 convolution); "
                            "across_spatial also needs a spatial sum (MPSNNReduceRowSum, "
                            "MPSNNReduceColumnSum); that composition is not run on a GPU here"}}


register_plan("PriorBox", "Normalize", "DetectionOutput", plan=_plan)
