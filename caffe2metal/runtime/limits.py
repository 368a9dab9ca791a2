"""Bounds and small helpers the plan checks share (see ``checks``)."""
from __future__ import annotations

import math
from pathlib import Path

MAX_OPS = 1_000_000
MAX_DIMS = 8
MAX_ELEMENTS = 2 ** 31
"""A blob (or all blobs together) of this many values or more is refused (8 GiB as float32)."""
MIN_SCRATCH = 2 ** 24
"""A padded or zero-inserted source may be 16x the blobs it joins, or this many values."""
DTYPES = {"float32": 4, "float16": 2}
NEURONS = ("ReLU", "ReLUN", "Sigmoid", "TanH", "ELU", "Absolute", "Power", "Exponential",
           "Logarithm")
APP_OPS = ("identity", "input", "none", "reshape", "transpose", "concat", "slice", "constant",
           "unavailable", "detection_output", "normalize", "softmax", "clip", "max",
           "scale_by", "lrn")
"""``app.op`` values ``run`` executes besides the fork layers (``app.caffe_type`` with a
numpy forward role)."""


def _shape(value, unknown: bool = True, low: int = 0) -> list:
    """``value`` as a list of dims (``None`` unknown when ``unknown``); ValueError why not."""
    if not isinstance(value, list):
        raise ValueError(f"{_short(value)} is not a list of dimensions")
    if len(value) > MAX_DIMS:
        raise ValueError(f"{len(value)} dimensions, more than {MAX_DIMS}")
    for d in value:
        if d is None and unknown:
            continue
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"dimension {_short(d)} is not an integer")
        if d < low:
            raise ValueError(f"dimension {d} is less than {low}")
    n = _known(value)
    if n >= MAX_ELEMENTS:
        raise ValueError(f"{_short(value)} holds {n} values, 2^31 or more")
    return value


def _known(shape: list | None) -> int:
    return 0 if shape is None else math.prod(d for d in shape if d is not None)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class _Context:
    def __init__(self, out: Path, entries: dict, ssd: dict):
        self.out, self.entries, self.ssd = out, entries, ssd
