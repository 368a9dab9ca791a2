"""Caffe's V1 net format (``layers { type: CONVOLUTION }``, 2014-2015).

A V1 net stores its layers as ``V1LayerParameter`` entries (``NetParameter``
field 2, ``layers``) whose type is the ``LayerType`` enum instead of a string.
Both readers upgrade them to modern layers as Caffe's ``UpgradeV1Net`` does:

* the binary caffemodel reader maps the enum number to the modern type string
  with :data:`V1_LAYER_TYPES` (an unknown number gives type ``""``, as proto2
  does: the value lands in unknown fields and the enum reads as ``NONE``);
* the prototxt reader turns each ``V1LayerParameter`` message into a
  ``LayerParameter`` with :func:`upgrade_v1` (name, bottoms, tops, include /
  exclude rules and every ``*_param`` the modern message also has).
"""
from __future__ import annotations

from ..errors import ModelFormatError
from .proto import caffe_pb2

__all__ = ["V1_LAYER_TYPES", "upgrade_v1"]

_LAYER = caffe_pb2.LayerParameter.DESCRIPTOR

# V1LayerParameter.LayerType number -> modern type string.  Numbers from
# BVLC caffe src/caffe/proto/caffe.proto, names from UpgradeV1LayerType in
# src/caffe/util/upgrade_proto.cpp.
V1_LAYER_TYPES: dict[int, str] = {
    0: "",                          # NONE
    1: "Accuracy",
    2: "BNLL",
    3: "Concat",
    4: "Convolution",
    5: "Data",
    6: "Dropout",
    7: "EuclideanLoss",
    8: "Flatten",
    9: "HDF5Data",
    10: "HDF5Output",
    11: "Im2col",
    12: "ImageData",
    13: "InfogainLoss",
    14: "InnerProduct",
    15: "LRN",
    16: "MultinomialLogisticLoss",
    17: "Pooling",
    18: "ReLU",
    19: "Sigmoid",
    20: "Softmax",
    21: "SoftmaxWithLoss",
    22: "Split",
    23: "TanH",
    24: "WindowData",
    25: "Eltwise",
    26: "Power",
    27: "SigmoidCrossEntropyLoss",
    28: "HingeLoss",
    29: "MemoryData",
    30: "ArgMax",
    31: "Threshold",
    32: "DummyData",
    33: "Slice",
    34: "MVN",
    35: "AbsVal",
    36: "Silence",
    37: "ContrastiveLoss",
    38: "Exp",
    39: "Deconvolution",
}


def upgrade_v1(v1: caffe_pb2.V1LayerParameter, path: str) -> caffe_pb2.LayerParameter:
    """The modern ``LayerParameter`` equivalent of a prototxt's V1 layer."""
    layer = caffe_pb2.LayerParameter(name=v1.name, bottom=v1.bottom, top=v1.top)
    if v1.type not in V1_LAYER_TYPES:
        raise ModelFormatError(f"V1 layer type {v1.type} has no modern equivalent",
                               file=path, layer=v1.name)
    layer.type = V1_LAYER_TYPES[v1.type]
    for rule in v1.include:
        layer.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        layer.exclude.add().CopyFrom(rule)
    for fd, value in v1.ListFields():
        if fd.name.endswith("_param") and fd.name in _LAYER.fields_by_name:
            getattr(layer, fd.name).CopyFrom(value)
    return layer
