"""Layer types of popular Caffe forks that BVLC Caffe lacks.

Upsample (YOLO/Darknet ports: ``scale`` or ``upsample_h/w``), Axpy (SENet:
``bottom0 (N,C,1,1) * bottom1 + bottom2``); ShuffleChannel and ReLU6 keep their
shape (ReLU6: ``activations``).
"""
from __future__ import annotations

from .activations import same_shape
from .registry import need, register, shape_rule


@shape_rule("Upsample")
def _upsample(layer, ins):
    (x,) = need(ins, 1)[:1]
    p = layer.params.get("upsample_param", {})
    if "upsample_h" in p or "upsample_w" in p:
        oh, ow = p.get("upsample_h", x[2]), p.get("upsample_w", x[3])
    else:
        sh = p.get("scale_h", p.get("scale", 2))
        sw = p.get("scale_w", p.get("scale", 2))
        oh = x[2] * sh - int(p.get("pad_out_h", False))
        ow = x[3] * sw - int(p.get("pad_out_w", False))
    return [x[:2] + (oh, ow)], []


@shape_rule("Axpy")
def _axpy(layer, ins):   # SENet fork: top = bottom0 (N,C,1,1) * bottom1 + bottom2
    xs = need(ins)
    return [xs[1]], []


register("ShuffleChannel", shape=same_shape)     # ShuffleNet forks: a channel permutation
