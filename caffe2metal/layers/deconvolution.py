"""Deconvolution: the adjoint of a (grouped) Convolution.

W [in][out/group][kH][kW] (output channels on axis 1 of W), b [out].
Shape (Caffe): ``out = stride*(in-1) + dilation*(k-1) + 1 - 2*pad`` per axis.
Fold: W' = W * k along axis 1, per group (row r of W, an input channel, is in
group r // (in/group)).  Metal export: ``convolution_transpose``, kernel flipped
and in/out swapped per group (``mps.deconv_weights``); written dense when a
group's channel count is not a multiple of 4.
"""
from __future__ import annotations

import math

import numpy as np

from .. import mps
from ..graph import Layer
from .convolution import base_conv_shape, check_2d, conv_geometry, dense, geometry, mps_groups
from .convolution import conv_param as _param
from .planning import weighted
from .registry import Producer, register, register_plan


def _shape(layer: Layer, ins: list):
    return base_conv_shape(layer, ins, transpose=True)


def _multiplier(layer: Layer, w: np.ndarray, k: np.ndarray) -> np.ndarray:
    group = _param(layer).get("group", 1)
    cin, per = w.shape[0], w.shape[1]
    # row r of W (an input channel) is in group r // (cin/group): per-row factors
    return np.repeat(k.reshape(group, 1, per), cin // group, axis=1).reshape(
        (cin, per) + (1,) * (w.ndim - 2))


def _check(layer: Layer, w: np.ndarray) -> str | None:
    group = _param(layer).get("group", 1)
    if group <= 0 or w.shape[0] % group:
        return f"weights have {w.shape[0]} input channels, not divisible by group {group}"
    return None


PRODUCER = Producer(
    param_key="convolution_param", weight_axes=tuple(range(3, 33)),
    output_channels=lambda layer: layer.blobs[0].shape[1] * _param(layer).get("group", 1),
    multiplier=_multiplier, check=_check,
    fan_in=lambda layer, shape: math.prod(shape[1:]))


def _export(layer: Layer, in_shape) -> dict:
    w, geo = check_2d(layer)
    group = int(_param(layer).get("group", 1))
    cin, cout = w.shape[0], w.shape[1] * group
    arr = mps.deconv_weights(np.asarray(w), group)
    if not mps_groups(cin, cout, group):
        return geometry("convolution_transpose", dense(arr, group, layer.name), geo, 1, group,
                        cin, cout)
    return geometry("convolution_transpose", arr, geo, group, None, cin, cout)


# ---------------------------------------------------------------- Caffe reference

def scatter(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, group: int,
            kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
            dilation: tuple[int, int]) -> np.ndarray:
    """Caffe Deconvolution on x [C][H][W] with W [C][out/g][kH][kW]: scatter-add, then crop pad."""
    c, h, wd = x.shape
    _, og, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    full_h, full_w = sh * (h - 1) + dh * (kh - 1) + 1, sw * (wd - 1) + dw * (kw - 1) + 1
    xg = x.reshape(group, c // group, h, wd)
    wg = w.reshape(group, c // group, og, kh, kw)
    y = np.zeros((group, og, full_h, full_w))
    for i in range(kh):
        for j in range(kw):
            y[:, :, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (wd - 1) + 1:sw] += \
                np.einsum("gchw,gco->gohw", xg, wg[:, :, :, i, j])
    y = y.reshape(group * og, full_h, full_w)[:, ph:full_h - ph, pw:full_w - pw]
    return y if bias is None else y + bias[:, None, None]


def _reference(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Caffe's Deconvolution on one item x [C][H][W] (float64), from the layer's blobs."""
    p = _param(layer)
    w = np.asarray(layer.blobs[0], np.float64)
    bias = np.asarray(layer.blobs[1], np.float64).reshape(-1) if len(layer.blobs) > 1 else None
    return scatter(x, w, bias, int(p.get("group", 1)), **conv_geometry(p, 2))


register("Deconvolution", shape=_shape, producer=PRODUCER, export=_export, reference=_reference)


register_plan("Deconvolution", plan=weighted)
