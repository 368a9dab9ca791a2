"""SSD's layers: PriorBox, Normalize, DetectionOutput (weiliu89/caffe).

PriorBox's output depends only on the feature map's and the image's sizes and
its parameters (``priorbox.prior_boxes``): [1][2][H*W*priors_per_cell*4].
Normalize (L2 across channels, then a per-channel or shared scale) has one
blob.  DetectionOutput's row count depends on the data: [1][1][?][7].
"""
from __future__ import annotations

from .priorbox import priors_per_cell
from .registry import need, shape_rule


@shape_rule("PriorBox")
def _priorbox(layer, ins):
    feat = need(ins, 1)[0]
    per_cell = priors_per_cell(**layer.params.get("prior_box_param", {}))
    return [(1, 2, feat[2] * feat[3] * per_cell * 4)], []


@shape_rule("Normalize")
def _normalize(layer, ins):
    (x,) = need(ins, 1)[:1]
    shared = layer.params.get("norm_param", {}).get("channel_shared", True)
    return [x], [(1,) if shared else (x[1],)]


@shape_rule("DetectionOutput")
def _detection_output(layer, ins):
    return [(1, 1, None, 7)], []
