"""Element-wise layers and normalisations that keep their bottom's shape.

Neurons (ReLU with ``negative_slope``, ReLU6, PReLU with per-channel or shared
slopes, Sigmoid, TanH, ELU, Clip, Swish, Power, AbsVal, BNLL, Exp, Log,
Threshold), Dropout (the identity at test time), and LRN, MVN, Softmax.
"""
from __future__ import annotations

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


register(*NEURONS, "Dropout", "LRN", "MVN", "Softmax", shape=same_shape)


@shape_rule("PReLU")
def _prelu(layer, ins):
    (x,) = need(ins, 1)[:1]
    shared = layer.params.get("prelu_param", {}).get("channel_shared", False)
    return [x], [(1,) if shared else (x[1],)]
