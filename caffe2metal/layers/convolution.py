"""Convolution, and the fork types with its blobs and math.

* ``Convolution``: W [out][in/group][kH][kW], b [out] when ``bias_term`` (default true).
* ``DepthwiseConvolution`` (MobileNet forks): the same layer under another name;
  OpenCV knows it as ``Convolution``.
* ``ConvolutionDepthwise`` (other forks): one group per input channel whatever
  ``group`` says.

Shape (Caffe): ``out = (in + 2*pad - (dilation*(k-1) + 1)) // stride + 1`` per axis.
Fold: W' = W * k along axis 0 (the output channels).  Metal export:
``depthwise_convolution`` when group == in == out, else ``convolution`` (written
dense when a group's channel count is not a multiple of 4, as MPS requires).
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
from .structure import Refused

TYPES = ("Convolution", "DepthwiseConvolution", "ConvolutionDepthwise")
GROUP_IS_CHANNELS = ("ConvolutionDepthwise",)     # fork types: group = input channels
OPENCV_NAMES = {"DepthwiseConvolution": "Convolution"}


def spatial(p: dict, name: str, default: int, n: int = 2) -> tuple:
    """Caffe's per-axis geometry: ``name_h``/``name_w`` or ``name`` (repeated or scalar).

    base_conv_layer.cpp LayerSetUp: ``CHECK_EQ(num_spatial_axes_, 2) << "kernel_h & kernel_w
    can only be used for 2D convolution."``, ``CHECK_EQ(0, conv_param.kernel_size_size()) <<
    "Either kernel_size or kernel_h/w should be specified; not both."`` (the same for pad
    and stride), and ``CHECK(num_kernel_dims == 1 || num_kernel_dims == num_spatial_axes_)``
    (0 also allowed for stride, pad, dilation)."""
    key = name if name != "kernel" else "kernel_size"
    h, w = p.get(f"{name}_h"), p.get(f"{name}_w")
    v = p.get(key, [])
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if h is not None or w is not None:
        if n != 2 or h is None or w is None:
            raise Refused(f"convolution_param.{name}_h", f"{name}_h and {name}_w must be given "
                          "together, and only for 2-D convolutions")
        if v:
            raise Refused(f"convolution_param.{key}", f"give either {key} or {name}_h/"
                          f"{name}_w, not both")
        return (h, w)
    if not v:
        return (default,) * n
    if len(v) == 1:
        return (v[0],) * n
    if len(v) != n:
        raise Refused(f"convolution_param.{key}", f"{len(v)} values for {n} spatial axes "
                      "(give one, or one per axis)")
    return tuple(v)


def conv_geometry(p: dict, n: int = 2) -> dict:
    """Kernel, stride, pad, dilation of a ``convolution_param`` with Caffe's defaults.

    base_conv_layer.cpp: ``CHECK_GT(kernel_shape_data[i], 0) << "Filter dimensions must be
    nonzero."``, ``CHECK_GT(stride_data[i], 0) << "Stride dimensions must be nonzero."``.
    Caffe has no CHECK on dilation, but dilation 0 puts every tap of the kernel on one
    pixel (MPS's dilationRate must be >= 1, OpenCV divides by it): refused as well."""
    kernel = spatial(p, "kernel", 0, n)
    if any(k <= 0 for k in kernel):
        if p.get("kernel_h") is not None or p.get("kernel_w") is not None:
            raise Refused("convolution_param.kernel_h", f"kernel {list(kernel)}: filter "
                          "dimensions must be nonzero")
        if p.get("kernel_size") in (None, []):
            raise Refused("convolution_param.kernel_size", "kernel size is not set")
        raise Refused("convolution_param.kernel_size", f"kernel {list(kernel)}: filter "
                      "dimensions must be nonzero")
    geo = dict(kernel=kernel, stride=spatial(p, "stride", 1, n), pad=spatial(p, "pad", 0, n),
               dilation=spatial(p, "dilation", 1, n))
    for name in ("stride", "dilation"):
        if any(v <= 0 for v in geo[name]):
            field = f"{name}_h" if f"{name}_h" in p else name
            raise Refused(f"convolution_param.{field}", f"{name} {list(geo[name])}: "
                          f"{name} dimensions must be nonzero")
    return geo


def check_group(p: dict, channels: int, group: int) -> int:
    """base_conv_layer.cpp: ``CHECK_GT(num_output_, 0)``, ``CHECK_EQ(channels_ % group_, 0)``,
    ``CHECK_EQ(num_output_ % group_, 0) << "Number of output should be multiples of
    group."`` (group 0 divides by zero there).  Returns num_output."""
    num_output = p.get("num_output")
    if num_output is None or num_output <= 0:
        raise Refused("convolution_param.num_output", "must be set and positive "
                      f"(is {num_output})")
    if group <= 0:
        raise Refused("convolution_param.group", f"group {group} must be positive")
    if channels % group or num_output % group:
        raise Refused("convolution_param.group", f"{channels} input / {num_output} output "
                      f"channels are not divisible by group {group}")
    return num_output


def conv_param(layer: Layer) -> dict:
    return layer.params.get("convolution_param", {})


# ---------------------------------------------------------------- shape

def base_conv_shape(layer: Layer, ins: list, transpose: bool = False):
    """base_conv_layer.cpp's shapes, for Convolution (``mps.conv_output_size``, W
    [out][in/group][kH][kW]) and, ``transpose``, Deconvolution
    (``mps.deconv_output_size``, W [in][out/group][kH][kW]); b [out]."""
    (x,) = need(ins, 1)[:1]
    p = conv_param(layer)
    axis = axis_index(p.get("axis", 1), len(x))
    g = conv_geometry(p, len(x) - axis - 1)
    c = x[axis]
    group = c if layer.type in GROUP_IS_CHANNELS else p.get("group", 1)
    num_output = check_group(p, c, group)        # the CHECKs of base_conv_layer.cpp
    size = mps.deconv_output_size if transpose else mps.conv_output_size
    out = tuple(size(*a) for a in
                zip(x[axis + 1:], g["kernel"], g["stride"], g["pad"], g["dilation"],
                    strict=True))
    weights = (c, num_output // group) if transpose else (num_output, c // group)
    params = [weights + g["kernel"]]
    if p.get("bias_term", True):
        params.append((num_output,))
    return [x[:axis] + (num_output,) + out], params


def _shape(layer: Layer, ins: list):
    return base_conv_shape(layer, ins)


# ---------------------------------------------------------------- fold

def _rows_multiplier(layer: Layer, w: np.ndarray, k: np.ndarray) -> np.ndarray:
    return k.reshape((-1,) + (1,) * (w.ndim - 1))


PRODUCER = Producer(
    param_key="convolution_param", weight_axes=tuple(range(3, 33)),
    output_channels=lambda layer: layer.blobs[0].shape[0],
    multiplier=_rows_multiplier,
    fan_in=lambda layer, shape: math.prod(shape[1:]))


# ---------------------------------------------------------------- Metal export

def pair_list(t) -> list[int]:
    return [int(v) for v in t]


def check_2d(layer: Layer):
    """The weights (an array, or folded lazily) and the 2-D geometry MPS needs."""
    p = conv_param(layer)
    w = layer.blobs[0]
    if not hasattr(w, "row_blocks"):                # an array, not weights folded lazily
        w = np.asarray(w)
    if w.ndim != 4:
        raise ExportError(f"has {w.ndim}-D weights {list(w.shape)}: MPS convolutions are 2-D",
                          layer=layer.name)
    if p.get("axis", 1) not in (1, -3):
        raise ExportError("convolution_param.axis is not 1: MPS needs channels on axis 1",
                          layer=layer.name)
    try:
        geo = conv_geometry(p, 2)
    except ValueError as e:
        raise ExportError(str(e), layer=layer.name) from None
    return w, geo


def dense(w: np.ndarray, groups: int, layer: str = "") -> np.ndarray:
    """Grouped MPS weights [out][kH][kW][in/g] as one dense block-diagonal [out][kH][kW][in]."""
    if w.size * groups > max(16 * w.size, 1 << 24):
        raise ExportError(f"{groups} groups of {w.shape[3]} channel(s) would take "
                          f"{w.size * groups:,} values written dense (MPS wants each group's "
                          "channel count to be a multiple of 4)", layer=layer)
    out, kh, kw, cg = w.shape
    d = np.zeros((groups, out // groups, kh, kw, groups, cg), w.dtype)
    g = np.arange(groups)
    d[g, :, :, :, g, :] = w.reshape(groups, out // groups, kh, kw, cg)
    return d.reshape(out, kh, kw, groups * cg)


def mps_groups(cin: int, cout: int, group: int) -> bool:
    """Whether MPS can run ``group`` groups: each group's channels a multiple of 4."""
    return not (group > 1 and (cin // group % 4 or cout // group % 4))


def geometry(kind: str, weights, geo: dict, group: int, dense_from, cin: int, cout: int) -> dict:
    return dict(kind=kind, weights=weights, kernel=pair_list(geo["kernel"]),
                stride=pair_list(geo["stride"]), pad=pair_list(geo["pad"]),
                dilation=pair_list(geo["dilation"]), groups=group, dense_from_groups=dense_from,
                input_channels=cin, output_channels=cout)


def _export(layer: Layer, in_shape) -> dict:
    w, geo = check_2d(layer)
    kh, kw = w.shape[2:]
    if layer.type in GROUP_IS_CHANNELS:
        group = int(in_shape[1]) if in_shape and in_shape[1] else w.shape[0]
    else:
        group = int(conv_param(layer).get("group", 1))
    cin, cout = w.shape[1] * group, w.shape[0]
    if group > 1 and group == cin == cout:          # rows are channels: [C][kH][kW]
        arr = layout((cout, kh, kw), w, mps.depthwise_weights)
        return geometry("depthwise_convolution", arr, geo, group, None, cin, cout)
    if not mps_groups(cin, cout, group):
        arr = dense(mps.conv_weights(np.asarray(w)), group, layer.name)
        return geometry("convolution", arr, geo, 1, group, cin, cout)
    arr = layout((cout, kh, kw, w.shape[1]), w, mps.conv_weights)   # rows are output channels
    return geometry("convolution", arr, geo, group, None, cin, cout)


# ---------------------------------------------------------------- Caffe reference

def correlate(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, group: int,
              kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
              dilation: tuple[int, int]) -> np.ndarray:
    """Caffe Convolution on x [C][H][W] with W [out][C/g][kH][kW] -> [out][H'][W']."""
    c, h, wd = x.shape
    out, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    ho = mps.conv_output_size(h, kh, sh, ph, dh)
    wo = mps.conv_output_size(wd, kw, sw, pw, dw)
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



def _reference(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Caffe's Convolution on one item x [C][H][W] (float64), from the layer's blobs."""
    p = conv_param(layer)
    group = x.shape[0] if layer.type in GROUP_IS_CHANNELS else int(p.get("group", 1))
    w = np.asarray(layer.blobs[0], np.float64)
    bias = np.asarray(layer.blobs[1], np.float64).reshape(-1) if len(layer.blobs) > 1 else None
    return correlate(x, w, bias, group, **conv_geometry(p, 2))


for _type in TYPES:
    register(_type, shape=_shape, producer=PRODUCER, export=_export, reference=_reference,
             opencv_type=OPENCV_NAMES.get(_type))


register_plan(*TYPES, plan=weighted)
