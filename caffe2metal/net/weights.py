"""Attach a caffemodel's weights to the layers of a net read from its prototxt.

The caffemodel is read by ``caffe.caffemodel.read_caffemodel`` (zero-copy) and
matched to layers by name, as Caffe's ``CopyTrainedLayersFrom`` does (the last
layer of a name wins); blob counts and shapes are checked against what each
layer type expects, and every value must be finite.
"""
from __future__ import annotations

import os

from ..arrays import first_nonfinite
from ..caffe.caffemodel import read_caffemodel
from ..errors import GraphError, ModelFormatError
from .model import Model

__all__ = ["attach_weights"]


def attach_weights(model: Model, caffemodel: str | os.PathLike) -> None:
    """Give every layer its blobs from ``caffemodel``, checked against the prototxt."""
    path = str(caffemodel)
    # a net whose layers all take no blobs is saved with no layers at all
    weightless = all(s is not None and not s for s in model.shapes.params.values())
    stored = read_caffemodel(path, allow_empty=weightless).by_name()   # the last of a name wins
    model.caffemodel = path
    expected = model.shapes.params
    for layer in model.graph.layers:
        want = expected.get(layer.name)
        entry = stored.get(layer.name)
        blobs = list(entry.blobs) if entry is not None else []
        if want is None:            # a type whose blobs we do not know: take what is there
            layer.blobs = blobs
            continue
        if not want:
            if blobs:
                raise GraphError(f"{layer.type} takes no parameter blobs but the caffemodel has "
                                 f"{len(blobs)}", file=path, layer=layer.name)
            continue
        if entry is None:
            raise GraphError(f"needs {len(want)} parameter blob(s) {[list(s) for s in want]} "
                             "but the caffemodel has no layer of that name", file=path,
                             layer=layer.name)
        counts = {len(want)}
        if layer.type == "BatchNorm":
            counts.add(5)                           # NVCaffe: + scale, bias
            want = want + [want[0], want[0]]
        if len(blobs) not in counts:
            raise GraphError(f"expects {len(want)} parameter blob(s) but the caffemodel has "
                             f"{len(blobs)}", file=path, layer=layer.name)
        fixed = []
        for i, (blob, shape) in enumerate(zip(blobs, want, strict=False)):
            shape = tuple(shape)
            if blob.shape != shape:
                # legacy 4-D blobs (num, channels, height, width) hold the same values
                if not _legacy_compatible(blob.shape, shape):
                    raise GraphError(f"has shape {list(blob.shape)} but the prototxt implies "
                                     f"{list(shape)}", file=path, layer=layer.name, blob=i)
                blob = blob.reshape(shape)
            fixed.append(blob)
        layer.blobs = fixed
    for layer in model.graph.layers:
        for i, blob in enumerate(layer.blobs):
            bad = first_nonfinite(blob)
            if bad is not None:
                value = blob.reshape(-1)[bad]
                raise ModelFormatError(f"holds {value} at element {bad}: weights and "
                                       "statistics must be finite numbers", file=path,
                                       layer=layer.name, blob=i)


def _legacy_compatible(have: tuple, want: tuple) -> bool:
    """Caffe's Blob::ShapeEquals for legacy num/channels/height/width blobs:
    the expected shape, padded on the left with 1s to four axes."""
    return len(have) == 4 and len(want) <= 4 and (1,) * (4 - len(want)) + tuple(want) == tuple(have)
