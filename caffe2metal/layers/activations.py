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
from .registry import axis_index, need, register, register_plan, shape_rule

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


def _neuron_plan(layer: Layer, ctx) -> dict:
    """The MPSCNNNeuron* of an element-wise layer (MPSCNNNeuron.h: ReLU ``x<0 ? a*x : x``,
    ReLUN ``min(x<0 ? a*x : x, b)``, TanH ``a*tanh(b*x)``, ELU ``x<0 ? a*(e^x-1) : x``,
    Power ``(a*x+b)^c``, Exponential ``c^(a*x+b)``, Logarithm ``log_c(a*x+b)``); what has
    no neuron (Clip with a lower bound other than 0, Swish, BNLL, Threshold) is an app op."""
    p = layer.params
    t = layer.type

    def neuron(kind: str, **abc) -> dict:
        return {"mps": {"kernel": f"MPSCNNNeuron{kind}", "neuronType": kind,
                        **{k: float(v) for k, v in abc.items()}},
                "mpsgraph": {"op": kind.lower()}}
    if t == "ReLU":
        return neuron("ReLU", a=p.get("relu_param", {}).get("negative_slope", 0.0))
    if t == "ReLU6":
        return neuron("ReLUN", a=0.0, b=6.0)
    if t in ("Sigmoid", "AbsVal"):
        return neuron("Sigmoid" if t == "Sigmoid" else "Absolute")
    if t == "TanH":
        return neuron("TanH", a=1.0, b=1.0)
    if t == "ELU":
        return neuron("ELU", a=p.get("elu_param", {}).get("alpha", 1.0))
    if t == "Clip" and p.get("clip_param", {}).get("min") == 0:
        return neuron("ReLUN", a=0.0, b=p["clip_param"]["max"])
    if t == "Power":
        q = p.get("power_param", {})
        return neuron("Power", a=q.get("scale", 1.0), b=q.get("shift", 0.0),
                      c=q.get("power", 1.0))
    if t in ("Exp", "Log"):
        q = p.get("exp_param" if t == "Exp" else "log_param", {})
        base = q.get("base", -1.0)
        return neuron("Exponential" if t == "Exp" else "Logarithm", a=q.get("scale", 1.0),
                      b=q.get("shift", 0.0), c=float(np.e) if base == -1 else base)
    if t in _OWN_PLAN:
        return _OWN_PLAN[t](layer, ctx)
    if t == "Dropout":
        return {"app": {"op": "identity", "note": "Dropout is the identity at test time"}}
    if t == "Clip":
        q = p.get("clip_param", {})
        return {"app": {"op": "clip", "min": q.get("min"), "max": q.get("max")}}
    if t == "Softmax":
        q = p.get("softmax_param", {})
        shape = ctx.shape(layer.bottoms[0])
        axis = axis_index(q.get("axis", 1), len(shape))
        if len(shape) == 4 and axis == 1:
            # MPSCNNSoftMax normalises across all feature channels of a pixel.
            return {"mps": {"kernel": "MPSCNNSoftMax"}, "mpsgraph": {"op": "softMax", "axis": 1}}
        return {"app": {"op": "softmax", "axis": axis, "note": (
            "softmax along this axis of the Caffe-shaped (row-major) blob; MPSCNNSoftMax "
            "normalises across ALL channels of a pixel, so it cannot do this directly")}}
    return {"app": {"op": t.lower(), "note": f"Caffe's {t}: no MPS neuron; element-wise"}}


def _prelu_plan(layer: Layer, ctx) -> dict:
    """MPSCNNNeuronPReLU with the slopes file written for the exported layer this PReLU
    follows (``layers[].activation.slopes``); a PReLU after anything else has none."""
    p = layer.params
    src = next((e for e in ctx.entries.values()
                if (e.get("activation") or {}).get("layer") == layer.name), None)
    slopes = (src or {}).get("activation", {}).get("slopes")
    shared = bool(p.get("prelu_param", {}).get("channel_shared", False))
    if slopes is None:
        return {"app": {"op": "unavailable", "reason": "PReLU slopes have no Metal file "
                        "(it does not follow an exported layer; see metal.skipped)"}}
    return {"mps": {"kernel": "MPSCNNNeuronPReLU", "neuronType": "PReLU",
                    "slopes": slopes, "channelShared": shared,
                    "note": "y = x < 0 ? a[c]*x : x, a[c] from the slopes file "
                            "(one value for every channel when channelShared)"},
            "mpsgraph": {"op": "PReLU"}}


def _lrn_plan(layer: Layer, ctx) -> dict:
    """Caffe's LRN as an app op with every parameter."""
    p = layer.params
    q = p.get("lrn_param", {})
    region = q.get("norm_region", "ACROSS_CHANNELS")
    app = {"op": "lrn", "local_size": int(q.get("local_size", 5)),
           "alpha": float(q.get("alpha", 1.0)), "beta": float(q.get("beta", 0.75)),
           "k": float(q.get("k", 1.0)),
           "norm_region": "WITHIN_CHANNEL" if region in ("WITHIN_CHANNEL", 1)
           else "ACROSS_CHANNELS",
           "note": "Caffe's LRN (lrn_layer.cpp): ACROSS_CHANNELS y = x / (k + alpha/n * "
                   "sum of x^2 over the n channels centred on c, zero beyond the "
                   "image's channels)^beta; WITHIN_CHANNEL the same over an n x n window "
                   "of the channel (pad (n-1)/2, divided by n^2)"}
    return {"app": app}


_OWN_PLAN = {"PReLU": _prelu_plan, "LRN": _lrn_plan}
register_plan(*NEURONS, "PReLU", "Dropout", "Softmax", "LRN", plan=_neuron_plan)
