"""The original model in OpenCV (fusion off): the text and weights it is given, and its runs.

OpenCV ignores phase rules and lacks some fork type names, so it is given the
TEST-phase text with those renamed (``opencv_text``); ``_forward`` reads any
set of blobs out of one run, mapping the file's layer names onto OpenCV's.
Layers of types OpenCV cannot create run as registered numpy layers, or are
cut out with what follows them (``fork_layers``).
"""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..caffe.caffemodel import write_caffemodel
from ..errors import Caffe2MetalError, VerificationUnavailable
from ..export.caffe import merged_layers, merged_prototxt
from ..fold import Plan
from ..graph import Graph
from ..layers import registry
from ..net.reader import Model
from ..paths import open_regular
from .fork_layers import layer_keys

if TYPE_CHECKING:
    import cv2


def caffemodel_bytes(model: Model) -> bytes:
    buf = io.BytesIO()
    write_caffemodel(buf, merged_layers(model.graph), net_name=model.graph.name)
    return buf.getvalue()


def opencv_text(model: Model, drop: Collection[str] = (), *,
                rename: Mapping[tuple[str, int], str] | None = None,
                cut: Collection[tuple[str, int]] = ()) -> str:
    """The TEST-phase prototxt as OpenCV must be given it: OpenCV ignores phase rules
    (it would run TRAIN twins of deploy layers) and lacks some fork type names.
    Layers of the types in ``drop`` are left out, and so are the layers in ``cut``;
    those in ``rename`` get that type (layers by (name, k): the k-th of that name,
    see ``fork_layers.layer_keys``)."""
    from ..caffe import textproto
    from ..export.caffe import cut_span
    text = merged_prototxt(model, model.graph, Plan())
    doc = textproto.parse(text, model.prototxt)
    edits = []
    seen: dict[str, int] = {}
    for block in doc.fields:
        if block.name != "layer":
            continue
        names = block.get("name")
        name = textproto.unquote(names[0].value or "") if names else ""
        key = (name, seen.get(name, 0))
        seen[name] = key[1] + 1
        for t in block.get("type"):
            value = textproto.unquote(t.value or "")
            if value in drop or key in cut:
                edits.append(cut_span(text, block) + ("",))
            elif rename and key in rename:      # a numpy layer registered for this one
                edits.append((t.value_start, t.value_start + len(t.value or ""),
                              f'"{rename[key]}"'))
            elif registry.opencv_type(value) != value:   # a fork name, same blobs and math
                edits.append((t.value_start, t.value_start + len(t.value or ""),
                              f'"{registry.opencv_type(value)}"'))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def opencv_net(prototxt_text: str, model: bytes | Path, fusion: bool = False) -> cv2.dnn.Net:
    """OpenCV's net of ``prototxt_text`` with the weights ``model``: the caffemodel's
    bytes, or its path (OpenCV then reads the file itself: no copy of it in Python's
    memory, which for VGG16-BN is 528 MiB more at the peak)."""
    import cv2
    if isinstance(model, Path):
        with tempfile.TemporaryDirectory(prefix="caffe2metal-opencv-") as tmp:
            text = Path(tmp) / "net.prototxt"
            text.write_text(prototxt_text, encoding="utf-8")
            net = cv2.dnn.readNetFromCaffe(str(text), str(model))
    else:
        net = cv2.dnn.readNetFromCaffe(np.frombuffer(prototxt_text.encode(), np.uint8),
                                       np.frombuffer(model, np.uint8))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.enableFusion(fusion)
    return net


def _opencv(prototxt_text: str, caffemodel: Path) -> cv2.dnn.Net:
    """verify's run of a model in OpenCV (fusion off).  OpenCV's Winograd 3x3 convolutions
    stay on although they cost VGG16-BN ~340 MiB more memory and round 50x more per layer
    (measured: 2e-5 against 4e-7): without them the plan run of the arcface LResNet (synthetic
    weights) ends 1.4e-4 from OpenCV instead of 1.5e-5, above the 1e-4 every float32 row is
    held to, and the tolerances are not this change's to move."""
    import cv2
    path = Path(caffemodel)
    fd, _ = open_regular(path, "caffemodel")     # a regular file OpenCV can read (no FIFO)
    os.close(fd)
    try:
        net = opencv_net(prototxt_text, path, fusion=False)
    except cv2.error as e:
        raise VerificationUnavailable(f"OpenCV cannot load this model: {_cv_message(e)}",
                               file=caffemodel) from None
    except OSError as e:
        raise Caffe2MetalError(f"cannot write OpenCV's prototxt: {e.strerror}") from None
    return net


def _cv_message(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].split(") ", 1)[-1] if lines else str(e)


def _cv_pins(graph: Graph, net: cv2.dnn.Net, drop: Collection[str] = (),
             cut: Collection[tuple[str, int]] = ()) -> dict[tuple[int, int], tuple[str, int]]:
    """(id(layer), top index) -> (OpenCV layer name, output index).

    OpenCV's Caffe importer names a layer as the file does, with ``_1``,
    ``_2``, ... appended to repeated names, except ``Convolution`` (and the fork
    types given to it as ``Convolution``): one OpenCV layer per top, named after
    that top (blob) name.
    """
    seen: dict[str, int] = {}
    pins = {}
    for layer in graph.layers:
        k = seen.get(layer.name, 0)
        seen[layer.name] = k + 1
        for i, top in enumerate(layer.tops):
            if registry.opencv_type(layer.type) == "Convolution":
                pins[(id(layer), i)] = (graph.blob_names.get(top, top), 0)
            else:
                pins[(id(layer), i)] = (layer.name if k == 0 else f"{layer.name}_{k}", i)
    have = set(net.getLayerNames())
    missing = [pins[(id(layer), 0)][0]
               for layer, key in zip(graph.layers, layer_keys(graph), strict=True)
               if layer.type != "Input" and layer.type not in drop and key not in cut
               and layer.tops and pins[(id(layer), 0)][0] not in have]
    if missing:
        raise VerificationUnavailable(f"OpenCV's net has no layer {missing[0]!r}: its layer list "
                                      "does not match this prototxt", file=graph.source)
    return pins


def _forward(graph: Graph, net: cv2.dnn.Net, feed: dict[str, np.ndarray], blobs: set[str],
             drop: Collection[str] = (),
             cut: Collection[tuple[str, int]] = ()) -> dict[str, np.ndarray]:
    """The value of each unique blob in ``blobs`` after one OpenCV forward pass.

    OpenCV keeps the requested outputs of a layer alive only for its first
    output: a later in-place layer may overwrite the second output of a
    Slice.  So blobs at output index > 0 are read in a pass of their own that
    stops at their layer.
    """
    import cv2
    pins = _cv_pins(graph, net, drop, cut)
    producers = graph.producers()
    where: dict[str, tuple[str, int]] = {}
    first: list[str] = []
    later: list[str] = []
    for b in blobs:
        layer = producers.get(b)
        if layer is None or layer.type == "Input":
            continue
        n, i = pins[(id(layer), layer.tops.index(b))]
        where[b] = (n, i)
        group = first if i == 0 else later
        if n not in group:
            group.append(n)

    def run(names: list[str]) -> list[list[np.ndarray]]:
        for name, x in feed.items():
            net.setInput(x, name)
        try:
            got = [list(outs) for outs in net.forwardAndRetrieve(names)]
            # copied (a later pass may reuse OpenCV's memory), each released once copied
            return [[np.array(got[i].pop(0), np.float32) for _ in range(len(got[i]))]
                    for i in range(len(got))]
        except cv2.error as e:
            raise VerificationUnavailable(f"OpenCV cannot run this model: {_cv_message(e)}",
                                   file=graph.source) from None

    by_layer = dict(zip(first, run(first), strict=True)) if first else {}
    early = {n: run([n])[0] for n in later}
    values = {}
    for b in blobs:
        if b in where:
            n, i = where[b]
            values[b] = (by_layer if i == 0 else early)[n][i]
        else:
            values[b] = feed[graph.blob_names.get(b, b)]
    return values
