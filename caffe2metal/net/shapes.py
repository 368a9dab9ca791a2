"""Shape inference: every blob's shape, from the declared inputs through each layer.

Each layer type's rule lives with its family in ``layers`` (registered by
type).  A rule gets the layer and the shapes of its bottoms (tuples of ints,
batch first) and returns ``(top_shapes, param_shapes)``; ``param_shapes``
lists the parameter blobs the layer expects, ``None`` when the layer's blob
layout is not known to us.

Unknown layer types, and layers with fields our schema does not know, give
unknown (``None``) shapes downstream: never a guess.  A dimension that only the
data decides (the number of detections) is ``None`` inside a shape tuple.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import GraphError
from ..graph import Graph
from ..layers import Unknown, registry
from ..layers.structure import Refused

Shape = tuple


def known_types() -> frozenset:
    return registry.known()


@dataclass
class Shapes:
    blobs: dict[str, Shape | None] = field(default_factory=dict)
    params: dict[str, list | None] = field(default_factory=dict)   # layer -> expected blob shapes
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
        spec = registry.get(layer.type)
        fn = None if spec is None else spec.shape
        tops: list = [None] * len(layer.tops)
        params: list | None = None
        if fn is not None and not layer.unknown_fields:
            try:
                tops, params = fn(layer, ins)
            except Unknown:
                tops, params = [None] * len(layer.tops), None
            except Refused as e:            # a parameter Caffe's setup rejects: field, why
                raise GraphError(str(e), file=graph.source, layer=layer.name) from None
            except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError,
                    OverflowError) as e:
                raise GraphError(f"cannot infer output shape ({type(e).__name__}: {e})",
                                 file=graph.source, layer=layer.name) from None
            tops = list(tops)
            if len(tops) != len(layer.tops):
                raise GraphError(f"{layer.type} gives {len(tops)} outputs but the layer has "
                                 f"{len(layer.tops)} tops", file=graph.source, layer=layer.name)
            for top, shape in zip(layer.tops, tops, strict=True):
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
        for top, shape in zip(layer.tops, tops, strict=True):
            out.blobs[top] = None if shape is None else tuple(shape)
    return out
