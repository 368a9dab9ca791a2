"""A manifest layer computed the way Caffe defines it, in plain numpy from the original blobs.

verify's second opinion when OpenCV and the Metal files disagree (see
``layers._second_opinion``).
"""
from __future__ import annotations

import numpy as np

from .. import fold
from ..graph import Graph


def caffe_reference(graph: Graph, entry: dict, x: np.ndarray) -> np.ndarray:
    """A manifest layer computed the way Caffe defines it, from the ORIGINAL blobs.

    Plain float64 numpy in NCHW (batch item 0), independent of the export
    path: Convolution as a grouped correlation, Deconvolution as its
    scatter-add, InnerProduct as a matrix product, then the folded (or kept)
    BatchNorm/Scale chain as per-channel affines.  verify consults it only
    when OpenCV's output disagrees, to tell a wrong file from a wrong OpenCV.
    """
    from ..net.shapes import conv_geometry
    x = np.asarray(x, np.float64)[0]
    if entry["kind"] == "channel_affine":
        chain = [graph.layer(n) for n in entry["chain"]]
        y = x
    else:
        layer = graph.layer(entry["name"])
        chain = [graph.layer(n) for n in entry["folded"]]
        w = np.asarray(layer.blobs[0], np.float64)
        has_bias = len(layer.blobs) > 1
        if layer.type == "InnerProduct":
            p = layer.params.get("inner_product_param", {})
            w = w.reshape(w.shape[-2], w.shape[-1])
            w = w.T if p.get("transpose", False) else w
            y = w @ x.reshape(-1)
            if has_bias:
                y = y + np.asarray(layer.blobs[1], np.float64).reshape(-1)
        else:
            p = layer.params.get("convolution_param", {})
            geo = conv_geometry(p, 2)
            if layer.type == "ConvolutionDepthwise":
                group = x.shape[0]
            else:
                group = int(p.get("group", 1))
            bias = np.asarray(layer.blobs[1], np.float64).reshape(-1) if has_bias else None
            if layer.type == "Deconvolution":
                y = _caffe_deconv(x, w, bias, group, **geo)
            else:
                y = _caffe_conv(x, w, bias, group, **geo)
    if chain:
        k, c = fold.chain_affine(graph, chain)
        shape = (-1,) + (1,) * (y.ndim - 1)
        y = y * k.reshape(shape) + c.reshape(shape)
    return y[None]


def _caffe_conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, group: int,
                kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                dilation: tuple[int, int]) -> np.ndarray:
    """Caffe Convolution on x [C][H][W] with W [out][C/g][kH][kW] -> [out][H'][W']."""
    c, h, wd = x.shape
    out, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw))).reshape(group, cg, h + 2 * ph, wd + 2 * pw)
    wg = w.reshape(group, out // group, cg, kh, kw)
    y = np.zeros((group, out // group, ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                       j * dw:j * dw + sw * (wo - 1) + 1:sw]
            y += np.einsum("gchw,goc->gohw", patch, wg[:, :, :, i, j])
    y = y.reshape(out, ho, wo)
    return y if bias is None else y + bias[:, None, None]


def _caffe_deconv(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, group: int,
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
