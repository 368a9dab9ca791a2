"""Caffe SSD ``PriorBox`` layer output, computed with vectorised numpy.

:func:`prior_boxes` reproduces the top blob of Caffe SSD's PriorBox layer
(weiliu89/caffe, ``src/caffe/layers/prior_box_layer.cpp``) for a feature map of
``H x W`` cells, with the leading batch dimension (always 1) dropped.

Output layout
-------------
A ``float32`` array of shape ``[2, H * W * P * 4]`` where ``P`` is
:func:`priors_per_cell`:

* channel 0 holds the normalised corner coordinates
  ``xmin, ymin, xmax, ymax`` of every prior, as fractions of the image size
  (clamped to ``[0, 1]`` only when ``clip`` is true);
* channel 1 holds the variances: either one value repeated for every
  coordinate, or the four values ``v0, v1, v2, v3`` repeated per prior.

Flat index of a value in either channel:
``((row * W + col) * P + prior) * 4 + coord``, i.e. row-major over the cells,
then the priors of a cell, then the four coordinates.

Per-cell order of the priors
----------------------------
The aspect-ratio list starts as ``[1.0]``; each ``aspect_ratio`` value is
appended unless it is already in the list (within ``1e-6``), and when ``flip``
is true its reciprocal is appended right after it. Then, for each
``min_size[i]`` in the order given:

1. a square box of side ``min_size[i]``;
2. if ``max_size`` is given, a square box of side
   ``sqrt(min_size[i] * max_size[i])``;
3. for every aspect ratio ``ar != 1`` in list order, a box of width
   ``min_size[i] * sqrt(ar)`` and height ``min_size[i] / sqrt(ar)``.

So several ``min_size`` values with matching ``max_size`` values interleave as
``min0, sqrt(min0*max0), ars(min0), min1, sqrt(min1*max1), ars(min1), ...``.

Cell centres are ``((col + offset) * step_w, (row + offset) * step_h)``; a box
of width ``bw`` and height ``bh`` gives ``((cx - bw/2) / img_w,
(cy - bh/2) / img_h, (cx + bw/2) / img_w, (cy + bh/2) / img_h)``.

Caffe details honoured
----------------------
* ``img_size`` or ``img_h``/``img_w`` (not both) replace the data blob's size,
  both as the normaliser and for the default step.
* ``step`` or ``step_h``/``step_w`` (not both) replace the default step
  ``img / feature`` (computed in float32).
* ``min_size``/``max_size`` are truncated to integers before use, as Caffe
  does (``int min_size_ = min_sizes_[s]``). All shipped SSD models use whole
  numbers. OpenCV keeps fractional sizes.
* Variance defaults to ``0.1`` when no value is given. Otherwise give exactly 1
  or 4 values.
* ``clip`` defaults to false and ``flip`` to true, as in ``caffe.proto``.
  OpenCV's importer defaults ``clip`` to true when the field is missing.
* Precision: cell centres, steps, box sizes and aspect ratios are float32 as in
  Caffe. The corner formula is evaluated in float64 and then rounded to
  float32, as Caffe does (``box_width / 2.`` is a double expression). OpenCV
  evaluates it in float32, so the two can differ by about 1 ulp (at most
  1.2e-7 measured on the test cases).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from .structure import Refused

__all__ = ["MAX_PRIORS", "prior_boxes", "priors_per_cell"]

MAX_PRIORS = 1 << 24       # priors of one net: priors.dat up to 512 MiB, refused beyond
_MAX_RATIOS = 1024         # aspect_ratio values of one layer (deduplicated pairwise, as Caffe)
_F = "prior_box_param."


def _positive(field: str, values: list[float], what: str = "must be positive") -> None:
    """Caffe's CHECK_GT(value, 0); inf and NaN are refused too (NaN fails Caffe's CHECK,
    inf gives inf corners)."""
    for i, v in enumerate(values):
        if not (v > 0 and math.isfinite(v)):
            at = f"[{i}]" if len(values) > 1 else ""
            raise Refused(_F + field + at, f"{v} {what} and finite")

_Repeated = float | Sequence[float] | None


def _as_list(value: _Repeated) -> list[float]:
    """Accept a repeated proto field as a sequence, a single number, or None."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        raise TypeError(f"expected a number or a sequence of numbers, got {value!r}")
    if isinstance(value, Iterable):
        return [float(v) for v in value]
    return [float(value)]


def _aspect_ratios(aspect_ratio: _Repeated, flip: bool) -> list[np.float32]:
    """Caffe's aspect-ratio list: 1.0 first, no duplicates, optional reciprocals.

    Caffe does not CHECK the values, but 0 gives boxes of infinite height (1/sqrt(0)),
    a negative one NaN (sqrt(-1)): refused, as are inf and NaN."""
    values = _as_list(aspect_ratio)
    if len(values) > _MAX_RATIOS:
        raise Refused(_F + "aspect_ratio", f"{len(values)} values, more than {_MAX_RATIOS}")
    _positive("aspect_ratio", values)
    ratios = [np.float32(1.0)]
    for value in values:
        ar = np.float32(value)
        if any(abs(float(ar) - float(existing)) < 1e-6 for existing in ratios):
            continue
        ratios.append(ar)
        if flip:
            # Caffe: push_back(1./ar) -> double division, stored as float.
            ratios.append(np.float32(1.0 / float(ar)))
    return ratios


def _sizes(min_size: _Repeated, max_size: _Repeated) -> tuple[list[float], list[float]]:
    """prior_box_layer.cpp: ``CHECK(min_size_size() > 0) << "must provide min_size."``,
    ``CHECK_GT(min_sizes_.back(), 0)``, ``CHECK_EQ(min_size_size(), max_size_size())``,
    ``CHECK_GT(max_sizes_[i], min_sizes_[i])``.  Sizes are truncated to C++ ``int``:
    at most 2^31 - 1."""
    mins = _as_list(min_size)
    maxs = _as_list(max_size)
    if not mins:
        raise Refused(_F + "min_size", "must provide min_size")
    _positive("min_size", mins)
    if maxs:
        if len(maxs) != len(mins):
            raise Refused(_F + "max_size", f"{len(mins)} min_size values but {len(maxs)} "
                          "max_size values")
        for i, (lo, hi) in enumerate(zip(mins, maxs, strict=True)):
            if not hi > lo or not math.isfinite(hi):
                raise Refused(_F + "max_size" + (f"[{i}]" if len(maxs) > 1 else ""),
                              f"{hi} must be finite and greater than min_size {lo}")
    for field, values in (("min_size", mins), ("max_size", maxs)):
        if any(v >= 2**31 for v in values):
            raise Refused(_F + field, f"{max(values)} does not fit Caffe's int box size")
    return mins, maxs


def _box_sizes(mins: list[float], maxs: list[float],
               ratios: list[np.float32]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell box widths and heights (float32) in Caffe's prior order."""
    widths: list[np.float32] = []
    heights: list[np.float32] = []
    for s, min_value in enumerate(mins):
        lo = int(min_value)  # Caffe: int min_size_ = min_sizes_[s];
        widths.append(np.float32(lo))
        heights.append(np.float32(lo))
        if maxs:
            hi = int(maxs[s])
            side = np.float32(math.sqrt(lo * hi))
            widths.append(side)
            heights.append(side)
        for ar in ratios:
            if abs(float(ar) - 1.0) < 1e-6:
                continue
            root = np.sqrt(ar)  # float32 sqrt, like sqrt(float) in C++
            widths.append(np.float32(lo) * root)
            heights.append(np.float32(lo) / root)
    return np.array(widths, dtype=np.float32), np.array(heights, dtype=np.float32)


def _variances(variance: _Repeated) -> np.ndarray:
    """prior_box_layer.cpp: more than one variance ``CHECK_EQ(variance_size(), 4)``; each
    ``CHECK_GT(variance(i), 0)``; none: 0.1."""
    values = _as_list(variance)
    if not values:
        values = [0.1]
    if len(values) not in (1, 4):
        raise Refused(_F + "variance", f"need 1 or 4 values, got {len(values)}")
    _positive("variance", values)
    return np.array(values, dtype=np.float32)


def _image_size(image_hw: tuple[int, int], img_size, img_h, img_w) -> tuple[int, int]:
    """prior_box_layer.cpp: "Either img_size or img_h/img_w should be specified; not
    both.", ``CHECK_GT(img_h_, 0)``, ``CHECK_GT(img_w_, 0)``, ``CHECK_GT(img_size, 0)``."""
    if img_h is not None or img_w is not None:
        if img_size is not None:
            raise Refused(_F + "img_size", "give either img_size or img_h/img_w, not both")
        if img_h is None or img_w is None:
            raise Refused(_F + "img_h", "img_h and img_w must both be given")
        _positive("img_h", [img_h])
        _positive("img_w", [img_w])
        return int(img_h), int(img_w)
    if img_size is not None:
        _positive("img_size", [img_size])
        return int(img_size), int(img_size)
    return int(image_hw[0]), int(image_hw[1])


def _steps(feature_hw: tuple[int, int], img_hw: tuple[int, int],
           step, step_h, step_w) -> tuple[np.float32, np.float32]:
    """prior_box_layer.cpp: "Either step or step_h/step_w should be specified; not both.",
    ``CHECK_GT(step_h_, 0.)``, ``CHECK_GT(step_w_, 0.)``, ``CHECK_GT(step, 0)``; inf and
    values beyond float32 are refused too."""
    if step_h is not None or step_w is not None:
        if step is not None:
            raise Refused(_F + "step", "give either step or step_h/step_w, not both")
        if step_h is None or step_w is None:
            raise Refused(_F + "step_h", "step_h and step_w must both be given")
        _positive("step_h", [_f32(step_h)])
        _positive("step_w", [_f32(step_w)])
        return np.float32(step_h), np.float32(step_w)
    if step is not None:
        _positive("step", [_f32(step)])
        return np.float32(step), np.float32(step)
    # Caffe: static_cast<float>(img_width) / layer_width, in float.
    return (np.float32(img_hw[0]) / np.float32(feature_hw[0]),
            np.float32(img_hw[1]) / np.float32(feature_hw[1]))


def _f32(v: float) -> float:
    """``v`` rounded to float32 (inf beyond 3.4e38), as Caffe stores it."""
    with np.errstate(over="ignore"):
        return float(np.float32(v))


def _check_params(variance, img_size, img_h, img_w, step, step_h, step_w, offset) -> None:
    """The parameters that do not change the prior count, checked when the net is read."""
    _variances(variance)
    _image_size((1, 1), img_size, img_h, img_w)
    _steps((1, 1), (1, 1), step, step_h, step_w)
    # Caffe does not CHECK the offset; only inf/NaN (never a finite prior) is refused.
    if not math.isfinite(offset):
        raise Refused(_F + "offset", f"{offset} must be finite")


def priors_per_cell(*, min_size: _Repeated = (), max_size: _Repeated = (),
                    aspect_ratio: _Repeated = (), flip: bool = True,
                    clip: bool = False, variance: _Repeated = (0.1,),
                    img_size: float | None = None, img_h: float | None = None,
                    img_w: float | None = None, step: float | None = None,
                    step_h: float | None = None, step_w: float | None = None,
                    offset: float = 0.5) -> int:
    """Number of priors per feature-map cell for the given ``prior_box_param``.

    Takes the same keywords as :func:`prior_boxes`. Only ``min_size``,
    ``max_size``, ``aspect_ratio`` and ``flip`` change the count. The others
    are accepted so that the same parameter dict can be passed to both.
    """
    mins, maxs = _sizes(min_size, max_size)
    _check_params(variance, img_size, img_h, img_w, step, step_h, step_w, offset)
    return len(_aspect_ratios(aspect_ratio, bool(flip))) * len(mins) + len(maxs)


def prior_boxes(feature_hw: tuple[int, int], image_hw: tuple[int, int], *,
                min_size: _Repeated = (), max_size: _Repeated = (),
                aspect_ratio: _Repeated = (), flip: bool = True,
                clip: bool = False, variance: _Repeated = (0.1,),
                img_size: float | None = None, img_h: float | None = None,
                img_w: float | None = None, step: float | None = None,
                step_h: float | None = None, step_w: float | None = None,
                offset: float = 0.5) -> np.ndarray:
    """Return Caffe's PriorBox top without its batch axis: float32 ``[2, H*W*P*4]``.

    ``feature_hw`` is the (height, width) of the first bottom (the feature
    map) and ``image_hw`` that of the second bottom (the data blob). The
    keyword arguments are the fields of Caffe SSD's ``prior_box_param``.
    Repeated fields may be sequences or single numbers; ``None`` means the
    field is not set. See the module docstring for the layout and prior order.
    """
    layer_h, layer_w = (int(v) for v in feature_hw)
    if layer_h <= 0 or layer_w <= 0:
        raise ValueError(f"PriorBox: bad feature map size {feature_hw!r}")

    mins, maxs = _sizes(min_size, max_size)
    _check_params(variance, img_size, img_h, img_w, step, step_h, step_w, offset)
    ratios = _aspect_ratios(aspect_ratio, bool(flip))
    count = layer_h * layer_w * (len(ratios) * len(mins) + len(maxs))
    if count > MAX_PRIORS:          # before anything of that size is allocated
        raise Refused(_F + "min_size", f"{layer_h}x{layer_w} cells give {count} priors, more "
                      f"than {MAX_PRIORS}")
    box_w, box_h = _box_sizes(mins, maxs, ratios)
    variances = _variances(variance)
    img_hh, img_ww = _image_size(image_hw, img_size, img_h, img_w)
    step_y, step_x = _steps((layer_h, layer_w), (img_hh, img_ww), step, step_h, step_w)
    off = np.float32(_f32(offset))
    with np.errstate(over="ignore", invalid="ignore"):
        return _corners(layer_h, layer_w, off, step_y, step_x, box_w, box_h, img_hh, img_ww,
                        variances, clip)


def _corners(layer_h, layer_w, off, step_y, step_x, box_w, box_h, img_hh, img_ww, variances,
             clip) -> np.ndarray:
    # Cell centres in float32, as Caffe's float center_x / center_y.
    center_x = (np.arange(layer_w, dtype=np.float32) + off) * step_x  # [W]
    center_y = (np.arange(layer_h, dtype=np.float32) + off) * step_y  # [H]

    # Caffe evaluates (center - box / 2.) / img in double and stores a float.
    cx = center_x.astype(np.float64)[None, :, None]  # [1, W, 1]
    cy = center_y.astype(np.float64)[:, None, None]  # [H, 1, 1]
    half_w = box_w.astype(np.float64)[None, None, :] / 2.0  # [1, 1, P]
    half_h = box_h.astype(np.float64)[None, None, :] / 2.0
    num_priors = box_w.shape[0]
    shape = (layer_h, layer_w, num_priors)

    coords = np.empty(shape + (4,), dtype=np.float32)
    coords[..., 0] = np.broadcast_to((cx - half_w) / img_ww, shape)
    coords[..., 1] = np.broadcast_to((cy - half_h) / img_hh, shape)
    coords[..., 2] = np.broadcast_to((cx + half_w) / img_ww, shape)
    coords[..., 3] = np.broadcast_to((cy + half_h) / img_hh, shape)
    if clip:
        np.clip(coords, np.float32(0.0), np.float32(1.0), out=coords)

    bad = np.flatnonzero(~np.isfinite(coords.reshape(-1)))
    if bad.size:                    # float32 overflow of huge steps, offsets or sizes
        row, col, prior, k = np.unravel_index(int(bad[0]), coords.shape)
        raise Refused(_F + "step", f"prior {prior} of cell ({row}, {col}) would have "
                      f"{('xmin', 'ymin', 'xmax', 'ymax')[k]} {coords[row, col, prior, k]} "
                      "(step, offset or box size beyond float32)")
    out = np.empty((2, coords.size), dtype=np.float32)
    out[0] = coords.reshape(-1)
    if variances.size == 1:
        out[1] = variances[0]
    else:
        out[1] = np.tile(variances, coords.size // 4)
    return out
