"""The manifest's execution plan: every TEST-phase layer of the merged net as an op.

Ops are in the merged net's order (Caffe's: every bottom is computed before it is
read), each named by its Caffe layer name, with unique blob names (``x#1`` for
an in-place write) and Caffe shapes.  What an op is comes from its type's
``plan`` role (``layers``): ``mps`` (the MPSCNN kernel and its parameters),
``mpsgraph`` (where MPSGraph differs) and/or ``app`` (exact semantics of what has
no MPS kernel).  An unfoldable BatchNorm/Scale chain is one op named after its
first layer that ``covers`` the others.  A type without a plan role is still an
op (``app.op`` = the type, Caffe's definition): nothing is silently absent.

The format is specified in the README ("The execution plan") and the schema.
"""
from __future__ import annotations

from ..graph import Graph, Layer
from ..layers import registry
from ..layers.registry import PlanContext, Unknown


def build_plan(model, merged: Graph, manifest: dict) -> list[dict]:
    """The ``plan`` key of the manifest (after ``export.metal`` filled ``layers``/``ssd``)."""
    entries = {e["name"]: e for e in manifest.get("layers", [])}
    scales = {n["name"]: n["scale"] for n in (manifest.get("metal") or {}).get("normalize", [])}
    ctx = PlanContext(shapes=model.shapes.blobs, entries=entries, ssd=manifest.get("ssd"),
                      scales=scales)
    covered = {n: e["name"] for e in entries.values() for n in e.get("chain", [])[1:]}
    chain_top = {e["name"]: merged.layer(e["chain"][-1]).tops[0]
                 for e in entries.values() if e.get("chain")}
    ops = []
    for layer in merged.layers:
        if layer.name in covered:
            continue
        tops = [chain_top[layer.name]] if layer.name in chain_top else list(layer.tops)
        op = {"name": layer.name, "type": layer.type, "bottoms": list(layer.bottoms),
              "tops": tops,
              "shapes": {b: _shape(model, b) for b in dict.fromkeys([*layer.bottoms, *tops])}}
        if layer.name in chain_top:
            op["covers"] = entries[layer.name]["chain"]
        op.update(_realisation(layer, ctx))
        ops.append(op)
    return ops


def _shape(model, blob: str) -> list | None:
    s = model.shapes.blobs.get(blob)
    return None if s is None else list(s)


def _realisation(layer: Layer, ctx: PlanContext) -> dict:
    spec = registry.get(layer.type)
    if spec is None or spec.plan is None:
        return {"app": {"op": layer.type.lower(), "caffe_type": layer.type,
                        "params": layer.params,
                        "note": f"no MPS kernel: {layer.type} as Caffe (or its fork) defines it, "
                                "with these parameters"}}
    try:
        return spec.plan(layer, ctx)
    except Unknown:
        return {"app": {"op": "unavailable", "reason": "a blob's shape is unknown"}}


def blob_names(merged: Graph) -> dict[str, str]:
    """Unique blob name -> the name in the file, for the blobs that differ."""
    return {b: n for b, n in merged.blob_names.items() if b != n}
