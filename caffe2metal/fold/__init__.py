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
from dataclasses import dataclass, field, replace

import numpy as np

from ..arrays import first_nonfinite
from ..errors import GraphError
from ..graph import Graph, Layer

PRODUCERS = ("Convolution", "DepthwiseConvolution", "ConvolutionDepthwise", "Deconvolution",
             "InnerProduct")
_PARAM_KEY = {"InnerProduct": "inner_product_param"}


def param_key(layer_type: str) -> str:
    """Where a producer type keeps num_output/bias_term/axis/group."""
    return _PARAM_KEY.get(layer_type, "convolution_param")


@dataclass
class Fold:
    producer: str
    layers: list[str]              # the BatchNorm/Scale layers folded in, in order
    top: str                       # unique name of the chain's last top (the producer's new top)
    eps: float | None = None
    scale_factor: float | None = None


@dataclass
class Kept:
    layers: list[str]              # a BatchNorm/Scale chain that stays
    reason: str


@dataclass
class Plan:
    folds: list[Fold] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)


def _out_axis_param(layer: Layer) -> dict:
    return layer.params.get(param_key(layer.type), {})


def _describe(graph: Graph, layer: Layer | None, blob: str) -> str:
    if layer is None:
        return f"its input '{graph.blob_names.get(blob, blob)}' is a net input"
    return f"its input comes from {layer.type} '{layer.name}', which cannot absorb it"


def plan(graph: Graph) -> Plan:
    """Decide, for every BatchNorm and Scale, whether it folds and into what."""
    producers = graph.producers()
    users = graph.consumers()
    outputs = set(graph.outputs())
    result = Plan()
    claimed: set[str] = set()
    seen_names: dict[str, int] = {}
    param_users: dict[str, int] = {}
    for layer in graph.layers:
        seen_names[layer.name] = seen_names.get(layer.name, 0) + 1
        for shared in layer.shared_params:
            param_users[shared] = param_users.get(shared, 0) + 1

    def sole_reader(blob: str, layer_type: str) -> Layer | None:
        readers = users.get(blob, [])
        if len(readers) == 1 and readers[0].type == layer_type and blob not in outputs:
            return readers[0]
        return None

    for layer in graph.layers:
        if layer.type not in ("BatchNorm", "Scale") or layer.name in claimed:
            continue
        chain = [layer]
        if layer.type == "BatchNorm" and len(layer.tops) == 1:
            nxt = sole_reader(layer.tops[0], "Scale")
            if nxt is not None and _scale_problem(nxt) is None:
                chain.append(nxt)
        claimed.update(l.name for l in chain)
        names = [l.name for l in chain]
        reason = _chain_problem(graph, chain, producers, users, outputs)
        if not reason and any(seen_names[n] > 1 for n in names):
            reason = "its layer name is used by more than one layer, so weights cannot be matched"
        if not reason and seen_names[producers[layer.bottoms[0]].name] > 1:
            reason = "the producer's layer name is used by more than one layer"
        if not reason:
            shared = [n for n in producers[layer.bottoms[0]].shared_params if param_users[n] > 1]
            if shared:
                reason = (f"the producer shares its parameter '{shared[0]}' with another layer "
                          "(param { name }), which would get the folded weights too")
        if reason:
            result.kept.append(Kept(names, reason))
            continue
        prod = producers[layer.bottoms[0]]
        bn = chain[0] if chain[0].type == "BatchNorm" else None
        result.folds.append(Fold(
            producer=prod.name, layers=names, top=chain[-1].tops[0],
            eps=None if bn is None else float(bn.params.get("batch_norm_param", {}).get("eps", 1e-5)),
            scale_factor=None if bn is None or len(bn.blobs) < 3 or bn.blobs[2].size != 1
            else float(bn.blobs[2].reshape(-1)[0])))
    return result


def _scale_problem(layer: Layer) -> str | None:
    if len(layer.bottoms) != 1:
        return "Scale with two bottoms multiplies by another blob, not by learned weights"
    p = layer.params.get("scale_param", {})
    if p.get("axis", 1) not in (1, -3) or p.get("num_axes", 1) != 1:
        return "Scale does not apply one factor per channel (axis/num_axes)"
    if layer.unknown_fields:
        return f"has fields our schema does not know: {', '.join(layer.unknown_fields)}"
    return None


def _chain_problem(graph, chain, producers, users, outputs) -> str | None:
    first = chain[0]
    for layer in chain:
        if layer.unknown_fields:
            return f"'{layer.name}' has fields our schema does not know: {', '.join(layer.unknown_fields)}"
        if len(layer.bottoms) != 1 or len(layer.tops) != 1:
            if layer.type == "Scale":
                return _scale_problem(layer)
            return f"'{layer.name}' does not have exactly one bottom and one top"
        if layer.type == "Scale" and (why := _scale_problem(layer)):
            return why
        if layer.type == "BatchNorm" and layer.params.get("batch_norm_param", {}).get(
                "use_global_stats", True) is False:
            return ("use_global_stats is false: it normalises with each batch's own statistics, "
                    "which no fixed weights can reproduce")
    blob = first.bottoms[0]
    prod = producers.get(blob)
    if prod is None or prod.type not in PRODUCERS:
        return _describe(graph, prod, blob)
    if prod.unknown_fields:
        return f"producer '{prod.name}' has fields our schema does not know"
    if len(prod.tops) != 1:
        return f"producer '{prod.name}' has {len(prod.tops)} tops"
    readers = users.get(blob, [])
    if len(readers) != 1 or blob in outputs:
        others = [l.name for l in readers if l is not first]
        return (f"the output of '{prod.name}' is also read by {', '.join(others)}: folding would "
                "change what they see")
    if _out_axis_param(prod).get("axis", 1) != 1:
        return f"producer '{prod.name}' does not put channels on axis 1"
    if "num_output" not in _out_axis_param(prod):
        return f"producer '{prod.name}' has no num_output"
    return None


# ---------------------------------------------------------------- arithmetic

def _check_finite(graph: Graph, layer: Layer, index: int) -> None:
    blob = np.asarray(layer.blobs[index])
    bad = first_nonfinite(blob)
    if bad is not None:
        raise GraphError(f"holds {blob.reshape(-1)[bad]} at element {bad}", file=graph.source,
                         layer=layer.name, blob=index)


def _finite(graph: Graph, layer: Layer, index: int) -> np.ndarray:
    """A (small, per-channel) blob as float64, checked finite."""
    _check_finite(graph, layer, index)
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
    k, c = None, None
    for layer in layers:
        k2, c2 = affine(graph, layer)
        if k is None:
            k, c = k2, c2
        else:
            if k2.size != k.size:
                raise GraphError(f"has {k2.size} channels, '{layers[0].name}' has {k.size}",
                                 file=graph.source, layer=layer.name)
            k, c = k * k2, c * k2 + c2
    return k, c


def _check_producer(graph: Graph, layer: Layer) -> tuple[Layer, int]:
    """Validate the blobs of a producer about to be folded: (the layer, its output channels).

    Shape inference checks them against the prototxt when the input shape is
    known; after a layer of unknown type it is not, so check here what the
    arithmetic relies on."""
    def bad(msg, blob=None):
        return GraphError(msg, file=graph.source, layer=layer.name, blob=blob)
    if len(layer.blobs) not in (1, 2):
        raise bad(f"{layer.type} needs 1 or 2 blobs (weights, bias), found {len(layer.blobs)}")
    w = layer.blobs[0]
    if layer.type == "InnerProduct" and w.ndim == 4 and w.shape[:2] == (1, 1):
        w = w.reshape(w.shape[2:])               # legacy (1, 1, out, in): Blob::ShapeEquals
        layer = replace(layer, blobs=[w, *layer.blobs[1:]])
    want = (2,) if layer.type == "InnerProduct" else tuple(range(3, 33))
    if w.ndim not in want:
        raise bad(f"weights have shape {list(w.shape)}, expected "
                  f"{'2' if layer.type == 'InnerProduct' else 'at least 3'} axes", blob=0)
    if layer.type == "Deconvolution":
        group = _out_axis_param(layer).get("group", 1)
        if group <= 0 or w.shape[0] % group:
            raise bad(f"weights have {w.shape[0]} input channels, not divisible by group "
                      f"{group}", blob=0)
    channels = output_channels(layer)
    if len(layer.blobs) > 1 and layer.blobs[1].size != channels:
        raise bad(f"has {layer.blobs[1].size} bias values for {channels} output channels",
                  blob=1)
    for i in range(1, len(layer.blobs)):        # the weights are checked as they are folded
        _check_finite(graph, layer, i)
    return layer, channels


def output_channels(layer: Layer) -> int:
    w = layer.blobs[0]
    if layer.type == "Deconvolution":
        return w.shape[1] * _out_axis_param(layer).get("group", 1)
    if layer.type == "InnerProduct" and _out_axis_param(layer).get("transpose", False):
        return w.shape[1]
    return w.shape[0]


BLOCK_BYTES = 1 << 21           # folded weights are handed out 2 MiB at a time (see below)


class FoldedWeights:
    """A producer's folded weights ``W' = W*k``, computed when asked for.

    Holds only the source weights (a view of the caffemodel, at least two
    axes: ``_check_producer``) and the per-channel factors.  Slicing rows
    (``fw[i:j]``, axis 0) computes those rows; ``np.asarray(fw)`` computes all
    of them; :meth:`row_blocks` yields them ``BLOCK_BYTES`` at a time and shows
    each block to the ``observers`` (``metal.stream_folded`` writes the Metal
    file from the blocks the merged-caffemodel writer folds: one fold, two
    outputs).  No folded copy of a layer ever exists whole (a VGG fc6 is
    411 MB): the source pages are the only copy of the model in memory.

    Every row is computed in float64 and rounded to float32 once (numpy's
    buffered casting: no float64 copy of the weights either); a value that
    does not fit in float32 raises :class:`GraphError` naming the producer.

    Blocks are small on purpose: malloc serves 2 MiB again and again from
    memory it has already faulted in, while from 4 MiB on numpy asks for huge
    pages and every block becomes fresh memory the kernel must zero (measured
    on the VGG16 bench: 16 MiB blocks made folding 5x slower, 4-8 MiB blocks
    the whole conversion ~1.4x slower).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, source: np.ndarray, mult: np.ndarray, *, file=None, layer: str = "",
                 chain: list[str] | None = None):
        self.source, self.mult = source, mult
        self.shape, self.ndim, self.size = source.shape, source.ndim, source.size
        self.nbytes = self.size * self.dtype.itemsize
        self.observers: list = []      # fn(first_row, rows) for every block row_blocks makes
        self._where = (file, layer, list(chain or []))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self.rows(start, max(start, stop))
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        a = self.rows(0, len(self))
        return a if dtype is None else a.astype(dtype, copy=False)

    def rows(self, start: int, stop: int) -> np.ndarray:
        w = self.source[start:stop]
        m = self.mult if self.mult.shape[0] == 1 else self.mult[start:stop]
        out = np.empty(w.shape, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(w, m, out=out, dtype=np.float64, casting="same_kind")
        if not np.isfinite(out).all():
            self._overflow(w, start)
        return out

    def row_blocks(self, block_bytes: int | None = None):
        """The folded rows, ``block_bytes`` (default ``BLOCK_BYTES``) of them, at least
        one row, at a time."""
        block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
        n = len(self)
        rows = max(1, block_bytes // max(1, self.nbytes // max(1, n)))
        for i in range(0, n, rows):
            block = self.rows(i, min(n, i + rows))
            for observe in self.observers:
                observe(i, block)
            yield block

    def _overflow(self, w: np.ndarray, start: int):
        file, layer, chain = self._where
        bad = first_nonfinite(w)
        if bad is not None:                     # the source itself (not from the reader?)
            at = start * (self.size // max(1, len(self))) + bad
            raise GraphError(f"holds {w.reshape(-1)[bad]} at element {at}", file=file,
                             layer=layer, blob=0)
        raise GraphError(f"folding {', '.join(chain)} into it gives values beyond float32 (a "
                         "variance + eps near 0 or huge weights?)", file=file, layer=layer,
                         blob=0)


def folded_weights(graph: Graph, layer: Layer, k: np.ndarray, fold_layers=()) -> FoldedWeights:
    """``layer``'s weights followed by the per-channel factors ``k``, as a FoldedWeights."""
    w = np.asarray(layer.blobs[0])
    if layer.type == "Deconvolution":
        group = _out_axis_param(layer).get("group", 1)
        cin, per = w.shape[0], w.shape[1]
        # row r of W (an input channel) is in group r // (cin/group): per-row factors
        mult = np.repeat(k.reshape(group, 1, per), cin // group, axis=1).reshape(
            (cin, per) + (1,) * (w.ndim - 2))
    elif layer.type == "InnerProduct" and _out_axis_param(layer).get("transpose", False):
        mult = k.reshape(1, -1)                 # the same factors for every row
    else:
        mult = k.reshape((-1,) + (1,) * (w.ndim - 1))
    return FoldedWeights(w, mult, file=graph.source, layer=layer.name, chain=list(fold_layers))


def apply(graph: Graph, the_plan: Plan, *, lazy: bool = False) -> Graph:
    """A new graph with every planned fold done; the input graph is not changed.

    ``lazy``: the folded weights are :class:`FoldedWeights` (computed as they
    are written, so an overflow is reported then) instead of arrays."""
    by_name = {l.name: l for l in graph.layers}
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
        w = folded_weights(graph, prod, k, f.layers)
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
    layers = [new_layers.get(l.name, l) for l in graph.layers if l.name not in folded]
    return replace(graph, layers=layers)


def count_values(graph: Graph) -> int:
    return sum(math.prod(b.shape) for l in graph.layers for b in l.blobs)
