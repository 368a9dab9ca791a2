"""BatchNorm, Scale and Bias: per-channel affines ``y = x*k + c``.

* BatchNorm: [0] mean*s, [1] variance*s, [2] the scale factor s (one value);
  f = 0 if s == 0 else 1/s; mean = blob0*f; var = blob1*f;
  k = 1/sqrt(var + eps) (``batch_norm_param.eps``, default 1e-5), c = -mean*k.
  NVCaffe writes 5 blobs: [3] scale and [4] bias, applied after like a Scale.
* Scale: [0] gamma, [1] beta when ``scale_param.bias_term`` (default false):
  k = gamma, c = beta (0).  A Scale with two bottoms takes gamma from the
  second bottom and has no learned gamma: not an affine of learned weights.
* Bias: [0] beta, or from a second bottom.

Affines compose as (k1, c1) then (k2, c2) = (k1*k2, c1*k2 + c2); the fold puts
the composition into the producer before the chain (``fold``), and an
unfoldable chain is exported as one ``channel_affine`` (``export.metal``).
Errors name the layer and the blob: NaN/inf, a non-finite eps, a negative
variance, variance + eps <= 0, blob counts or channel counts that disagree.
"""
from __future__ import annotations

import math

import numpy as np

from ..arrays import first_nonfinite
from ..errors import GraphError
from ..graph import Graph, Layer
from .planning import weighted
from .registry import axis_index, need, register, register_plan

TYPES = ("BatchNorm", "Scale")            # the layers a fold absorbs


# ---------------------------------------------------------------- shape

def _batchnorm_shape(layer: Layer, ins: list):
    (x,) = need(ins, 1)[:1]
    c = x[1] if len(x) > 1 else 1
    return [x], [(c,), (c,), (1,)]


def _scale_shape(layer: Layer, ins: list):
    x = need(ins, 1)[0]
    key = "scale_param" if layer.type == "Scale" else "bias_param"
    p = layer.params.get(key, {})
    if len(ins) > 1:       # the factor comes from the second bottom: no learned gamma
        if layer.type == "Bias":
            return [x], []
        return [x], ([tuple(need(ins)[1])] if p.get("bias_term", False) else [])
    axis = axis_index(p.get("axis", 1), len(x))
    num_axes = p.get("num_axes", 1)
    shape = x[axis:] if num_axes == -1 else x[axis:axis + num_axes]
    params = [shape]
    if layer.type == "Scale" and p.get("bias_term", False):
        params.append(shape)
    return [x], params


register("BatchNorm", shape=_batchnorm_shape)
register("Scale", "Bias", shape=_scale_shape)


# ---------------------------------------------------------------- when a chain is one affine

def _per_channel(p: dict) -> bool:
    return p.get("axis", 1) in (1, -3) and p.get("num_axes", 1) == 1


def scale_problem(layer: Layer) -> str | None:
    """Why a Scale cannot fold into the layer before it, or None."""
    if len(layer.bottoms) != 1:
        return "Scale with two bottoms multiplies by another blob, not by learned weights"
    if not _per_channel(layer.params.get("scale_param", {})):
        return "Scale does not apply one factor per channel (axis/num_axes)"
    if layer.unknown_fields:
        return f"has fields our schema does not know: {', '.join(layer.unknown_fields)}"
    return None


def global_stats(layer: Layer) -> bool:
    """A BatchNorm that normalises with stored statistics (the TEST-phase default)."""
    return layer.params.get("batch_norm_param", {}).get("use_global_stats", True) is not False


def affine_problem(chain: list[Layer], shapes) -> str | None:
    """Why a kept BatchNorm/Scale chain cannot be one per-channel affine, or None."""
    for layer in chain:
        if len(layer.bottoms) != 1:
            return f"'{layer.name}' multiplies by a second bottom, not by learned weights"
        if layer.type == "BatchNorm" and not global_stats(layer):
            return f"'{layer.name}' normalises with each batch's own statistics"
        if layer.type == "Scale" and not _per_channel(layer.params.get("scale_param", {})):
            return f"'{layer.name}' does not scale per channel (axis/num_axes)"
        if layer.unknown_fields:
            return f"'{layer.name}' has fields our schema does not know"
    s = shapes.get(chain[0].bottoms[0])
    channels = None if not s or len(s) < 2 else s[1]
    sizes = {np.asarray(layer.blobs[0]).size for layer in chain if layer.blobs}
    if channels is not None and sizes - {channels}:
        return f"parameters have {sorted(sizes)} values for {channels} channels"
    return None


# ---------------------------------------------------------------- arithmetic

def check_finite(graph: Graph, layer: Layer, index: int) -> None:
    blob = np.asarray(layer.blobs[index])
    bad = first_nonfinite(blob)
    if bad is not None:
        raise GraphError(f"holds {blob.reshape(-1)[bad]} at element {bad}", file=graph.source,
                         layer=layer.name, blob=index)


def _finite(graph: Graph, layer: Layer, index: int) -> np.ndarray:
    """A (small, per-channel) blob as float64, checked finite."""
    check_finite(graph, layer, index)
    return np.asarray(layer.blobs[index], dtype=np.float64).reshape(-1)


def _same_size(graph: Graph, layer: Layer, blobs: dict[int, np.ndarray]) -> None:
    """Blobs that hold one value per channel must agree on the channel count."""
    first, *rest = blobs.items()
    for i, b in rest:
        if b.size != first[1].size:
            raise GraphError(f"has {b.size} values but blob {first[0]} has {first[1].size}: "
                             "expected one value per channel in both", file=graph.source,
                             layer=layer.name, blob=i)


def affine(graph: Graph, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (k, c) with y = x*k + c that a BatchNorm or Scale computes."""
    if layer.type == "Scale":
        if len(layer.blobs) not in (1, 2):
            raise GraphError(f"Scale needs 1 or 2 blobs (gamma, beta), found {len(layer.blobs)}",
                             file=graph.source, layer=layer.name)
        gamma = _finite(graph, layer, 0)
        beta = _finite(graph, layer, 1) if len(layer.blobs) > 1 else np.zeros_like(gamma)
        _same_size(graph, layer, {0: gamma, 1: beta})
        return gamma, beta
    if len(layer.blobs) not in (3, 5):
        raise GraphError(f"BatchNorm needs 3 blobs (or NVCaffe's 5), found {len(layer.blobs)}",
                         file=graph.source, layer=layer.name)
    s = _finite(graph, layer, 2)
    if s.size != 1:
        raise GraphError(f"the scale factor blob has {s.size} values, expected 1",
                         file=graph.source, layer=layer.name, blob=2)
    f = 0.0 if s[0] == 0 else 1.0 / s[0]
    mean, var = _finite(graph, layer, 0) * f, _finite(graph, layer, 1) * f
    _same_size(graph, layer, {0: mean, 1: var})
    eps = float(layer.params.get("batch_norm_param", {}).get("eps", 1e-5))
    if not math.isfinite(eps):
        raise GraphError(f"batch_norm_param.eps is {eps}", file=graph.source, layer=layer.name)
    if (var < 0).any():
        bad = int(np.flatnonzero(var < 0)[0])
        raise GraphError(f"variance {var[bad]:g} < 0 at channel {bad} (scale factor "
                         f"{s[0]:g})", file=graph.source, layer=layer.name, blob=1)
    denom = var + eps
    if (denom <= 0).any():
        bad = int(np.flatnonzero(denom <= 0)[0])
        raise GraphError(f"variance + eps = {denom[bad]:g} <= 0 at channel {bad} "
                         f"(variance {var[bad]:g}, eps {eps:g})", file=graph.source,
                         layer=layer.name, blob=1)
    k = 1.0 / np.sqrt(denom)
    c = -mean * k
    if len(layer.blobs) == 5:                      # NVCaffe: learned scale and bias inside
        gamma, beta = _finite(graph, layer, 3), _finite(graph, layer, 4)
        _same_size(graph, layer, {0: mean, 3: gamma, 4: beta})
        k, c = k * gamma, c * gamma + beta
    return k, c


def chain_affine(graph: Graph, layers: list[Layer]) -> tuple[np.ndarray, np.ndarray]:
    """The composition of the affines of ``layers`` (at least one), in order."""
    k, c = affine(graph, layers[0])
    for layer in layers[1:]:
        k2, c2 = affine(graph, layer)
        if k2.size != k.size:
            raise GraphError(f"has {k2.size} channels, '{layers[0].name}' has {k.size}",
                             file=graph.source, layer=layer.name)
        k, c = k * k2, c * k2 + c2
    return k, c


def _plan(layer: Layer, ctx) -> dict:
    """A Scale with two bottoms multiplies by its second bottom (SE gating); everything
    else is the ``channel_affine`` (or folded layer) of its manifest entry."""
    if layer.type == "Scale" and len(layer.bottoms) == 2:
        q = layer.params.get("scale_param", {})
        if q.get("bias_term", False):
            return {"app": {"op": "unavailable", "reason": "Scale with two bottoms and a "
                            "learned bias: the bias has no Metal file"}}
        x = ctx.shape(layer.bottoms[0])
        axis = axis_index(q.get("axis", 1), len(x))
        return {"app": {"op": "scale_by", "axis": axis,
                        "note": "y = bottom0 * bottom1, bottom1's dimensions lined up with "
                                "bottom0's from axis on and broadcast over the rest (Caffe's "
                                "Scale with two bottoms); for an (N,C) gate at axis 0 or 1 "
                                "this is a per-channel multiply of the MPSImage"}}
    return weighted(layer, ctx)


register_plan("BatchNorm", "Scale", "Bias", plan=_plan)
