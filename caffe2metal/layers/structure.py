"""Layers that route, combine and reshape blobs without weights.

Input, Split, Silence, Eltwise (same shapes in, one out), Concat (along
``axis``, default 1), Slice (at ``slice_point``s, or in equal parts), Crop (to
the second bottom from ``axis``, default 2), Flatten, Reshape (0 copies a
dimension, one -1 is inferred), Permute, Tile, ArgMax.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from ..mps.geometry import channel_map, concat_offsets
from .activations import same_shape
from .registry import axis_index, need, register, register_plan, shape_rule


class Refused(ValueError):
    """A parameter Caffe's layer setup rejects (its CHECKs are the spec), raised by a shape
    rule: ``net.shapes`` reports it as ``layer 'x': <field>: <message>``."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


@shape_rule("Input")
def _input(layer, ins):
    shapes = [tuple(s.get("dim", [])) for s in layer.params.get("input_param", {}).get("shape", [])]
    if not shapes:
        raise ValueError("Input layer without input_param.shape")
    if len(shapes) == 1:
        shapes = shapes * len(layer.tops)
    return shapes, []


@shape_rule("Silence")
def _silence(layer, ins):
    return [], []


@shape_rule("Eltwise")
def _eltwise(layer, ins):
    xs = need(ins)
    if any(s != xs[0] for s in xs):
        raise ValueError(f"Eltwise bottoms differ in shape: {[list(s) for s in xs]}")
    return [xs[0]], []


@shape_rule("Concat")
def _concat(layer, ins):
    xs = need(ins)
    p = layer.params.get("concat_param", {})
    axis = axis_index(p.get("axis", p.get("concat_dim", 1)), len(xs[0]))
    for s in xs:
        if len(s) != len(xs[0]) or s[:axis] != xs[0][:axis] or s[axis + 1:] != xs[0][axis + 1:]:
            raise ValueError(f"Concat bottoms do not match: {[list(s) for s in xs]}")
    total = sum(s[axis] for s in xs)
    return [xs[0][:axis] + (total,) + xs[0][axis + 1:]], []


@shape_rule("Slice")
def _slice(layer, ins):
    (x,) = need(ins, 1)[:1]
    p = layer.params.get("slice_param", {})
    axis = axis_index(p.get("axis", p.get("slice_dim", 1)), len(x))
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
    return [x[:axis] + (b - a,) + x[axis + 1:] for a, b in itertools.pairwise(bounds)], []


@shape_rule("Flatten")
def _flatten(layer, ins):
    (x,) = need(ins, 1)[:1]
    p = layer.params.get("flatten_param", {})
    a = axis_index(p.get("axis", 1), len(x))
    e = axis_index(p.get("end_axis", -1), len(x))
    return [x[:a] + (math.prod(x[a:e + 1]),) + x[e + 1:]], []


@shape_rule("Reshape")
def _reshape(layer, ins):
    (x,) = need(ins, 1)[:1]
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


@shape_rule("Permute")
def _permute(layer, ins):
    (x,) = need(ins, 1)[:1]
    order = list(layer.params.get("permute_param", {}).get("order", []))
    order += [a for a in range(len(x)) if a not in order]
    if sorted(order) != list(range(len(x))):
        raise ValueError(f"permute order {order} is not a permutation of {len(x)} axes")
    return [tuple(x[a] for a in order)], []


def _crop_offsets(p: dict, ndim: int) -> tuple[int, list[int]]:
    """crop_layer.cpp: from ``axis`` on, one offset for every axis, one per axis, or 0
    (LayerSetUp's ``CHECK_EQ(start_axis + param.offset_size(), input_dim)`` when more than
    one is given)."""
    axis = axis_index(p.get("axis", 2), ndim)
    given = p.get("offset", [])
    given = list(given) if isinstance(given, (list, tuple)) else [given]
    if len(given) > 1 and axis + len(given) != ndim:
        raise Refused("crop_param.offset", f"{len(given)} offsets for the {ndim - axis} "
                      f"axes from axis {axis} (give one, or one per axis)")
    return axis, [int(given[0]) if len(given) == 1 else int(given[i - axis]) if given else 0
                  for i in range(axis, ndim)]


def _crop_forward(layer, xs: list) -> list:
    """crop_layer.cpp Forward: bottom 0 cut to bottom 1's size on every axis from ``axis``,
    starting at that axis' offset."""
    x, size = np.asarray(xs[0]), np.shape(xs[1])
    axis, offsets = _crop_offsets(layer.params.get("crop_param", {}), x.ndim)
    cut = tuple(slice(None) if i < axis else slice(offsets[i - axis], offsets[i - axis] + size[i])
                for i in range(x.ndim))
    return [np.ascontiguousarray(x[cut])]


def _argmax_forward(layer, xs: list) -> list:
    """argmax_layer.cpp Forward_cpu: per position, the ``top_k`` (value, index) pairs sorted by
    ``std::greater`` (the larger value first, a tie to the larger index); the top holds the
    indices, or with ``out_max_val`` the values (with ``axis``) or the indices then the values
    (without: over C*H*W of each item, top [N][2][top_k])."""
    x = np.asarray(xs[0], np.float32)
    p = layer.params.get("argmax_param", {})
    top_k, with_values = int(p.get("top_k", 1)), bool(p.get("out_max_val", False))
    axis = axis_index(p["axis"], x.ndim) if "axis" in p else None
    v = x.reshape(x.shape[0], -1) if axis is None else np.moveaxis(x, axis, -1)
    if not 1 <= top_k <= v.shape[-1]:
        raise ValueError(f"argmax_param.top_k {top_k} is not in 1..{v.shape[-1]}")
    index = np.broadcast_to(np.arange(v.shape[-1]), v.shape)
    order = np.lexsort((-index, -v), axis=-1)[..., :top_k]
    values = np.take_along_axis(v, order, -1)
    if axis is None:
        rows: list[np.ndarray] = [order.astype(np.float32)]
        if with_values:
            rows.append(values.astype(np.float32))
        return [np.stack(rows, axis=1)]
    return [np.ascontiguousarray(np.moveaxis(values if with_values else order, -1, axis),
                                 np.float32)]


def _tile_forward(layer, xs: list) -> list:
    """tile_layer.cpp Forward_cpu: each block from ``axis`` on copied ``tiles`` times."""
    x = np.asarray(xs[0])
    p = layer.params.get("tile_param", {})
    reps = [1] * x.ndim
    reps[axis_index(p.get("axis", 1), x.ndim)] = int(p["tiles"])
    return [np.tile(x, reps)]


@shape_rule("Crop", forward=_crop_forward)
def _crop(layer, ins):
    """Caffe's crop_layer.cpp: LayerSetUp ``CHECK_EQ(bottom.size(), 2)``, the offsets' count
    (``_crop_offsets``); Reshape ``CHECK_GE(bottom[0]->shape(i) - crop_offset,
    bottom[1]->shape(i))`` on every axis from ``axis`` (and ``bottom[1]->shape(i)`` must
    exist)."""
    if len(ins) != 2:
        raise Refused("bottom", f"Crop takes 2 bottoms (the data and the size), has {len(ins)}")
    a, b = need(ins)[:2]
    axis, offsets = _crop_offsets(layer.params.get("crop_param", {}), len(a))
    if len(b) < len(a):
        raise Refused("bottom", f"the size bottom has {len(b)} axes, the data {len(a)}")
    for i, off in zip(range(axis, len(a)), offsets, strict=True):
        if off < 0 or a[i] - off < b[i]:
            raise Refused("crop_param.offset", f"the crop of axis {i} (size {b[i]} at offset "
                          f"{off}) is outside the input's {a[i]}")
    return [a[:axis] + b[axis:len(a)]], []


@shape_rule("ArgMax", forward=_argmax_forward)
def _argmax(layer, ins):
    (x,) = need(ins, 1)[:1]
    p = layer.params.get("argmax_param", {})
    top_k = p.get("top_k", 1)
    count = x[axis_index(p["axis"], len(x))] if "axis" in p else math.prod(x[1:])
    if not 1 <= top_k <= count:     # LayerSetUp: CHECK_GE(top_k_, 1), CHECK_LE(top_k_, count)
        raise Refused("argmax_param.top_k", f"{top_k} is not in 1..{count}")
    if "axis" in p:
        axis = axis_index(p["axis"], len(x))
        return [x[:axis] + (top_k,) + x[axis + 1:]], []
    return [(x[0], 2 if p.get("out_max_val", False) else 1, top_k)], []


@shape_rule("Tile", forward=_tile_forward)
def _tile(layer, ins):
    """tile_layer.cpp Reshape: ``CHECK(tile_param.has_tiles())``, ``CHECK_GT(tiles, 0)``."""
    (x,) = need(ins, 1)[:1]
    p = layer.params.get("tile_param", {})
    axis = axis_index(p.get("axis", 1), len(x))
    if not isinstance(p.get("tiles"), int) or p["tiles"] <= 0:
        raise Refused("tile_param.tiles", f"{p.get('tiles')} must be set and positive")
    return [x[:axis] + (x[axis] * p["tiles"],) + x[axis + 1:]], []


register("Split", shape=same_shape)


_READ_OUT = ("an MPSImage read out in Caffe's order: channel-major C,H,W (or H,W,C after "
             "Permute(0,2,3,1)), each slice's padding channels dropped")


def _structure_plan(layer, ctx) -> dict:
    """Routing and reshaping: MPS concatenation where it is one, else exact Caffe semantics
    on the row-major blob (see ``_READ_OUT``)."""
    t, p = layer.type, layer.params
    if t == "Input":
        return {"app": {"op": "input"}}
    if t in ("Split", "Silence"):
        return {"app": {"op": "identity" if t == "Split" else "none",
                        "note": "every top is the bottom (no copy)" if t == "Split"
                        else "consumes its bottoms"}}
    if t == "Eltwise":
        q = p.get("eltwise_param", {})
        op = q.get("operation", "SUM")
        coeff = [float(c) for c in q.get("coeff", [])] or [1.0] * len(layer.bottoms)
        if op == "SUM":
            return {"mps": {"kernel": "MPSCNNAdd", "primaryScale": coeff[0],
                            "secondaryScale": coeff[1:], "bias": 0.0,
                            "note": "bottoms added in order, each scaled by its coefficient"},
                    "mpsgraph": {"op": "addition"}}
        if op == "PROD":
            return {"mps": {"kernel": "MPSCNNMultiply"}, "mpsgraph": {"op": "multiplication"}}
        return {"app": {"op": "max", "note": "element-wise maximum of the bottoms"}}
    if t == "Concat":
        shapes = [ctx.shape(b) for b in layer.bottoms]
        axis = axis_index(p.get("concat_param", {}).get("axis",
                          p.get("concat_param", {}).get("concat_dim", 1)), len(shapes[0]))
        if len(shapes[0]) == 4 and axis == 1:
            channels = [s[1] for s in shapes]
            offsets, total = concat_offsets(channels)
            return {"mps": {"kernel": "destinationFeatureChannelOffset",
                            "destinationFeatureChannelOffsets": offsets,
                            "sourceFeatureChannels": channels,
                            "destinationFeatureChannels": total,
                            "channelMap": channel_map(channels, offsets),
                            "aligned": offsets == list(itertools.accumulate([0] + channels[:-1])),
                            "note": ("each source written at its offset (a multiple of 4); "
                                     "Caffe channel i is destination channel channelMap[i]")},
                    "mpsgraph": {"op": "concatTensors", "dimension": 1}}
        return {"app": {"op": "concat", "axis": axis, "input": _READ_OUT}}
    if t == "Flatten":
        q = p.get("flatten_param", {})
        return {"app": {"op": "reshape", "input": _READ_OUT,
                        "note": f"Flatten axis {q.get('axis', 1)}..{q.get('end_axis', -1)}: "
                                "the row-major data unchanged"}}
    if t == "Reshape":
        return {"app": {"op": "reshape", "input": _READ_OUT, "note": "row-major data unchanged"}}
    if t == "Permute":
        shape = ctx.shape(layer.bottoms[0])
        order = list(p.get("permute_param", {}).get("order", []))
        order += [a for a in range(len(shape)) if a not in order]
        return {"app": {"op": "transpose", "order": order, "input": _READ_OUT,
                        "note": "order (0, 2, 3, 1) of an MPSImage is its pixels in H,W,C "
                                "order with each slice's padding channels dropped"}}
    if t == "Slice":
        q = p.get("slice_param", {})
        shape = ctx.shape(layer.bottoms[0])
        axis = axis_index(q.get("axis", q.get("slice_dim", 1)), len(shape))
        sizes = [ctx.shape(top)[axis] for top in layer.tops]
        return {"app": {"op": "slice", "axis": axis,
                        "starts": list(itertools.accumulate([0] + sizes[:-1])),
                        "sizes": sizes}}
    if t == "Crop":
        axis, offsets = _crop_offsets(p.get("crop_param", {}), len(ctx.shape(layer.bottoms[0])))
        return {"app": {"op": "crop", "axis": axis, "offset": offsets, "caffe_type": t,
                        "params": p, "note": "bottom 0 cut to bottom 1's size on every axis "
                        "from `axis`, starting at that axis' `offset`"}}
    notes = {"ArgMax": "per position the top_k largest (value, index) pairs, a tie to the "
                       "larger index; indices, or values (see argmax_layer.cpp)",
             "Tile": "the block from tile_param.axis on, copied tiles times"}
    return {"app": {"op": t.lower(), "caffe_type": t, "params": p,
                    "note": notes.get(t, f"Caffe's {t}")}}


register_plan("Input", "Silence", "Eltwise", "Concat", "Slice", "Flatten", "Reshape",
              "Permute", "Crop", "ArgMax", "Tile", "Split", plan=_structure_plan)
