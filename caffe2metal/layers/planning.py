"""Helpers the families' ``plan`` roles share: the op of a layer with a Metal weight file.

A layer with weights is the MPS kernel of its manifest entry (``layers[]``, by
name): the kernel class is ``mps.KINDS[kind].mps_kernel``; the geometry is
Caffe's turned into MPS's with ``mps.geometry`` (sources cited there).
"""
from __future__ import annotations

from .. import mps
from ..graph import Layer
from ..mps.geometry import mps_offset
from .registry import PlanContext


def xy(h: int, w: int) -> dict:
    """An MPS (x, y) pair from Caffe's (h, w)."""
    return {"x": int(w), "y": int(h)}


def destination(shape: tuple) -> dict:
    """An MPSImage's size from a Caffe NCHW shape (feature channels, height, width)."""
    c, h, w = (list(shape) + [1, 1, 1])[1:4]
    return {"featureChannels": int(c), "height": int(h), "width": int(w)}


def window(kernel, stride, pad, dilation=(1, 1)) -> dict:
    """MPSCNNKernel's window parameters for Caffe's explicit zero padding."""
    return {"kernelSize": xy(*kernel), "stride": xy(*stride), "dilation": xy(*dilation),
            "offset": xy(mps_offset(kernel[0], pad[0], dilation[0]),
                         mps_offset(kernel[1], pad[1], dilation[1]))}


def explicit_pads(pad) -> dict:
    """MPSGraph's explicit padding (top, bottom, left, right) for Caffe's symmetric pad."""
    return {"paddingStyle": "explicit", "top": int(pad[0]), "bottom": int(pad[0]),
            "left": int(pad[1]), "right": int(pad[1])}


def weighted(layer: Layer, ctx: PlanContext) -> dict:
    """The op of a layer written to ``metal/`` (its manifest entry names the files)."""
    entry = ctx.entries.get(layer.name)
    if entry is None:
        return {"app": {"op": "unavailable", "reason": "its weights have no Metal file "
                        "(see metal.skipped)"}}
    kind = entry["kind"]
    top = ctx.shape(layer.tops[0]) if layer.tops else ()
    op: dict = {"kernel": mps.KINDS[kind].mps_kernel, "entry": entry["name"], "kind": kind,
                "destination": destination(top)}
    graph: dict = {}
    if kind in ("convolution", "depthwise_convolution", "convolution_transpose"):
        op.update(window(entry["kernel"], entry["stride"], entry["pad"], entry["dilation"]))
        op.update(edgeMode="zero", groups=entry["groups"])
        graph = {**explicit_pads(entry["pad"]), "weightsLayout": "OIHW",
                 "weights": "the merged caffemodel's blob (Caffe's own layout)"}
        if kind == "convolution_transpose":
            op["kernelOffset"] = {"x": 0, "y": 0}
            op["note"] = ("derived: offset and kernelOffset as for the equivalent zero-inserted "
                          "convolution (kernel flipped in the weight file)")
    elif kind == "fully_connected":
        op["kernel"] = "MPSCNNFullyConnected"
        op["offset"] = xy(*(d // 2 for d in entry["kernel"])) if entry["kernel"] else xy(0, 0)
        graph = {"op": "matrixMultiplication", "weights": "[out][C*H*W] in Caffe's C,H,W order"}
    return {"mps": op, **({"mpsgraph": graph} if graph else {})}
