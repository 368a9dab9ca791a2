"""The plan's ops in Apple's MLX (``run --backend mlx``): the MPS files read as written.

Sources for the MLX facts used here (ml-explore/mlx):

* ``mx.conv2d``/``mx.conv_general`` take the input NHWC and the weights
  ``(C_out, KH, KW, C_in / groups)`` (their docstrings, ``python/src/ops.cpp``): the
  bytes of an MPSCNNConvolution file, and of a depthwise file viewed as
  ``[C][kH][kW][1]`` with ``groups = C``.  ``padding`` may be a pair of lists
  (low, high), so MPS's ``offset`` (asymmetric when the plan says so) is kept.
* ``mx.conv_transpose2d`` is ``conv_general(input_dilation=stride, padding_lo =
  d*(k-1) - pad, ..., flip=True)`` (``conv_transpose_general`` in ``mlx/ops.cpp``),
  weights ``(C_out, KH, KW, C_in)``, and supports ``groups = 1`` only (its docstring).
  MPSCNNConvolutionTranspose instead uses its weights as-is, without rotation, on the
  zero-inserted source (MPSCNNConvolution.h; our files hold the flipped kernel), so
  this backend calls ``conv_general`` with the same dilation and padding and
  ``flip=False``: the file as written, any group count.
* Operations with mixed dtypes promote (``conv_general``: ``promote_types(in, wt)``,
  ``mlx/ops.cpp``).  float16 weight files are loaded as float16 MLX arrays (half the
  memory) and cast to float32 (exactly) where an op uses them; every op computes in
  float32 (``--activations float16`` rounds each MPS op's output, as the numpy backend).
* The default device is the GPU when MLX has one, else the CPU (``mlx/device.cpp``,
  ``mutable_default_device``); ``mx.is_available(mx.gpu)`` tells which, and
  ``with mx.stream(device)`` runs the ops on a chosen one.

A 4-D blob an MPS op wrote stays NHWC (``Blob.nhwc``) until an op with Caffe's axes
(reshape, transpose, slice, app concat or softmax) reads it; every op here takes and
gives Caffe's shapes and axes, whatever the layout inside.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import Caffe2MetalError
from ..mps.geometry import window_start
from . import ops
from .ops import PlanError, _geometry


@dataclass(frozen=True)
class Blob:
    """A blob's value: ``a`` in Caffe's shape (``nhwc`` False), or a 4-D N,C,H,W blob held
    as N,H,W,C (``nhwc`` True)."""
    a: mx.array
    nhwc: bool = False

    def caffe(self) -> mx.array:
        return self.a.transpose(0, 3, 1, 2) if self.nhwc else self.a

    def image(self) -> mx.array:
        """As the MPSImage an MPS op reads: N,H,W,C (the plan checks guarantee 4-D)."""
        return self.a if self.nhwc else self.a.transpose(0, 2, 3, 1)

    @property
    def channel_axis(self) -> int:
        return -1 if self.nhwc else 1


def _same_layout(xs: list[Blob]) -> tuple[list[mx.array], bool]:
    """The values of ``xs`` in one layout: NHWC when all of them are, else Caffe's."""
    if all(x.nhwc for x in xs):
        return [x.a for x in xs], True
    return [x.caffe() for x in xs], False


def _f32(a: mx.array) -> mx.array:
    return a if a.dtype == mx.float32 else a.astype(mx.float32)


class MlxBackend:
    name = "mlx"

    def __init__(self, device: str | None = None):
        if device == "gpu" and not mx.is_available(mx.gpu):
            raise Caffe2MetalError("--device gpu: MLX has no GPU on this machine (its Metal "
                                   "GPU backend needs an Apple-silicon Mac); use --device cpu")
        self._device = {None: mx.default_device(), "cpu": mx.cpu, "gpu": mx.gpu}[device]
        self.device = "gpu" if self._device == mx.gpu else "cpu"

    def context(self):
        return mx.stream(self._device)

    def from_numpy(self, a: np.ndarray) -> Blob:
        return Blob(mx.array(np.asarray(a, np.float32)))

    def to_numpy(self, v: Blob) -> np.ndarray:
        return np.array(v.caffe(), dtype=np.float32, copy=True)

    def weights(self, a: np.ndarray) -> mx.array:
        return mx.array(a)                 # float16 files stay float16 (see the module doc)

    def absmax(self, v: Blob) -> float:
        return float(np.asarray(mx.abs(v.a).max())) if v.a.size else 0.0

    def round16(self, v: Blob) -> Blob:
        return Blob(v.a.astype(mx.float16).astype(mx.float32), v.nhwc)

    # ------------------------------------------------------------ MPS kernels

    def weighted(self, op: dict, m: dict, x: Blob, w: mx.array, b: mx.array) -> Blob:
        """MPSCNNConvolution / DepthWise / FullyConnected / ConvolutionTranspose /
        BatchNormalization (channel_affine), from the weights as the file lays them out."""
        kind, img = m.get("kind"), x.image()
        if kind in ("convolution", "depthwise_convolution"):
            k, s, d, o, out = _geometry(op, m)
            depthwise = kind == "depthwise_convolution"
            wt = _f32(w)[..., None] if depthwise else _f32(w)
            groups = img.shape[3] if depthwise else ops._int(op, m, "groups", None, 1)
            img, lo, hi = _window(img, k, s, d, o, out)
            y = mx.conv_general(img, wt, stride=s, padding=(lo, hi), kernel_dilation=d,
                                groups=groups)
            return Blob(y + b, True)
        if kind == "fully_connected":
            flat = img.reshape(img.shape[0], -1)
            y = flat @ _f32(w).reshape(w.shape[0], -1).T + b
            return Blob(y.reshape(img.shape[0], 1, 1, -1), True)
        if kind == "channel_affine":
            return Blob(img * _f32(w).reshape(-1) + b.reshape(-1), True)
        if kind == "convolution_transpose":
            return Blob(_conv_transpose(op["_entry"], img, _f32(w), b), True)
        raise PlanError(op["name"], "mps.kind", f"unknown kind {kind!r}")

    def pooling(self, op: dict, m: dict, x: Blob) -> Blob:
        k, s, _, o, out = _geometry(op, m, dilation=False)
        if m.get("edgeMode") != "clamp":
            raise PlanError(op["name"], "mps.edgeMode", f"{m.get('edgeMode')!r}: Caffe's "
                            "pooling ignores pixels outside the image (clamp)")
        img = x.image()
        biggest = m["kernel"] == "MPSCNNPoolingMax"
        xp = _padded(img, k, s, (1, 1), o, out, -np.inf if biggest else 0.0)
        acc = None
        for p in range(k[0]):              # one strided view per kernel tap (k*k, not pixels)
            for q in range(k[1]):
                tap = xp[:, p:p + s[0] * (out[0] - 1) + 1:s[0], q:q + s[1] * (out[1] - 1) + 1:s[1]]
                acc = tap if acc is None else (mx.maximum(acc, tap) if biggest else acc + tap)
        assert acc is not None
        if biggest:
            return Blob(acc, True)
        div = ops.average_divisor(op, m, tuple(img.shape[1:3]))
        return Blob(acc / mx.array(div.astype(np.float32))[None, :, :, None], True)

    def neuron(self, op: dict, m: dict, x: Blob) -> Blob:
        t = m.get("neuronType")
        a, b, c = (float(m.get(k, 0.0)) for k in "abc")
        v = x.a
        if t == "ReLU":
            y = mx.where(v < 0, a * v, v)
        elif t == "ReLUN":
            y = mx.minimum(mx.where(v < 0, a * v, v), b)
        elif t == "Sigmoid":
            y = mx.sigmoid(v)
        elif t == "TanH":
            y = a * mx.tanh(b * v)
        elif t == "ELU":
            y = mx.where(v < 0, a * (mx.exp(v) - 1), v)
        elif t == "Absolute":
            y = mx.abs(v)
        elif t == "Power":
            y = mx.power(a * v + b, c)
        elif t == "Exponential":
            y = mx.power(mx.array(c, mx.float32), a * v + b)
        elif t == "Logarithm":
            y = mx.log(a * v + b) / float(np.log(c))
        else:
            raise PlanError(op["name"], "mps.neuronType", f"{t!r} is not a neuron run knows")
        return Blob(y, x.nhwc)

    def prelu(self, op: dict, m: dict, x: Blob, slopes: np.ndarray) -> Blob:
        ndim = x.a.ndim
        channels = x.a.shape[x.channel_axis] if ndim > 1 else 1
        ops.check_slopes(op, m, slopes.size, channels)
        shape = [1] * ndim
        if ndim > 1:
            shape[x.channel_axis] = -1
        s = mx.array(slopes).reshape(shape) if ndim > 1 else mx.array(slopes)
        return Blob(mx.where(x.a < 0, s * x.a, x.a), x.nhwc)

    def softmax(self, x: Blob, axis: int) -> Blob:
        if x.nhwc and axis in (1, -3):
            return Blob(mx.softmax(x.a, axis=-1, precise=True), True)
        return Blob(mx.softmax(x.caffe(), axis=axis, precise=True))

    def eltwise(self, op: dict, m: dict, xs: list[Blob]) -> Blob:
        vs, nhwc = _same_layout(xs)
        if m["kernel"] == "MPSCNNMultiply":
            y = vs[0]
            for v in vs[1:]:
                y = y * v
            return Blob(y, nhwc)
        scales = ops.add_scales(op, m, len(vs))
        y = scales[0] * vs[0]
        for c, v in zip(scales[1:], vs[1:], strict=True):
            y = y + c * v
        return Blob(y, nhwc)

    def concat_channels(self, op: dict, m: dict, xs: list[Blob]) -> Blob:
        """Each source written at its destinationFeatureChannelOffset into an image of whole
        4-channel slices, Caffe's channels read back through ``channelMap``."""
        imgs = [x.image() for x in xs]
        offsets, width, cmap = ops.concat_layout(op, m, [i.shape[3] for i in imgs])
        dest = mx.zeros((*imgs[0].shape[:3], width), mx.float32)
        for o, img in zip(offsets, imgs, strict=True):
            dest[..., o:o + img.shape[3]] = img
        if cmap == list(range(width)):
            return Blob(dest, True)
        return Blob(mx.take(dest, mx.array(cmap), axis=-1), True)

    # ------------------------------------------------------------ app ops

    def normalize(self, op: dict, app: dict, x: Blob, scale: np.ndarray) -> Blob:
        v = x.a
        channels = v.shape[x.channel_axis] if v.ndim > 1 else 0
        eps, across = ops.normalize_params(op, app, v.ndim, channels, scale.size)
        axes = list(range(1, v.ndim)) if across else [x.channel_axis]
        shape = [1] * v.ndim
        shape[x.channel_axis] = -1
        norm = mx.sqrt((v * v).sum(axis=axes, keepdims=True) + eps)
        return Blob(v / norm * mx.array(scale).reshape(shape), x.nhwc)

    def scale_by(self, op: dict, app: dict, x: Blob, s: Blob) -> Blob:
        xv, sv = x.caffe(), s.caffe()
        return Blob(xv * sv.reshape(ops.scale_by_shape(op, app, tuple(xv.shape),
                                                       tuple(sv.shape))))

    def lrn(self, op: dict, app: dict, x: Blob) -> Blob:
        """Caffe's LRN (see ``ops.lrn``), on Caffe's N,C,H,W."""
        n, alpha, beta, k, across = ops.lrn_params(op, app)
        v = x.caffe()
        half, sq = (n - 1) // 2, v * v
        total = mx.zeros_like(v)
        if across:
            padded = mx.pad(sq, [(0, 0), (half, half)] + [(0, 0)] * (v.ndim - 2))
            for i in range(n):
                total = total + padded[:, i:i + v.shape[1]]
            div = k + alpha / n * total
        else:
            padded = mx.pad(sq, [(0, 0), (0, 0), (half, half), (half, half)])
            for p in range(n):
                for q in range(n):
                    total = total + padded[:, :, p:p + v.shape[2], q:q + v.shape[3]]
            div = k + alpha / (n * n) * total
        return Blob(v / mx.power(div, beta))

    @staticmethod
    def reshape(x: Blob, shape: tuple) -> Blob:
        return Blob(x.caffe().reshape(shape))

    @staticmethod
    def transpose(x: Blob, order) -> Blob:
        if x.nhwc and list(order) == [0, 2, 3, 1]:      # SSD's heads: already this layout
            return Blob(x.a)
        return Blob(x.caffe().transpose(list(order)))

    @staticmethod
    def concat(xs: list[Blob], axis: int) -> Blob:
        return Blob(mx.concatenate([x.caffe() for x in xs], axis=axis))

    @staticmethod
    def slice(x: Blob, axis: int, start: int, size: int) -> Blob:
        v = x.caffe()
        index = [slice(None)] * v.ndim
        index[axis] = slice(start, start + size)
        return Blob(v[tuple(index)])

    @staticmethod
    def clip(x: Blob, low: float, high: float) -> Blob:
        return Blob(mx.clip(x.a, low, high), x.nhwc)

    @staticmethod
    def maximum(xs: list[Blob]) -> Blob:
        vs, nhwc = _same_layout(xs)
        y = vs[0]
        for v in vs[1:]:
            y = mx.maximum(y, v)
        return Blob(y, nhwc)


def _window(img: mx.array, k, s, d, o, out) -> tuple[mx.array, list[int], list[int]]:
    """``img`` cropped where MPS's ``offset`` starts a window inside it or ends the last one
    early, and the zero padding (low, high) per axis that makes destination pixel (i, j)'s
    window start at (i*s, j*s) (``ops._windowed``'s geometry)."""
    lo, hi = [], []
    for axis in (0, 1):
        before = -window_start(o[axis], k[axis], d[axis])
        need = (out[axis] - 1) * s[axis] + d[axis] * (k[axis] - 1) + 1
        if before < 0:
            img = img[:, -before:] if axis == 0 else img[:, :, -before:]
            before = 0
        after = need - before - img.shape[1 + axis]
        if after < 0:
            end = img.shape[1 + axis] + after
            img = img[:, :end] if axis == 0 else img[:, :, :end]
            after = 0
        lo.append(before)
        hi.append(after)
    return img, lo, hi


def _padded(img: mx.array, k, s, d, o, out, fill: float) -> mx.array:
    img, lo, hi = _window(img, k, s, d, o, out)
    return mx.pad(img, [(0, 0), (lo[0], hi[0]), (lo[1], hi[1]), (0, 0)], constant_values=fill)


def _conv_transpose(entry: dict, img: mx.array, w: mx.array, b: mx.array) -> mx.array:
    """MPSCNNConvolutionTranspose with the layer's Caffe geometry (as ``ops.weighted``):
    stride-1 zeros between source pixels, ``d*(k-1) - pad`` zeros around (cropped when
    negative), then a correlation with the kernel as the file holds it (no flip)."""
    stride, pad, dil = (tuple(int(v) for v in entry[key]) for key in ("stride", "pad",
                                                                      "dilation"))
    k = tuple(w.shape[1:3])
    border = [dil[a] * (k[a] - 1) - pad[a] for a in (0, 1)]
    y = mx.conv_general(img, w, stride=1, padding=[max(e, 0) for e in border],
                        kernel_dilation=dil, input_dilation=stride,
                        groups=int(entry["groups"]), flip=False)
    cut = [max(-e, 0) for e in border]
    y = y[:, cut[0]:y.shape[1] - cut[0], cut[1]:y.shape[2] - cut[1]]
    return y + b
