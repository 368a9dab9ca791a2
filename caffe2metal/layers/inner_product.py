"""InnerProduct: a matrix product over the bottom flattened from ``axis``.

W [out][K] ([K][out] with ``transpose: true``), b [out]; K is the bottom's
C*H*W from ``axis`` (default 1).  Old caffemodels store W as [1][1][out][K].
Fold: W' = W * k per output channel (rows, or columns when transposed).
Metal export: ``fully_connected``, W laid out [out][H][W][C] of the bottom
(the MPS kernel covers the whole source image), so only ``axis: 1`` exports.
"""
from __future__ import annotations

import math

import numpy as np

from .. import mps
from ..errors import ExportError
from ..graph import Layer
from ..mps.rows import layout
from .planning import weighted
from .registry import Producer, axis_index, need, register, register_plan


def _param(layer: Layer) -> dict:
    return layer.params.get("inner_product_param", {})


def _shape(layer: Layer, ins: list):
    (x,) = need(ins, 1)[:1]
    p = _param(layer)
    axis = axis_index(p.get("axis", 1), len(x))
    k = math.prod(x[axis:])
    num_output = p["num_output"]
    params: list[tuple] = [(k, num_output) if p.get("transpose", False) else (num_output, k)]
    if p.get("bias_term", True):
        params.append((num_output,))
    return [x[:axis] + (num_output,)], params


def _legacy(w: np.ndarray) -> np.ndarray:
    """Legacy (1, 1, out, in) weights as (out, in) (Caffe's Blob::ShapeEquals)."""
    return w.reshape(w.shape[2:]) if w.ndim == 4 and w.shape[:2] == (1, 1) else w


def _multiplier(layer: Layer, w: np.ndarray, k: np.ndarray) -> np.ndarray:
    if _param(layer).get("transpose", False):
        return k.reshape(1, -1)                 # the same factors for every row
    return k.reshape((-1,) + (1,) * (w.ndim - 1))


def _fan_in(layer: Layer, shape: tuple) -> int:
    if len(shape) < 2:
        return math.prod(shape[1:])
    return shape[0] if _param(layer).get("transpose") else shape[1]


PRODUCER = Producer(
    param_key="inner_product_param", weight_axes=(2,),
    output_channels=lambda layer: layer.blobs[0].shape[
        1 if _param(layer).get("transpose", False) else 0],
    multiplier=_multiplier, normalize=_legacy, fan_in=_fan_in)


def _export(layer: Layer, in_shape) -> dict:
    p = _param(layer)
    axis = p.get("axis", 1)
    if in_shape is not None and axis < 0:
        axis += len(in_shape)
    if axis != 1:
        raise ExportError("inner_product_param.axis is not 1: MPSCNNFullyConnected reads the "
                          "whole image", layer=layer.name)
    if in_shape is None or any(d is None for d in in_shape):
        raise ExportError("the shape of its input is unknown (an earlier layer's type or fields "
                          "are not known), so its weights cannot be laid out as [out][H][W][C]",
                          layer=layer.name)
    if len(in_shape) == 2:
        chw = (in_shape[1], 1, 1)
    elif len(in_shape) == 4:
        chw = tuple(in_shape[1:])
    else:
        raise ExportError(f"input shape {list(in_shape)} is neither N,C nor N,C,H,W",
                          layer=layer.name)
    w = layer.blobs[0]                                  # an array or folded lazily
    transpose = bool(p.get("transpose", False))
    if transpose:
        w = np.asarray(w)
    try:
        if w.ndim == 2:
            rows = w.T if transpose else w              # [out][K]
            arr = layout((rows.shape[0], chw[1], chw[2], chw[0]), rows,
                         lambda r: mps.fc_weights(r, chw))
        else:
            arr = mps.fc_weights(w, chw, transpose=transpose)
    except ValueError as e:
        raise ExportError(str(e), layer=layer.name) from None
    return dict(kind="fully_connected", weights=arr, kernel=[chw[1], chw[2]], stride=[1, 1],
                pad=[0, 0], dilation=[1, 1], groups=1, dense_from_groups=None,
                input_channels=chw[0], output_channels=arr.shape[0])


def _reference(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Caffe's InnerProduct on one item (float64): W @ x flattened, plus the bias."""
    w = np.asarray(layer.blobs[0], np.float64)
    w = w.reshape(w.shape[-2], w.shape[-1])
    w = w.T if _param(layer).get("transpose", False) else w
    y = w @ x.reshape(-1)
    if len(layer.blobs) > 1:
        y = y + np.asarray(layer.blobs[1], np.float64).reshape(-1)
    return y


register("InnerProduct", shape=_shape, producer=PRODUCER, export=_export, reference=_reference)


register_plan("InnerProduct", plan=weighted)
