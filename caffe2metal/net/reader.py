"""Read a deploy prototxt (and its caffemodel) into a Graph.

Prototxt
    Parsed by ``caffe.prototxt.parse_prototxt`` (the NetParameter, the text's
    field spans, unknown fields per layer block, V1 nets upgraded).  From that,
    :func:`read_prototxt` builds the TEST-phase graph: blobs written more than
    once get ``name#k`` unique names, layers are filtered with Caffe's
    NetStateRule logic (the excluded ones are recorded for the merged file),
    and shapes are inferred.

Caffemodel
    Attached by :func:`~caffe2metal.net.weights.attach_weights`: read by
    ``caffemodel.read_caffemodel`` (zero-copy) and matched to layers by name,
    as Caffe's ``CopyTrainedLayersFrom`` does; blob counts and shapes are
    checked against what each layer type expects.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..caffe import prototxt
from ..caffe.proto import caffe_pb2
from ..errors import ModelFormatError
from ..graph import Graph, Layer
from . import shapes as shape_rules
from .model import Model
from .names import BlobNames
from .weights import attach_weights

__all__ = ["Model", "read_model", "read_prototxt", "attach_weights"]


def read_model(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None) -> Model:
    model = read_prototxt(prototxt)
    if caffemodel is not None:
        attach_weights(model, caffemodel)
    return model


def read_prototxt(path: str | os.PathLike) -> Model:
    """The TEST-phase graph of the prototxt at ``path``, with its shapes inferred."""
    parsed = prototxt.parse_prototxt(str(path))               # 1. text -> NetParameter
    graph = Graph(name=parsed.net.name, source=parsed.path)
    names = BlobNames(graph, parsed)                          # 2. blob naming (#k)
    _add_inputs(graph, names, parsed)                         # 3. declared inputs
    phase = _split_by_phase(parsed)                           # 4. TEST-phase exclusion
    for idx, msg in phase.kept:                               # 5. layers
        graph.layers.append(_layer(msg, idx, names, parsed))
    model = Model(graph=graph, document=parsed.document, blocks=parsed.blocks,
                  excluded=phase.excluded, excluded_blocks=phase.excluded_blocks,
                  net_unknown_fields=parsed.net_unknown, prototxt=parsed.path, v1=parsed.v1)
    model.shapes = shape_rules.infer(graph)                   # 6. shapes
    return model


def _add_inputs(graph: Graph, names: BlobNames, parsed: prototxt.ParsedNet) -> None:
    """The net-level ``input`` blobs, with their declared shapes."""
    for name, shape in prototxt.declared_inputs(parsed.net, parsed.path):
        graph.inputs[names.define(name)] = shape


@dataclass
class _PhaseSplit:
    kept: list[tuple[int, caffe_pb2.LayerParameter]]    # (block index, layer) in the graph
    excluded: list[str]                                 # names of the layers left out
    excluded_blocks: list[int]                          # and their block indices


def _split_by_phase(parsed: prototxt.ParsedNet) -> _PhaseSplit:
    """The layers Caffe keeps in the TEST phase, and those it leaves out."""
    state = prototxt.test_state(parsed.net)
    split = _PhaseSplit([], [], [])
    for idx, msg in enumerate(parsed.layers):
        if prototxt.included(msg, state):
            split.kept.append((idx, msg))
        else:
            split.excluded.append(msg.name)
            split.excluded_blocks.append(idx)
    return split


def _layer(msg: caffe_pb2.LayerParameter, idx: int, names: BlobNames,
           parsed: prototxt.ParsedNet) -> Layer:
    """The graph layer for block ``idx``: bottoms resolved, tops named, params checked."""
    path = parsed.path
    bottoms = [names.read(b, path, msg.name) for b in msg.bottom]
    tops = [names.write(t, msg, j, path) for j, t in enumerate(msg.top)]
    params = prototxt.layer_params(msg)
    if (where := prototxt.nan_field(params)) is not None:
        raise ModelFormatError(f"{where} is NaN, which no layer can compute with",
                               file=path, layer=msg.name)
    return Layer(name=msg.name, type=msg.type, bottoms=bottoms, tops=tops,
                 params=params, unknown_fields=parsed.block_unknown.get(idx, []),
                 shared_params=[p.name for p in msg.param if p.name], index=idx)
