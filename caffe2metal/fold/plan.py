"""The fold plan: which BatchNorm/Scale chains fold into which producer, and why not.

A chain is a BatchNorm, optionally followed by the Scale that alone reads it,
or a Scale alone.  It folds when the layer that wrote its input is a producer
(a layer type registered with a ``Producer`` role in ``layers``) and the
preconditions of the package doc hold; otherwise it is kept, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..graph import Graph, Layer
from ..layers import registry
from ..layers.affine import global_stats, scale_problem


def param_key(layer_type: str) -> str:
    """Where a producer type keeps num_output/bias_term/axis/group."""
    p = registry.producer(layer_type)
    return "convolution_param" if p is None else p.param_key


def out_axis_param(layer: Layer) -> dict:
    return layer.params.get(param_key(layer.type), {})


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
            if nxt is not None and scale_problem(nxt) is None:
                chain.append(nxt)
        claimed.update(layer.name for layer in chain)
        names = [layer.name for layer in chain]
        reason = _chain_problem(graph, chain, producers, users, outputs)
        if not reason and any(seen_names[n] > 1 for n in names):
            reason = "its layer name is used by more than one layer, so weights cannot be matched"
        if not reason and seen_names[producers[layer.bottoms[0]].name] > 1:
            reason = "the producer's layer name is used by more than one layer"
        if not reason:
            shared_names = [n for n in producers[layer.bottoms[0]].shared_params
                            if param_users[n] > 1]
            if shared_names:
                reason = (f"the producer shares its parameter '{shared_names[0]}' with another "
                          "layer (param { name }), which would get the folded weights too")
        if reason:
            result.kept.append(Kept(names, reason))
            continue
        prod = producers[layer.bottoms[0]]
        bn = chain[0] if chain[0].type == "BatchNorm" else None
        result.folds.append(Fold(
            producer=prod.name, layers=names, top=chain[-1].tops[0],
            eps=None if bn is None else float(
                bn.params.get("batch_norm_param", {}).get("eps", 1e-5)),
            scale_factor=None if bn is None or len(bn.blobs) < 3 or bn.blobs[2].size != 1
            else float(bn.blobs[2].reshape(-1)[0])))
    return result


def _chain_problem(graph, chain, producers, users, outputs) -> str | None:
    first = chain[0]
    for layer in chain:
        if layer.unknown_fields:
            return (f"'{layer.name}' has fields our schema does not know: "
                    f"{', '.join(layer.unknown_fields)}")
        if len(layer.bottoms) != 1 or len(layer.tops) != 1:
            if layer.type == "Scale":
                return scale_problem(layer)
            return f"'{layer.name}' does not have exactly one bottom and one top"
        if layer.type == "Scale" and (why := scale_problem(layer)):
            return why
        if layer.type == "BatchNorm" and not global_stats(layer):
            return ("use_global_stats is false: it normalises with each batch's own statistics, "
                    "which no fixed weights can reproduce")
    blob = first.bottoms[0]
    prod = producers.get(blob)
    if prod is None or registry.producer(prod.type) is None:
        return _describe(graph, prod, blob)
    if prod.unknown_fields:
        return f"producer '{prod.name}' has fields our schema does not know"
    if len(prod.tops) != 1:
        return f"producer '{prod.name}' has {len(prod.tops)} tops"
    readers = users.get(blob, [])
    if len(readers) != 1 or blob in outputs:
        others = [layer.name for layer in readers if layer is not first]
        return (f"the output of '{prod.name}' is also read by {', '.join(others)}: folding would "
                "change what they see")
    if out_axis_param(prod).get("axis", 1) != 1:
        return f"producer '{prod.name}' does not put channels on axis 1"
    if "num_output" not in out_axis_param(prod):
        return f"producer '{prod.name}' has no num_output"
    return None
