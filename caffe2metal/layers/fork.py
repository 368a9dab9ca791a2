"""Layer types of popular Caffe forks that BVLC Caffe lacks.

Upsample (YOLO/Darknet ports: ``scale`` or ``upsample_h/w``, nearest
neighbour; SegNet/ENet: a second bottom holds max-pooling indices), Interp
(DeepLab/PSPNet: bilinear, corners aligned), Axpy (SENet: ``bottom0 (N,C,1,1)
* bottom1 + bottom2``), ShuffleChannel (ShuffleNet: a channel permutation);
ReLU6 is in ``activations``.

Each has a ``forward`` role: the fork's definition in plain numpy, which verify
runs inside OpenCV where OpenCV lacks the type (``verification.fork_layers``).
"""
from __future__ import annotations

import numpy as np

from ..graph import Layer
from .activations import same_shape
from .registry import need, register


def _upsample_size(p: dict, h: int, w: int) -> tuple[int, int]:
    if "upsample_h" in p or "upsample_w" in p:
        return int(p.get("upsample_h", h)), int(p.get("upsample_w", w))
    sh = int(p.get("scale_h", p.get("scale", 2)))
    sw = int(p.get("scale_w", p.get("scale", 2)))
    return (h * sh - int(bool(p.get("pad_out_h", False))),
            w * sw - int(bool(p.get("pad_out_w", False))))


def _upsample(layer: Layer, ins: list):
    (x,) = need(ins, 1)[:1]
    p = layer.params.get("upsample_param", {})
    return [tuple(x[:2]) + _upsample_size(p, x[2], x[3])], []


def _upsample_forward(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    """Two definitions share the name.

    One bottom (the Darknet ports, e.g. caffe-yolov3's upsample_layer.cpp):
    nearest neighbour, ``top[h][w] = bottom[h // scale][w // scale]``; with an
    explicit ``upsample_h/w`` the source row is ``h * H // upsample_h``.
    Two bottoms (caffe-segnet's upsample_layer.cpp, used by SegNet and ENet):
    max unpooling, ``top.flat[mask[i]] = bottom[i]`` per (n, c) plane, zero
    elsewhere; ``mask`` holds the flat indices a max Pooling's second top gives.
    """
    x = np.asarray(xs[0])
    n, c, h, w = x.shape
    oh, ow = _upsample_size(layer.params.get("upsample_param", {}), h, w)
    if len(xs) > 1:
        mask = np.asarray(xs[1]).reshape(n, c, -1).astype(np.int64)
        top = np.zeros((n, c, oh * ow), x.dtype)
        np.put_along_axis(top, np.clip(mask, 0, oh * ow - 1), x.reshape(n, c, -1), axis=2)
        return [top.reshape(n, c, oh, ow)]
    p = layer.params.get("upsample_param", {})
    if "upsample_h" in p or "upsample_w" in p:
        rows, cols = np.arange(oh) * h // oh, np.arange(ow) * w // ow
    else:
        rows = np.arange(oh) // int(p.get("scale_h", p.get("scale", 2)))
        cols = np.arange(ow) // int(p.get("scale_w", p.get("scale", 2)))
    return [x[:, :, np.minimum(rows, h - 1)][:, :, :, np.minimum(cols, w - 1)]]


# Interp, as DeepLab's Caffe defines it (George Papandreou's interp; the same code in
# hszhao/PSPNet): src/caffe/layers/interp_layer.cpp (Reshape: the output size) and
# src/caffe/util/interp.cpp (caffe_cpu_interp2: the values).  pad_beg/pad_end may only
# crop (<= 0); the input is the window starting at -pad_beg of height H + pad_beg +
# pad_end ("eff").  Output size: zoom_factor z: eff + (eff - 1)(z - 1); shrink_factor s:
# (eff - 1) // s + 1; both: shrink, then zoom; else height/width.  Values: bilinear with
# corners aligned, source row h2 * (eff_h - 1) / (out_h - 1) (0 when out_h == 1), the
# next row clamped to the last; the ratio is a float32 in Caffe.

def _interp_size(layer: Layer, h: int, w: int) -> tuple[int, int, int]:
    """(crop offset, out_h, out_w) from ``interp_param``."""
    p = layer.params.get("interp_param", {})
    beg, end = int(p.get("pad_beg", 0)), int(p.get("pad_end", 0))
    if beg > 0 or end > 0:
        raise ValueError("Interp: pad_beg/pad_end must be <= 0 (only cropping is defined)")
    eh, ew = h + beg + end, w + beg + end
    zoom, shrink = p.get("zoom_factor"), p.get("shrink_factor")
    if shrink is not None:
        eh, ew = (eh - 1) // int(shrink) + 1, (ew - 1) // int(shrink) + 1
    if zoom is not None:
        oh, ow = eh + (eh - 1) * (int(zoom) - 1), ew + (ew - 1) * (int(zoom) - 1)
    elif shrink is not None:
        oh, ow = eh, ew
    elif "height" in p and "width" in p:
        oh, ow = int(p["height"]), int(p["width"])
    else:
        raise ValueError("Interp: interp_param gives no output size")
    return -beg, oh, ow


def _interp(layer: Layer, ins: list):
    (x,) = need(ins, 1)[:1]
    try:
        _, oh, ow = _interp_size(layer, x[2], x[3])
    except ValueError:
        return [None], []
    return [tuple(x[:2]) + (oh, ow)], []


def _interp_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source index, next index and weight of the next one, for each output position."""
    r = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
    pos = (r * np.arange(n_out, dtype=np.float32)).astype(np.float64)
    i0 = pos.astype(np.int64)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, pos - i0


def _interp_forward(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = np.asarray(xs[0])
    h, w = x.shape[2:]
    off, oh, ow = _interp_size(layer, h, w)
    p = layer.params.get("interp_param", {})
    eh = h + int(p.get("pad_beg", 0)) + int(p.get("pad_end", 0))
    ew = w + int(p.get("pad_beg", 0)) + int(p.get("pad_end", 0))
    src = np.asarray(x[:, :, off:off + eh, off:off + ew], np.float64)
    if (eh, ew) == (oh, ow):
        return [src.astype(x.dtype)]
    r0, r1, a = _interp_axis(eh, oh)
    c0, c1, b = _interp_axis(ew, ow)
    a, b = a[:, None], b[None, :]
    y = ((1 - a) * ((1 - b) * src[:, :, r0][:, :, :, c0] + b * src[:, :, r0][:, :, :, c1])
         + a * ((1 - b) * src[:, :, r1][:, :, :, c0] + b * src[:, :, r1][:, :, :, c1]))
    return [y.astype(x.dtype)]


def _axpy(layer: Layer, ins: list):   # SENet fork: top = bottom0 (N,C,1,1) * bottom1 + bottom2
    xs = need(ins)
    return [xs[1]], []


def _axpy_forward(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    a, x, y = (np.asarray(v) for v in xs[:3])
    n, c = x.shape[:2]
    return [(a.reshape((n, c) + (1,) * (x.ndim - 2)) * x + y).astype(x.dtype)]


def _shuffle_channel_forward(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    """farmingyard/ShuffleNet's shuffle_channel_layer.cpp: output channel j*g + i is
    input channel i*(C/g) + j, i.e. C as (g, C/g), transposed, flattened."""
    x = np.asarray(xs[0])
    g = int(layer.params.get("shuffle_channel_param", {}).get("group", 1))
    n, c = x.shape[:2]
    if c % g:
        raise ValueError(f"ShuffleChannel: {c} channels do not split into {g} groups")
    rest = x.shape[2:]
    return [x.reshape((n, g, c // g) + rest).swapaxes(1, 2).reshape(x.shape)]


register("Upsample", shape=_upsample, forward=_upsample_forward)
register("Interp", shape=_interp, forward=_interp_forward)
register("Axpy", shape=_axpy, forward=_axpy_forward)
register("ShuffleChannel", shape=same_shape, forward=_shuffle_channel_forward)
