"""`caffe2metal inspect`: every layer, its shapes and blobs, and the fold plan."""
from __future__ import annotations

import json
import math

from . import fold
from .net.reader import Model


def _fmt(shape) -> str:
    if shape is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in shape)


def _listed(shape: tuple | None) -> list | None:
    return None if shape is None else list(shape)


def describe(model: Model, the_plan: fold.Plan | None = None) -> dict:
    """Everything ``inspect`` shows, as plain JSON-ready data; ``the_plan`` is
    ``fold.plan(model.graph)``, computed here when not given."""
    g, sh = model.graph, model.shapes
    name = g.blob_names.get
    layers = []
    values = 0
    for layer in g.layers:
        expected = sh.params.get(layer.name)
        blob_shapes: list[list] | None
        if layer.blobs:
            blob_shapes = [list(b.shape) for b in layer.blobs]
        else:
            blob_shapes = None if expected is None else [list(s) for s in expected]
        values += sum(math.prod(s) for s in blob_shapes or [])
        layers.append({
            "name": layer.name, "type": layer.type,
            "bottoms": [name(b, b) for b in layer.bottoms],
            "tops": [name(t, t) for t in layer.tops],
            "output_shapes": [_listed(sh.blobs.get(t)) for t in layer.tops],
            "param_shapes": blob_shapes,
            **({"unknown_fields": layer.unknown_fields} if layer.unknown_fields else {}),
        })
    p = fold.plan(g) if the_plan is None else the_plan
    return {
        "prototxt": model.prototxt, "caffemodel": model.caffemodel, "name": g.name,
        "format": "V1" if model.v1 else "modern",
        "inputs": [{"name": name(b, b), "shape": _listed(s)} for b, s in g.inputs.items()],
        "layers": layers,
        "excluded_layers": model.excluded,
        "dropped_layers": [{"name": n, "type": t, "reason": r} for n, t, r in model.dropped],
        "missing_inputs": list(model.missing_inputs),
        "outputs": [name(b, b) for b in g.outputs()],
        "summary": {
            "layers": len(layers), "parameter_values": values,
            "size_mb": round(values * 4 / 1e6, 3),
            "weights_loaded": model.caffemodel is not None,
        },
        "fold_plan": {
            "folds": [{"producer": f.producer, "layers": f.layers} for f in p.folds],
            "kept": [{"layers": k.layers, "reason": k.reason} for k in p.kept],
        },
        "unknown_fields": {"net": model.net_unknown_fields,
                           **{x.name: x.unknown_fields for x in g.layers if x.unknown_fields}},
    }


def render(info: dict) -> str:
    rows = [("#", "name", "type", "bottoms -> tops", "output", "params")]
    for i, x in enumerate(info["layers"]):
        params = ("?" if x["param_shapes"] is None
                  else ", ".join(_fmt(s) for s in x["param_shapes"]))
        flow = f"{', '.join(x['bottoms'])} -> {', '.join(x['tops'])}"
        out = ", ".join(_fmt(s) for s in x["output_shapes"])
        rows.append((str(i), x["name"], x["type"] + (" (!)" if "unknown_fields" in x else ""),
                     flow, out, params))
    caps = (5, 28, 22, 44, 18, 99)
    widths = [min(max(len(r[c]) for r in rows), cap) for c, cap in enumerate(caps)]
    lines = [f"net '{info['name']}' ({info['format']} format) from {info['prototxt']}"]
    for inp in info["inputs"]:
        lines.append(f"input {inp['name']}: {_fmt(inp['shape'])}")
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    s = info["summary"]
    lines.append("")
    src = "from the caffemodel" if s["weights_loaded"] else "implied by the prototxt"
    lines.append(f"{s['layers']} layers, {s['parameter_values']:,} parameter values ({src}), "
                 f"{s['size_mb']:.2f} MB as float32")
    if info["excluded_layers"]:
        lines.append(f"{len(info['excluded_layers'])} layer(s) excluded by TEST-phase rules: "
                     + ", ".join(info["excluded_layers"]))
    dropped = info.get("dropped_layers") or []
    if dropped:
        lines.append(f"{len(dropped)} layer(s) dropped to make a deploy net (a train/test "
                     "prototxt; the merged prototxt leaves them out):")
        lines += [f"  {d['name']} ({d['type']}): {d['reason']}" for d in dropped]
    for why in info.get("missing_inputs") or []:
        lines.append(f"shapes unknown ('?'): {why}")
    lines.append(f"outputs: {', '.join(info['outputs'])}")
    unk = {k: v for k, v in info["unknown_fields"].items() if v}
    if unk:
        lines.append("fields not in our schema (kept verbatim in the merged prototxt; shapes after "
                     "them are unknown):")
        lines += [f"  {k}: {', '.join(v)}" for k, v in unk.items()]
    fp = info["fold_plan"]
    lines.append(f"fold plan: {len(fp['folds'])} chain(s) fold, {len(fp['kept'])} kept")
    for f in fp["folds"]:
        lines.append(f"  fold  {' + '.join(f['layers'])} -> {f['producer']}")
    for k in fp["kept"]:
        lines.append(f"  keep  {' + '.join(k['layers'])}: {k['reason']}")
    return "\n".join(lines)


def as_json(info: dict) -> str:
    return json.dumps(info, indent=2)
