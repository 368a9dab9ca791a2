"""A manifest layer computed the way Caffe defines it, in plain numpy from the original blobs.

verify's second opinion when OpenCV and the Metal files disagree (see
``layers._second_opinion``): each layer type's ``reference`` role (its family
module in ``caffe2metal.layers``), then the folded (or kept) BatchNorm/Scale
chain as per-channel affines.
"""
from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..layers import registry
from ..layers.affine import chain_affine


def caffe_reference(graph: Graph, entry: dict, x: np.ndarray) -> np.ndarray:
    """A manifest layer computed the way Caffe defines it, from the ORIGINAL blobs.

    Plain float64 numpy in NCHW (batch item 0), independent of the export
    path: Convolution as a grouped correlation, Deconvolution as its
    scatter-add, InnerProduct as a matrix product, then the folded (or kept)
    BatchNorm/Scale chain as per-channel affines.  verify consults it only
    when OpenCV's output disagrees, to tell a wrong file from a wrong OpenCV.
    ``ValueError`` when the layer's type has no reference.
    """
    x = np.asarray(x, np.float64)[0]
    if entry["kind"] == "channel_affine":
        chain = [graph.layer(n) for n in entry["chain"]]
        y = x
    else:
        layer = graph.layer(entry["name"])
        chain = [graph.layer(n) for n in entry["folded"]]
        spec = registry.get(layer.type)
        if spec is None or spec.reference is None:
            raise ValueError(f"no numpy reference for layer type {layer.type!r}")
        y = spec.reference(layer, x)
    if chain:
        k, c = chain_affine(graph, chain)
        shape = (-1,) + (1,) * (y.ndim - 1)
        y = y * k.reshape(shape) + c.reshape(shape)
    return y[None]
