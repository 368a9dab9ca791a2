"""Write the merged Caffe model: deploy prototxt (as edits of the original) and caffemodel.

The merged prototxt is the user's file with three kinds of edit, nothing else:
* a folded BatchNorm/Scale block is cut out (with its line), and so is every
  block that does not run in the TEST phase (TRAIN twins of deploy layers:
  the merged file is a deploy file, and OpenCV ignores phase rules);
* a producer's ``top`` becomes the chain's last top;
* a producer's ``bias_term`` becomes ``true`` (replaced, or inserted as the first
  field of its ``convolution_param``/``inner_product_param``).
Comments, field order, fork layers and fields, line endings: all as written.
"""
from __future__ import annotations

import json
import re

from ..caffe import textproto
from ..caffe.caffemodel import ModelLayer, write_caffemodel
from ..fold import Plan, param_key
from ..graph import Graph
from ..net.reader import Model


def _quote(name: str) -> str:
    return json.dumps(name)      # a valid protobuf text string for any name


def _line_start(text: str, pos: int) -> int:
    start = text.rfind("\n", 0, pos) + 1
    return start if text[start:pos].strip() == "" else pos


_LINE_END = re.compile(r"[ \t]*(\r?\n)?")


def cut_span(text: str, f: textproto.Field) -> tuple[int, int]:
    """The block plus the whitespace before it on its line and its line end."""
    start = _line_start(text, f.start)
    m = _LINE_END.match(text, f.end)         # always matches (everything is optional)
    return start, m.end() if m else f.end


def merged_prototxt(model: Model, merged: Graph, plan: Plan) -> str:
    text = model.document.text
    edits = list(model.text_edits)              # (start, end, replacement): inputs (reader)
    index = {layer.name: layer.index for layer in model.graph.layers}
    folded = {index[n] for f in plan.folds for n in f.layers}
    for idx in sorted(folded | set(model.excluded_blocks)):
        s, e = cut_span(text, model.blocks[idx])
        edits.append((s, e, ""))
    by_name = {layer.name: layer for layer in merged.layers}
    newline = "\r\n" if "\r\n" in text else "\n"
    for f in plan.folds:
        layer = by_name[f.producer]
        block = model.blocks[layer.index]
        tops = block.get("top")
        new_top = merged.blob_names.get(f.top, f.top)
        top = tops[0].value or ""
        if textproto.unquote(top) != new_top:
            edits.append((tops[0].value_start, tops[0].value_start + len(top), _quote(new_top)))
        key = param_key(layer.type)
        param = block.get(key)[0]
        bias = param.get("bias_term")
        if bias:
            edits.append((bias[0].value_start, bias[0].value_start + len(bias[0].value or ""),
                          "true"))
        elif param.children:
            first = param.children[0]
            indent = text[_line_start(text, first.start):first.start]
            sep = newline + indent if indent.strip() == "" and indent else " "
            edits.append((first.start, first.start, "bias_term: true" + sep))
        else:
            brace = text.index("{" if "{" in text[param.start:param.end] else "<", param.start)
            edits.append((brace + 1, brace + 1, " bias_term: true "))
    out = text
    for start, end, new in sorted(edits, reverse=True):
        out = out[:start] + new + out[end:]
    return out


def write_prototxt(path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def merged_layers(graph: Graph):
    for layer in graph.layers:
        if layer.blobs:
            yield ModelLayer(name=layer.name, type=layer.type, blobs=layer.blobs)


def write_merged_caffemodel(path, graph: Graph, progress=None, io=None) -> int:
    """Stream ``graph``'s blobs to ``path`` (no copy of any array; lazily folded
    weights computed block by block); return the byte count.

    ``progress(nbytes)`` is called as bytes are written, ``io`` does the writes
    on a thread (see ``write_caffemodel``).
    """
    return write_caffemodel(path, merged_layers(graph), net_name=graph.name, progress=progress,
                            io=io)
