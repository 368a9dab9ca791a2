"""Element-wise layers and normalisations that keep their bottom's shape.

Neurons (ReLU with ``negative_slope``, ReLU6, PReLU with per-channel or shared
slopes, Sigmoid, TanH, ELU, Clip, Swish, Power, AbsVal, BNLL, Exp, Log,
Threshold), Dropout (the identity at test time), and LRN, MVN, Softmax.

ReLU6, Clip and Threshold have a numpy ``forward`` (verify runs it where OpenCV
lacks the type: OpenCV 4.x's Caffe importer has no Clip or Threshold).
"""
from __future__ import annotations

import numpy as np

from ..graph import Layer
from .registry import need, register, shape_rule

NEURONS = ("ReLU", "ReLU6", "Sigmoid", "TanH", "ELU", "Clip", "Swish", "Power", "AbsVal", "BNLL",
           "Exp", "Log", "Threshold")
"""Types that compute each output value from the input value at the same place."""
MPS_NEURONS = ("ReLU", "ReLU6", "PReLU", "Sigmoid", "TanH", "ELU", "Clip")
"""Activations an app runs as the MPS neuron of the kernel before them (MPSCNNNeuron*)."""


def same_shape(layer: Layer, ins: list):
    """One top (or several) shaped like the first bottom, no parameter blobs."""
    (x,) = need(ins, 1)[:1]
    return [x] * len(layer.tops), []


def _relu6(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    """min(max(x, 0), 6)."""
    return [np.minimum(np.maximum(np.asarray(xs[0]), 0), 6)]


def _clip(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    """BVLC Caffe's Clip: min(max(x, clip_param.min), clip_param.max) (both required)."""
    p = layer.params.get("clip_param", {})
    if "min" not in p or "max" not in p:
        raise ValueError("Clip: clip_param needs both min and max")
    x = np.asarray(xs[0])
    return [np.clip(x, p["min"], p["max"]).astype(x.dtype)]


def _threshold(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    """BVLC Caffe's Threshold: 1 where x > threshold_param.threshold (default 0), else 0."""
    t = float(layer.params.get("threshold_param", {}).get("threshold", 0.0))
    x = np.asarray(xs[0])
    return [(x > t).astype(x.dtype)]


_FORWARD = {"ReLU6": _relu6, "Clip": _clip, "Threshold": _threshold}
for _name in (*NEURONS, "Dropout", "LRN", "MVN", "Softmax"):
    register(_name, shape=same_shape, forward=_FORWARD.get(_name))


@shape_rule("PReLU")
def _prelu(layer, ins):
    (x,) = need(ins, 1)[:1]
    shared = layer.params.get("prelu_param", {}).get("channel_shared", False)
    return [x], [(1,) if shared else (x[1],)]
