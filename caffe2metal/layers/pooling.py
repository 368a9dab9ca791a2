"""Pooling: max, average (and stochastic, shaped alike) over windows.

Output size (Caffe): ``ceil((in + 2*pad - kernel) / stride) + 1`` (BVLC's
``round_mode: FLOOR``, or the older fork field ``ceil_mode: false``, floor it),
minus 1 when padding is set and the last window would start in the padding
(``(out-1)*stride >= in + pad``).  ``global_pooling`` covers the whole map.

The parameters are checked as pooling_layer.cpp's LayerSetUp does (quoted at each
check): kernel, pad and stride each given one way, kernel > 0, pad < kernel, and
with ``global_pooling`` no kernel, pad 0 and stride 1.
"""
from __future__ import annotations

import math

from .planning import destination, explicit_pads, window
from .registry import need, register_plan, shape_rule
from .structure import Refused


def _given(p: dict, key: str) -> bool:
    return p.get(key) is not None


def _pair(p: dict, name: str, default: int) -> tuple[int, int]:
    """``name`` or ``name_h`` and ``name_w``: "pad is pad OR pad_h and pad_w are required."
    (CHECK((!has_pad() && has_pad_h() && has_pad_w()) || (!has_pad_h() && !has_pad_w())),
    likewise for stride and kernel_size)."""
    key = "kernel_size" if name == "kernel" else name
    h, w = _given(p, f"{name}_h"), _given(p, f"{name}_w")
    if h or w:
        if not (h and w) or _given(p, key):
            raise Refused(f"pooling_param.{name}_h", f"give {key} OR both {name}_h and "
                          f"{name}_w")
        return p[f"{name}_h"], p[f"{name}_w"]
    if _given(p, key):
        return p[key], p[key]
    return default, default


@shape_rule("Pooling")
def _pool(layer, ins):
    (x,) = need(ins, 1)[:1]
    p = layer.params.get("pooling_param", {})
    if len(x) != 4:
        raise Refused("bottom", f"Pooling needs a 4-D input, has shape {list(x)}")
    n, c, h, w = x
    sh, sw = _pair(p, "stride", 1)
    ph, pw = _pair(p, "pad", 0)
    if p.get("global_pooling", False):
        # "With Global_pooling: true Filter size cannot specified"
        if _given(p, "kernel_size") or _given(p, "kernel_h") or _given(p, "kernel_w"):
            raise Refused("pooling_param.kernel_size", "global_pooling takes no kernel size")
        # "With Global_pooling: true; only pad = 0 and stride = 1"
        if (ph, pw, sh, sw) != (0, 0, 1, 1):
            raise Refused("pooling_param.global_pooling", "global pooling takes only pad 0 "
                          "and stride 1")
        kh, kw = h, w
    else:
        if not (_given(p, "kernel_size") or _given(p, "kernel_h") or _given(p, "kernel_w")):
            raise Refused("pooling_param.kernel_size", "pooling kernel size is not set")
        kh, kw = _pair(p, "kernel", 0)
        # CHECK_GT(kernel_h_, 0) << "Filter dimensions cannot be zero."
        if kh <= 0 or kw <= 0:
            raise Refused("pooling_param.kernel_size", f"kernel {[kh, kw]}: filter "
                          "dimensions cannot be zero")
    # Caffe has no CHECK on the stride but divides by it in Reshape.
    if sh <= 0 or sw <= 0:
        raise Refused("pooling_param.stride", f"stride {[sh, sw]} must be positive")
    if ph or pw:
        # "Padding implemented only for average and max pooling."
        if p.get("pool", "MAX") not in ("MAX", "AVE", 0, 1):
            raise Refused("pooling_param.pad", f"padding with pool {p.get('pool')}: Caffe pads "
                          "only average and max pooling")
        # CHECK_LT(pad_h_, kernel_h_); CHECK_LT(pad_w_, kernel_w_);
        if ph >= kh or pw >= kw:
            raise Refused("pooling_param.pad", f"pad {[ph, pw]} must be smaller than the "
                          f"kernel {[kh, kw]}")
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


def _plan(layer, ctx) -> dict:
    """MPSCNNPoolingMax/Average with Caffe's geometry (``mps.geometry`` cites the sources):
    offset ``floor(k/2) - pad``; the destination is Caffe's (ceil-rounded) size; max
    pooling ignores padded pixels (``.clamp`` edges); average pooling counts the zeros of
    the pad but not beyond it (``zeroPadSizeX/Y = pad``, ``.clamp``)."""
    p = layer.params.get("pooling_param", {})
    _, _, h, w = ctx.shape(layer.bottoms[0])
    if p.get("global_pooling", False):
        (kh, kw), (sh, sw), (ph, pw) = (h, w), (1, 1), (0, 0)
    else:
        kh, kw = _pair(p, "kernel", 0)
        sh, sw = _pair(p, "stride", 1)
        ph, pw = _pair(p, "pad", 0)
    pool = p.get("pool", "MAX")
    top = ctx.shape(layer.tops[0])
    floor = p.get("round_mode", "CEIL") == "FLOOR" or p.get("ceil_mode", True) is False
    graph: dict = {**explicit_pads((ph, pw)), "ceilMode": not floor}
    op: dict
    if pool in ("MAX", 0):
        op = {"kernel": "MPSCNNPoolingMax", "edgeMode": "clamp"}
    elif pool in ("AVE", 1):
        op = {"kernel": "MPSCNNPoolingAverage", "edgeMode": "clamp",
              "zeroPadSizeX": int(pw), "zeroPadSizeY": int(ph)}
        graph["includeZeroPadToAverage"] = True
        graph["note"] = ("Caffe divides by the window clipped to the padded image; MPSGraph's "
                         "includeZeroPadToAverage counts the whole window: they differ where a "
                         "ceil-rounded window reaches past the pad")
    else:
        return {"app": {"op": "pooling", "pool": str(pool), "note": "no MPS kernel"}}
    op.update(window((kh, kw), (sh, sw), (ph, pw)))
    del op["dilation"]
    op["destination"] = destination(top)
    return {"mps": op, "mpsgraph": graph}


register_plan("Pooling", plan=_plan)
