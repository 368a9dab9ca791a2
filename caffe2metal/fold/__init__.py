"""Fold BatchNorm (and the Scale after it) into the layer that produced its input.

Before::

    conv (W, b?) -> BatchNorm (mean*s, var*s, s) -> Scale (gamma, beta?) -> ...

After::

    conv (W', b') -> ...            top renamed to the chain's last top

Preconditions (otherwise the chain stays, and the plan says why):
* the producer is a Convolution (any group, fork depthwise types),
  Deconvolution or InnerProduct whose output channels are Caffe axis 1;
* its output is read by the BatchNorm/Scale alone (so it is not a net output);
* BatchNorm uses global statistics (the TEST-phase default); a Scale has one
  bottom and one gamma per channel; no layer has fields our schema lacks;
* the producer does not share its blobs with another layer (``param { name }``)
  and no layer name involved is used twice (weights are matched by name).

Formula (float64, cast to float32 once).  Each layer of the chain is a
per-channel affine ``y = x*k + c``:
* BatchNorm: f = 0 if s == 0 else 1/s; mean = blob0*f; var = blob1*f;
  k = 1/sqrt(var + eps), c = -mean*k; NVCaffe's 5-blob form then applies its
  own scale/bias ([3], [4]) like a Scale layer;
* Scale: k = gamma, c = beta (0 without bias_term).
Affines compose as (k1, c1) then (k2, c2) = (k1*k2, c1*k2 + c2), and the
producer becomes W' = W*k along its output-channel axis, b' = b*k + c
(b = 0 where the producer had no bias).

Errors (GraphError naming the layer and, where one is to blame, the blob): a
NaN or infinity in any blob of the chain or the producer, a non-finite eps, a
negative variance, variance + eps <= 0, blob counts or per-channel sizes that
disagree (after a layer of unknown type nothing else has checked them), and a
fold whose result does not fit in float32.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..errors import GraphError
from ..graph import Graph, Layer
from ..layers import registry
from ..layers.affine import chain_affine, check_finite
from .plan import Fold, Kept, Plan, param_key, plan
from .weights import BLOCK_BYTES, FoldedWeights, folded_weights

__all__ = ["BLOCK_BYTES", "Fold", "FoldedWeights", "Kept", "Plan", "apply", "chain_affine",
           "count_values", "folded_weights", "output_channels", "param_key", "plan"]


def output_channels(layer: Layer) -> int:
    return registry.producer_of(layer.type).output_channels(layer)


def _check_producer(graph: Graph, layer: Layer) -> tuple[Layer, int]:
    """Validate the blobs of a producer about to be folded: (the layer, its output channels).

    Shape inference checks them against the prototxt when the input shape is
    known; after a layer of unknown type it is not, so check here what the
    arithmetic relies on."""
    def bad(msg, blob=None):
        return GraphError(msg, file=graph.source, layer=layer.name, blob=blob)
    role = registry.producer_of(layer.type)
    if len(layer.blobs) not in (1, 2):
        raise bad(f"{layer.type} needs 1 or 2 blobs (weights, bias), found {len(layer.blobs)}")
    w = layer.blobs[0]
    if role.normalize is not None and role.normalize(w) is not w:
        w = role.normalize(w)
        layer = replace(layer, blobs=[w, *layer.blobs[1:]])
    if w.ndim not in role.weight_axes:
        want = (str(role.weight_axes[0]) if len(role.weight_axes) == 1
                else f"at least {role.weight_axes[0]}")
        raise bad(f"weights have shape {list(w.shape)}, expected {want} axes", blob=0)
    if role.check is not None and (why := role.check(layer, w)):
        raise bad(why, blob=0)
    channels = output_channels(layer)
    if len(layer.blobs) > 1 and layer.blobs[1].size != channels:
        raise bad(f"has {layer.blobs[1].size} bias values for {channels} output channels",
                  blob=1)
    for i in range(1, len(layer.blobs)):        # the weights are checked as they are folded
        check_finite(graph, layer, i)
    return layer, channels


def apply(graph: Graph, the_plan: Plan, *, lazy: bool = False) -> Graph:
    """A new graph with every planned fold done; the input graph is not changed.

    ``lazy``: the folded weights are :class:`FoldedWeights` (computed as they
    are written, so an overflow is reported then) instead of arrays."""
    by_name = {layer.name: layer for layer in graph.layers}
    folded: set[str] = set()
    new_layers: dict[str, Layer] = {}
    for f in the_plan.folds:
        prod = by_name[f.producer]
        chain = [by_name[n] for n in f.layers]
        prod, channels = _check_producer(graph, prod)
        k, c = chain_affine(graph, chain)
        if k.size != channels:
            raise GraphError(f"has {k.size} channels but '{prod.name}' produces {channels}",
                             file=graph.source, layer=chain[0].name)
        w: np.ndarray | FoldedWeights = folded_weights(graph, prod, k, f.layers)
        if not lazy:
            w = np.asarray(w)
        b = (np.asarray(prod.blobs[1], dtype=np.float64).reshape(-1) if len(prod.blobs) > 1
             else np.zeros(k.size))
        with np.errstate(over="ignore", invalid="ignore"):
            b = (b * k + c).astype(np.float32)
        if not np.isfinite(b).all():
            raise GraphError(f"folding {', '.join(f.layers)} into it gives values beyond "
                             "float32 (a variance + eps near 0 or huge weights?)",
                             file=graph.source, layer=prod.name, blob=1)
        key = param_key(prod.type)
        params = {**prod.params, key: {**prod.params.get(key, {}), "bias_term": True}}
        new_layers[prod.name] = replace(prod, tops=[f.top], blobs=[w, b], params=params)
        folded.update(f.layers)
    layers = [new_layers.get(layer.name, layer) for layer in graph.layers
              if layer.name not in folded]
    return replace(graph, layers=layers)


def count_values(graph: Graph) -> int:
    return sum(math.prod(b.shape) for layer in graph.layers for b in layer.blobs)
