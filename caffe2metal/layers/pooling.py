"""Pooling: max, average (and stochastic, shaped alike) over windows.

Output size (Caffe): ``ceil((in + 2*pad - kernel) / stride) + 1`` (BVLC's
``round_mode: FLOOR``, or the older fork field ``ceil_mode: false``, floor it),
minus 1 when padding is set and the last window would start in the padding
(``(out-1)*stride >= in + pad``).  ``global_pooling`` covers the whole map.
"""
from __future__ import annotations

import math

from .registry import need, shape_rule


@shape_rule("Pooling")
def _pool(layer, ins):
    (x,) = need(ins, 1)[:1]
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
