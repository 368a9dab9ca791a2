"""One numpy function per op kind of the plan, with MPS semantics where the op has ``mps``.

Blob values are batch-1 arrays in Caffe's shapes; an MPS op views its NCHW blob
as the MPSImage it stands for (``[H][W][C]``) and computes what the kernel does
with exactly the plan's parameters: a window starts at ``offset - d*floor(k/2)``
(``mps.geometry.window_start``), ``edgeMode`` zero reads zeros outside the image,
``clamp`` (pooling) ignores them, average pooling divides by the window clipped
to the image grown by ``zeroPadSizeX/Y``, a concatenation writes each source at
its ``destinationFeatureChannelOffset`` (a multiple of 4) into an image of
4-channel slices and reads Caffe's channels back through ``channelMap``.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import Caffe2MetalError
from ..layers.detection import detection_output
from ..mps import KINDS
from ..mps.geometry import SLICE, slices, window_start
from ..mps.kernels import _correlate


class PlanError(Caffe2MetalError):
    """An op of the plan that cannot be executed as written: names the op and the field."""

    def __init__(self, op: str, field: str, message: str):
        super().__init__(f"op {op!r}: {field}: {message}")


def hwc(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32)[0].transpose(1, 2, 0)


def nchw(y: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(y.transpose(2, 0, 1)[None], dtype=np.float32)


def _int(op: dict, m: dict, key: str, sub: str | None = None, low: int | None = None) -> int:
    v = m.get(key) if sub is None else (m.get(key) or {}).get(sub)
    field = f"mps.{key}" + (f".{sub}" if sub else "")
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanError(op["name"], field, f"{v!r} is not an integer")
    if low is not None and v < low:
        raise PlanError(op["name"], field, f"{v} is less than {low}")
    return v


def _geometry(op: dict, m: dict, dilation: bool = True) -> tuple:
    k = (_int(op, m, "kernelSize", "y", 1), _int(op, m, "kernelSize", "x", 1))
    s = (_int(op, m, "stride", "y", 1), _int(op, m, "stride", "x", 1))
    d = (_int(op, m, "dilation", "y", 1), _int(op, m, "dilation", "x", 1)) if dilation \
        else (1, 1)
    o = (_int(op, m, "offset", "y"), _int(op, m, "offset", "x"))
    dst = m.get("destination") or {}
    out = tuple(_int(op, {"d": dst}, "d", a, 1) for a in ("height", "width"))
    return k, s, d, o, out


def _windowed(op: dict, x: np.ndarray, k, s, d, o, out, fill: float) -> np.ndarray:
    """x [H][W][C] padded (with ``fill``) or cropped so that destination pixel (i, j)'s
    window starts at (i*s, j*s)."""
    for axis in (0, 1):
        start = window_start(o[axis], k[axis], d[axis])
        need = (out[axis] - 1) * s[axis] + d[axis] * (k[axis] - 1) + 1
        before = -start
        if before < 0:
            x = x[-before:] if axis == 0 else x[:, -before:]
            before = 0
        after = need - before - x.shape[axis]
        if after < 0:
            x = x[:x.shape[0] + after] if axis == 0 else x[:, :x.shape[1] + after]
            after = 0
        widths = [(0, 0)] * 3
        widths[axis] = (before, after)
        x = np.pad(x, widths, constant_values=fill)
    return x


def weighted(op: dict, m: dict, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MPSCNNConvolution / DepthWise / FullyConnected / ConvolutionTranspose / BatchNorm."""
    kind = m.get("kind")
    x3 = hwc(x)
    if kind in ("convolution", "depthwise_convolution"):
        k, s, d, o, out = _geometry(op, m)
        groups = x3.shape[2] if kind == "depthwise_convolution" else _int(op, m, "groups", None, 1)
        wt = w[..., None] if kind == "depthwise_convolution" else w
        if tuple(wt.shape[1:3]) != k:
            raise PlanError(op["name"], "mps.kernelSize", f"{list(k)} does not match the "
                            f"weights' {list(wt.shape[1:3])}")
        xp = _windowed(op, x3.astype(np.float64), k, s, d, o, out, 0.0)
        try:
            y = _correlate(xp, wt, groups, s, d, out)
        except ValueError as e:
            raise PlanError(op["name"], "mps.groups", str(e)) from None
        return nchw((y + b.astype(np.float64)).astype(np.float32))
    if kind not in KINDS:
        raise PlanError(op["name"], "mps.kind", f"unknown kind {kind!r}")
    entry = op["_entry"]
    return nchw(KINDS[kind].run(entry, x3, w, b))


def pooling(op: dict, m: dict, x: np.ndarray) -> np.ndarray:
    k, s, _, o, out = _geometry(op, m, dilation=False)
    if m.get("edgeMode") != "clamp":
        raise PlanError(op["name"], "mps.edgeMode", f"{m.get('edgeMode')!r}: Caffe's pooling "
                        "ignores pixels outside the image (clamp)")
    x3 = hwc(x).astype(np.float64)
    if m["kernel"] == "MPSCNNPoolingMax":
        xp = _windowed(op, x3, k, s, (1, 1), o, out, -np.inf)
        win = sliding_window_view(xp, k, axis=(0, 1))[::s[0], ::s[1]][:out[0], :out[1]]
        return nchw(win.max(axis=(-2, -1)).astype(np.float32))
    xp = _windowed(op, x3, k, s, (1, 1), o, out, 0.0)
    win = sliding_window_view(xp, k, axis=(0, 1))[::s[0], ::s[1]][:out[0], :out[1]]
    div = average_divisor(op, m, x3.shape[:2])
    return nchw((win.sum(axis=(-2, -1)) / div[:, :, None]).astype(np.float32))


def average_divisor(op: dict, m: dict, hw: tuple) -> np.ndarray:
    """MPSCNNPoolingAverage's divisor per destination pixel [H'][W'] (float64): the window
    clipped to the source grown by ``zeroPadSizeY/X`` on each side."""
    k, s, _, o, out = _geometry(op, m, dilation=False)
    zp = (_int(op, m, "zeroPadSizeY", None, 0), _int(op, m, "zeroPadSizeX", None, 0))
    counts = []
    for axis in (0, 1):
        first = window_start(o[axis], k[axis]) + s[axis] * np.arange(out[axis])
        counts.append(np.minimum(first + k[axis], hw[axis] + zp[axis])
                      - np.maximum(first, -zp[axis]))
    return (counts[0][:, None] * counts[1][None, :]).astype(np.float64)


def neuron(op: dict, m: dict, x: np.ndarray) -> np.ndarray:
    t = m.get("neuronType")
    a, b, c = (float(m.get(k, 0.0)) for k in "abc")
    x = np.asarray(x, np.float64)
    with np.errstate(all="ignore"):
        if t == "ReLU":
            y = np.where(x < 0, a * x, x)
        elif t == "ReLUN":
            y = np.minimum(np.where(x < 0, a * x, x), b)
        elif t == "Sigmoid":
            y = 1 / (1 + np.exp(-x))
        elif t == "TanH":
            y = a * np.tanh(b * x)
        elif t == "ELU":
            y = np.where(x < 0, a * (np.exp(x) - 1), x)
        elif t == "Absolute":
            y = np.abs(x)
        elif t == "Power":
            y = (a * x + b) ** c
        elif t == "Exponential":
            y = c ** (a * x + b)
        elif t == "Logarithm":
            y = np.log(a * x + b) / np.log(c)
        else:
            raise PlanError(op["name"], "mps.neuronType", f"{t!r} is not a neuron run knows")
    return y.astype(np.float32)


def prelu(op: dict, m: dict, x: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    """MPSCNNNeuronPReLU: ``x < 0 ? a[c]*x : x`` (one slope for all channels if shared)."""
    x = np.asarray(x, np.float64)
    check_slopes(op, m, slopes.size, x.shape[1] if x.ndim > 1 else 1)
    a = slopes.astype(np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x < 0, a * x, x).astype(np.float32)


def check_slopes(op: dict, m: dict, n: int, channels: int) -> None:
    if n not in ((1,) if m.get("channelShared") else (channels,)):
        raise PlanError(op["name"], "mps.slopes", f"{n} slopes for {channels} channels")


def scale_by(op: dict, app: dict, x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Caffe's Scale with two bottoms: x * s, s lined up with x's dimensions from ``axis``."""
    x, s = np.asarray(x, np.float64), np.asarray(s, np.float64)
    return (x * s.reshape(scale_by_shape(op, app, x.shape, s.shape))).astype(np.float32)


def scale_by_shape(op: dict, app: dict, x_shape: tuple, s_shape: tuple) -> tuple:
    """The shape the second bottom takes to broadcast against the first (Caffe's ``axis``)."""
    axis = app.get("axis")
    dims = list(s_shape)
    while dims and dims[-1] == 1 and len(dims) > 1:        # trailing 1s as Caffe allows
        dims.pop()
    ndim = len(x_shape)
    if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis <= ndim - len(dims) \
            or tuple(x_shape[axis:axis + len(dims)]) != tuple(dims):
        raise PlanError(op["name"], "app.axis", f"{axis!r}: {list(s_shape)} does not line up "
                        f"with {list(x_shape)}")
    return (1,) * axis + tuple(dims) + (1,) * (ndim - axis - len(dims))


def lrn(op: dict, app: dict, x: np.ndarray) -> np.ndarray:
    """Caffe's LRN (lrn_layer.cpp): ``x / (k + alpha/n * sum of x^2 over the window)^beta``;
    the window is n channels centred on c (ACROSS_CHANNELS) or n x n pixels of the channel
    (WITHIN_CHANNEL, zero padded, the sum divided by n^2 there too)."""
    n, alpha, beta, k, across = lrn_params(op, app)
    x = np.asarray(x, np.float64)
    half = (n - 1) // 2
    sq = x * x
    if across:
        padded = np.pad(sq, [(0, 0), (half, half)] + [(0, 0)] * (x.ndim - 2))
        total = sum(padded[:, i:i + x.shape[1]] for i in range(n))
        scale = k + alpha / n * total
    else:
        padded = np.pad(sq, [(0, 0), (0, 0), (half, half), (half, half)])
        win = sliding_window_view(padded, (n, n), axis=(2, 3))
        scale = k + alpha / (n * n) * win.sum(axis=(-2, -1))
    return (x / scale ** beta).astype(np.float32)


def lrn_params(op: dict, app: dict) -> tuple[int, float, float, float, bool]:
    """LRN's local_size (odd), alpha, beta, k, and whether the window runs across channels."""
    try:
        n, alpha = int(app["local_size"]), float(app["alpha"])
        beta, k = float(app["beta"]), float(app.get("k", 1.0))
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(op["name"], "app", f"LRN parameters: {e}") from None
    if n < 1 or n % 2 == 0:
        raise PlanError(op["name"], "app.local_size", f"{n} is not a positive odd number")
    return n, alpha, beta, k, app.get("norm_region", "ACROSS_CHANNELS") == "ACROSS_CHANNELS"


def normalize(op: dict, app: dict, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """SSD's Normalize (weiliu89's normalize_layer.cpp): ``x / sqrt(sum of x^2 + eps)`` with
    the sum over the channels of each pixel (over the whole C x H x W blob when
    ``across_spatial``), times ``scale[c]`` (``scale[0]`` for every channel if
    ``channel_shared``)."""
    x = np.asarray(x, np.float64)
    eps, across = normalize_params(op, app, x.ndim, x.shape[1] if x.ndim > 1 else 0, scale.size)
    axes = tuple(range(1, x.ndim)) if across else (1,)
    s = scale.astype(np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))
    with np.errstate(all="ignore"):
        norm = np.sqrt((x * x).sum(axis=axes, keepdims=True) + float(eps))
        return (x / norm * s).astype(np.float32)


def normalize_params(op: dict, app: dict, ndim: int, channels: int,
                     scales: int) -> tuple[float, bool]:
    """Normalize's eps and across_spatial, after checking the scale file fits the channels."""
    eps = app.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not np.isfinite(eps):
        raise PlanError(op["name"], "app.eps", f"{eps!r} is not a finite number")
    flags = [app.get(k) for k in ("across_spatial", "channel_shared")]
    for key, v in zip(("across_spatial", "channel_shared"), flags, strict=True):
        if not isinstance(v, bool):
            raise PlanError(op["name"], f"app.{key}", f"{v!r} is not true or false")
    across, shared = flags
    if ndim < 2:
        raise PlanError(op["name"], "bottoms", f"a {ndim}-D blob (Normalize needs N, C, ...)")
    if scales != (1 if shared else channels):
        raise PlanError(op["name"], "app.scale", f"{scales} values for {channels} channels"
                        + (" (channel_shared: one)" if shared else ""))
    return float(eps), bool(across)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def eltwise(op: dict, m: dict, xs: list[np.ndarray]) -> np.ndarray:
    if m["kernel"] == "MPSCNNMultiply":
        return np.prod(np.stack(xs), axis=0).astype(np.float32)
    acc = np.zeros(np.shape(xs[0]), np.float64)
    for c, x in zip(add_scales(op, m, len(xs)), xs, strict=True):
        acc += c * np.asarray(x, np.float64)
    return acc.astype(np.float32)


def add_scales(op: dict, m: dict, n: int) -> list[float]:
    """MPSCNNAdd's primaryScale and secondaryScale(s): one factor per bottom."""
    scales = [m.get("primaryScale", 1.0), *m.get("secondaryScale", [])]
    if len(scales) != n:
        raise PlanError(op["name"], "mps.secondaryScale", f"{len(scales)} scales for "
                        f"{n} bottoms")
    return [float(c) for c in scales]


def concat_channels(op: dict, m: dict, xs: list[np.ndarray]) -> np.ndarray:
    """Sources written into one MPSImage at their channel offsets, read back in Caffe's order."""
    imgs = [hwc(x) for x in xs]
    offsets, width, cmap = concat_layout(op, m, [img.shape[2] for img in imgs])
    dest = np.zeros((*imgs[0].shape[:2], width), np.float32)
    for o, img in zip(offsets, imgs, strict=True):
        dest[:, :, o:o + img.shape[2]] = img
    return nchw(dest[:, :, cmap])


def concat_layout(op: dict, m: dict, channels: list[int]) -> tuple[list[int], int, list[int]]:
    """Each source's destinationFeatureChannelOffset, the destination's channel count (whole
    slices) and ``channelMap`` (the destination channel of each of Caffe's channels)."""
    offsets = m.get("destinationFeatureChannelOffsets")
    cmap = m.get("channelMap")
    if not isinstance(offsets, list) or len(offsets) != len(channels):
        raise PlanError(op["name"], "mps.destinationFeatureChannelOffsets",
                        f"expected {len(channels)} offsets")
    end = 0
    for o, c in zip(offsets, channels, strict=True):
        if isinstance(o, bool) or not isinstance(o, int) or o < 0 or o % SLICE:
            raise PlanError(op["name"], "mps.destinationFeatureChannelOffsets",
                            f"{o!r} is not a multiple of 4 (MPSCNNKernel.h)")
        end = max(end, o + c)
    width, total = slices(end) * SLICE, sum(channels)
    if not isinstance(cmap, list) or len(cmap) != total or not all(
            isinstance(c, int) and 0 <= c < width for c in cmap):
        raise PlanError(op["name"], "mps.channelMap", f"expected {total} channels of the "
                        f"{width}-channel destination")
    return offsets, width, cmap


def detections(op: dict, loc, conf, priors) -> np.ndarray:
    p = dict(op["app"].get("params") or {})
    p.pop("layer", None)
    try:
        return detection_output(np.asarray(loc), np.asarray(conf), np.asarray(priors), **p)
    except (TypeError, ValueError) as e:
        raise PlanError(op["name"], "app.params", str(e)) from None
