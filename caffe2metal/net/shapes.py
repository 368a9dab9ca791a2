"""Shape inference for the layer types real deploy files use.

One small rule per layer type, registered with ``@rule("Type", ...)``; a type
registered twice is an error.  A rule gets the layer and the shapes of its
bottoms (tuples of ints, batch first) and returns ``(top_shapes,
param_shapes)``; ``param_shapes`` lists the parameter blobs the layer expects,
``None`` when the layer's blob layout is not known to us.

Unknown layer types, and layers with fields our schema does not know, give
unknown (``None``) shapes downstream: never a guess.  A dimension that only the
data decides (the number of detections) is ``None`` inside a shape tuple.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import GraphError
from ..graph import Graph

Shape = tuple

_RULES: dict = {}


def rule(*types):
    def register(fn):
        for t in types:
            if t in _RULES:
                raise RuntimeError(f"shape rule for {t!r} registered twice")
            _RULES[t] = fn
        return fn
    return register


def known_types() -> frozenset:
    return frozenset(_RULES)


@dataclass
class Shapes:
    blobs: dict[str, Shape | None] = field(default_factory=dict)
    params: dict[str, list | None] = field(default_factory=dict)   # layer name -> expected blob shapes
    inputs: dict[str, list] = field(default_factory=dict)          # layer name -> bottom shapes


MAX_COUNT = 2**31 - 1      # Caffe's Blob::Reshape: "blob size exceeds INT_MAX"


def _bad_shape(shape) -> str | None:
    """Why a blob of ``shape`` cannot exist (Caffe's limits), or None.

    Checked before anything is sized from a shape: a declared input of
    1000000 x 1000000 x ... is refused here, never allocated."""
    if shape is None:
        return None
    dims = [d for d in shape if d is not None]
    if any(not isinstance(d, int) or d <= 0 for d in dims):
        return f"shape {list(shape)} has a dimension that is not a positive integer"
    if len(shape) > 32:
        return f"shape has {len(shape)} axes, more than Caffe's 32"
    count = math.prod(dims)
    if count > MAX_COUNT:
        return f"shape {list(shape)} has {count} elements, more than Caffe's limit {MAX_COUNT}"
    return None


def infer(graph: Graph) -> Shapes:
    out = Shapes(blobs=dict(graph.inputs))
    for name, shape in graph.inputs.items():
        if why := _bad_shape(shape):
            raise GraphError(f"input '{graph.blob_names.get(name, name)}': {why}",
                             file=graph.source)
    for layer in graph.layers:
        ins = [out.blobs.get(b) for b in layer.bottoms]
        out.inputs[layer.name] = ins
        fn = _RULES.get(layer.type)
        tops, params = [None] * len(layer.tops), None
        if fn is not None and not layer.unknown_fields:
            try:
                tops, params = fn(layer, ins)
            except _Unknown:
                tops, params = [None] * len(layer.tops), None
            except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError,
                    OverflowError) as e:
                raise GraphError(f"cannot infer output shape ({type(e).__name__}: {e})",
                                 file=graph.source, layer=layer.name) from None
            tops = list(tops)
            if len(tops) != len(layer.tops):
                raise GraphError(f"{layer.type} gives {len(tops)} outputs but the layer has "
                                 f"{len(layer.tops)} tops", file=graph.source, layer=layer.name)
            for top, shape in zip(layer.tops, tops):
                if shape is not None and any(d is not None and d <= 0 for d in shape):
                    raise GraphError(f"output '{graph.blob_names.get(top, top)}' would have "
                                     f"shape {list(shape)}", file=graph.source, layer=layer.name)
                if why := _bad_shape(shape):
                    raise GraphError(f"output '{graph.blob_names.get(top, top)}': {why}",
                                     file=graph.source, layer=layer.name)
            for i, shape in enumerate(params or ()):
                if why := _bad_shape(shape):
                    raise GraphError(f"parameter blob {i}: {why}", file=graph.source,
                                     layer=layer.name)
        out.params[layer.name] = params
        for top, shape in zip(layer.tops, tops):
            out.blobs[top] = None if shape is None else tuple(shape)
    return out


class _Unknown(Exception):
    """A rule met an unknown input shape: its outputs are unknown too."""


def _need(ins, n=None):
    if any(s is None for s in ins[: n or len(ins)]) or not ins:
        raise _Unknown
    return ins


# ---------------------------------------------------------------- helpers

def _spatial(p: dict, name: str, default: int, n: int = 2) -> tuple:
    """Caffe's per-axis geometry: ``name_h``/``name_w`` win over ``name`` (repeated or scalar)."""
    h, w = p.get(f"{name}_h"), p.get(f"{name}_w")
    if h is not None or w is not None:
        if n != 2 or h is None or w is None:
            raise ValueError(f"{name}_h and {name}_w must be given together (2-D only)")
        return (h, w)
    v = p.get(name if name != "kernel" else "kernel_size", [])
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if not v:
        return (default,) * n
    if len(v) == 1:
        return (v[0],) * n
    if len(v) != n:
        raise ValueError(f"{name} has {len(v)} values for {n} spatial axes")
    return tuple(v)


def conv_geometry(p: dict, n: int = 2) -> dict:
    """Kernel, stride, pad, dilation of a ``convolution_param`` with Caffe's defaults."""
    kernel = _spatial(p, "kernel", 0, n)
    if any(k <= 0 for k in kernel):
        raise ValueError("kernel size is not set")
    return dict(kernel=kernel, stride=_spatial(p, "stride", 1, n), pad=_spatial(p, "pad", 0, n),
                dilation=_spatial(p, "dilation", 1, n))


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {ndim} dimensions")
    return axis % ndim


# ---------------------------------------------------------------- rules

@rule("Input")
def _input(layer, ins):
    shapes = [tuple(s.get("dim", [])) for s in layer.params.get("input_param", {}).get("shape", [])]
    if not shapes:
        raise ValueError("Input layer without input_param.shape")
    if len(shapes) == 1:
        shapes = shapes * len(layer.tops)
    return shapes, []


@rule("Convolution", "DepthwiseConvolution", "ConvolutionDepthwise")
def _conv(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("convolution_param", {})
    axis = _axis(p.get("axis", 1), len(x))
    n = len(x) - axis - 1
    g = conv_geometry(p, n)
    c = x[axis]
    group = c if layer.type == "ConvolutionDepthwise" else p.get("group", 1)
    num_output = p["num_output"]
    if c % group or num_output % group:
        raise ValueError(f"{c} input / {num_output} output channels not divisible by group {group}")
    spatial = tuple((s + 2 * pd - (d * (k - 1) + 1)) // st + 1 for s, k, st, pd, d in
                    zip(x[axis + 1:], g["kernel"], g["stride"], g["pad"], g["dilation"]))
    params = [(num_output, c // group) + g["kernel"]]
    if p.get("bias_term", True):
        params.append((num_output,))
    return [x[:axis] + (num_output,) + spatial], params


@rule("Deconvolution")
def _deconv(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("convolution_param", {})
    axis = _axis(p.get("axis", 1), len(x))
    g = conv_geometry(p, len(x) - axis - 1)
    c, group, num_output = x[axis], p.get("group", 1), p["num_output"]
    if c % group or num_output % group:
        raise ValueError(f"{c} input / {num_output} output channels not divisible by group {group}")
    spatial = tuple(st * (s - 1) + d * (k - 1) + 1 - 2 * pd for s, k, st, pd, d in
                    zip(x[axis + 1:], g["kernel"], g["stride"], g["pad"], g["dilation"]))
    params = [(c, num_output // group) + g["kernel"]]
    if p.get("bias_term", True):
        params.append((num_output,))
    return [x[:axis] + (num_output,) + spatial], params


@rule("Pooling")
def _pool(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("pooling_param", {})
    n, c, h, w = x
    if p.get("global_pooling", False):
        kh, kw, sh, sw, ph, pw = h, w, 1, 1, 0, 0
    else:
        kh = p.get("kernel_h", p.get("kernel_size"))
        kw = p.get("kernel_w", p.get("kernel_size"))
        if kh is None or kw is None:
            raise ValueError("pooling kernel size is not set")
        sh = p.get("stride_h", p.get("stride", 1))
        sw = p.get("stride_w", p.get("stride", 1))
        ph = p.get("pad_h", p.get("pad", 0))
        pw = p.get("pad_w", p.get("pad", 0))
    # BVLC's round_mode, or the older fork field ceil_mode (false = floor)
    floor = p.get("round_mode", "CEIL") == "FLOOR" or p.get("ceil_mode", True) is False
    rnd = math.floor if floor else math.ceil
    oh = int(rnd((h + 2 * ph - kh) / sh)) + 1
    ow = int(rnd((w + 2 * pw - kw) / sw)) + 1
    if ph or pw:   # Caffe: the last window must start inside the image (or its left padding)
        if (oh - 1) * sh >= h + ph:
            oh -= 1
        if (ow - 1) * sw >= w + pw:
            ow -= 1
    return [(n, c, oh, ow)] * len(layer.tops), []


@rule("InnerProduct")
def _ip(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("inner_product_param", {})
    axis = _axis(p.get("axis", 1), len(x))
    k = math.prod(x[axis:])
    num_output = p["num_output"]
    params = [(k, num_output) if p.get("transpose", False) else (num_output, k)]
    if p.get("bias_term", True):
        params.append((num_output,))
    return [x[:axis] + (num_output,)], params


_SAME_SHAPE_NO_PARAMS = (
    "ReLU", "ReLU6", "Sigmoid", "TanH", "Dropout", "Power", "AbsVal", "BNLL", "ELU", "Exp",
    "Log", "Swish", "Clip", "Threshold", "LRN", "MVN", "Softmax", "ShuffleChannel",
)


@rule(*_SAME_SHAPE_NO_PARAMS, "Split")
def _same(layer, ins):
    (x,) = _need(ins, 1)[:1]
    return [x] * len(layer.tops), []


@rule("Silence")
def _silence(layer, ins):
    return [], []


@rule("BatchNorm")
def _batchnorm(layer, ins):
    (x,) = _need(ins, 1)[:1]
    c = x[1] if len(x) > 1 else 1
    return [x], [(c,), (c,), (1,)]


@rule("Scale", "Bias")
def _scale(layer, ins):
    x = _need(ins, 1)[0]
    key = "scale_param" if layer.type == "Scale" else "bias_param"
    p = layer.params.get(key, {})
    if len(ins) > 1:       # the factor comes from the second bottom: no learned gamma
        if layer.type == "Bias":
            return [x], []
        return [x], ([tuple(_need(ins)[1])] if p.get("bias_term", False) else [])
    axis = _axis(p.get("axis", 1), len(x))
    num_axes = p.get("num_axes", 1)
    shape = x[axis:] if num_axes == -1 else x[axis:axis + num_axes]
    params = [shape]
    if layer.type == "Scale" and p.get("bias_term", False):
        params.append(shape)
    return [x], params


@rule("PReLU")
def _prelu(layer, ins):
    (x,) = _need(ins, 1)[:1]
    shared = layer.params.get("prelu_param", {}).get("channel_shared", False)
    return [x], [(1,) if shared else (x[1],)]


@rule("Normalize")
def _normalize(layer, ins):
    (x,) = _need(ins, 1)[:1]
    shared = layer.params.get("norm_param", {}).get("channel_shared", True)
    return [x], [(1,) if shared else (x[1],)]


@rule("Eltwise")
def _eltwise(layer, ins):
    xs = _need(ins)
    if any(s != xs[0] for s in xs):
        raise ValueError(f"Eltwise bottoms differ in shape: {[list(s) for s in xs]}")
    return [xs[0]], []


@rule("Axpy")
def _axpy(layer, ins):   # SENet fork: top = bottom0 (N,C,1,1) * bottom1 + bottom2
    xs = _need(ins)
    return [xs[1]], []


@rule("Concat")
def _concat(layer, ins):
    xs = _need(ins)
    p = layer.params.get("concat_param", {})
    axis = _axis(p.get("axis", p.get("concat_dim", 1)), len(xs[0]))
    for s in xs:
        if len(s) != len(xs[0]) or s[:axis] != xs[0][:axis] or s[axis + 1:] != xs[0][axis + 1:]:
            raise ValueError(f"Concat bottoms do not match: {[list(s) for s in xs]}")
    total = sum(s[axis] for s in xs)
    return [xs[0][:axis] + (total,) + xs[0][axis + 1:]], []


@rule("Slice")
def _slice(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("slice_param", {})
    axis = _axis(p.get("axis", p.get("slice_dim", 1)), len(x))
    points = list(p.get("slice_point", []))
    ntop = len(layer.tops)
    if points:
        if len(points) != ntop - 1:
            raise ValueError(f"{len(points)} slice points for {ntop} tops")
        bounds = [0] + points + [x[axis]]
    else:
        if x[axis] % ntop:
            raise ValueError(f"axis size {x[axis]} does not split into {ntop} equal parts")
        bounds = [x[axis] // ntop * i for i in range(ntop + 1)]
    return [x[:axis] + (b - a,) + x[axis + 1:] for a, b in zip(bounds, bounds[1:])], []


@rule("Flatten")
def _flatten(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("flatten_param", {})
    a = _axis(p.get("axis", 1), len(x))
    e = _axis(p.get("end_axis", -1), len(x))
    return [x[:a] + (math.prod(x[a:e + 1]),) + x[e + 1:]], []


@rule("Reshape")
def _reshape(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("reshape_param", {})
    dims = list(p.get("shape", {}).get("dim", []))
    axis = p.get("axis", 0)
    axis = axis if axis >= 0 else len(x) + 1 + axis
    num_axes = p.get("num_axes", -1)
    end = len(x) if num_axes == -1 else axis + num_axes
    out = []
    for i, d in enumerate(dims):
        out.append(x[axis + i] if d == 0 else d)
    if out.count(-1) > 1:
        raise ValueError("more than one -1 in reshape_param.shape")
    shape = list(x[:axis]) + out + list(x[end:])
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = math.prod(x) // known
    if math.prod(shape) != math.prod(x):
        raise ValueError(f"cannot reshape {list(x)} to {shape}")
    return [tuple(shape)], []


@rule("Permute")
def _permute(layer, ins):
    (x,) = _need(ins, 1)[:1]
    order = list(layer.params.get("permute_param", {}).get("order", []))
    order += [a for a in range(len(x)) if a not in order]
    if sorted(order) != list(range(len(x))):
        raise ValueError(f"permute order {order} is not a permutation of {len(x)} axes")
    return [tuple(x[a] for a in order)], []


@rule("Crop")
def _crop(layer, ins):
    a, b = _need(ins)[:2]
    axis = _axis(layer.params.get("crop_param", {}).get("axis", 2), len(a))
    return [a[:axis] + b[axis:]], []


@rule("PriorBox")
def _priorbox(layer, ins):
    feat = _need(ins, 1)[0]
    from ..layers.priorbox import priors_per_cell
    per_cell = priors_per_cell(**layer.params.get("prior_box_param", {}))
    return [(1, 2, feat[2] * feat[3] * per_cell * 4)], []


@rule("DetectionOutput")
def _detection_output(layer, ins):
    return [(1, 1, None, 7)], []


@rule("Upsample")
def _upsample(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("upsample_param", {})
    if "upsample_h" in p or "upsample_w" in p:
        oh, ow = p.get("upsample_h", x[2]), p.get("upsample_w", x[3])
    else:
        sh = p.get("scale_h", p.get("scale", 2))
        sw = p.get("scale_w", p.get("scale", 2))
        oh = x[2] * sh - int(p.get("pad_out_h", False))
        ow = x[3] * sw - int(p.get("pad_out_w", False))
    return [x[:2] + (oh, ow)], []


@rule("ArgMax")
def _argmax(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("argmax_param", {})
    top_k = p.get("top_k", 1)
    if "axis" in p:
        axis = _axis(p["axis"], len(x))
        return [x[:axis] + (top_k,) + x[axis + 1:]], []
    return [(x[0], 2 if p.get("out_max_val", False) else 1, top_k)], []


@rule("Tile")
def _tile(layer, ins):
    (x,) = _need(ins, 1)[:1]
    p = layer.params.get("tile_param", {})
    axis = _axis(p.get("axis", 1), len(x))
    return [x[:axis] + (x[axis] * p["tiles"],) + x[axis + 1:]], []
