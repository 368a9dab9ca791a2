"""Fork layer types in OpenCV: run what OpenCV lacks in numpy, cut what nobody can run.

OpenCV 4.x's Caffe importer cannot create some fork (and a few BVLC) layer
types: Upsample, Clip, Threshold, ENet's BN, Python layers...  Which ones is
found by trying (``opencv_has``: a one-layer net of that type; only OpenCV's
"Can't create layer" counts as lacking it), never from a list.

* A type OpenCV lacks whose registry entry has a ``forward`` role (the fork's
  definition in numpy, ``caffe2metal.layers``) runs inside OpenCV: each such
  layer is given to OpenCV under a type name of its own (``c2m_<type>_<i>``)
  with a Python layer registered for that name (``cv2.dnn_registerLayer``,
  ``registered``) for the duration of the run: getMemoryShapes from the
  type's shape rule, forward calling the numpy function on the whole batch.
  A type OpenCV has is never registered over, except where OpenCV computes
  it against the fork's definition (``OPENCV_WRONG``).
* A type OpenCV lacks with no forward cannot run: that layer and every layer
  computed from it are left out of OpenCV's net (``Plan.cut``), their blobs
  are unavailable, and verify skips (and lists, with the reason) the checks
  that need one of them; everything before still runs and is checked.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..graph import Graph, Layer
from ..layers import registry

NO_FORWARD: dict[str, str] = {
    "BN": ("'BN' has several incompatible definitions across Caffe forks (SegNet/ENet's "
           "normalises with the batch's own statistics unless bn_mode: INFERENCE, others "
           "keep running statistics): caffe2metal has no numpy forward for it"),
    "Python": "a Python layer's code is not part of the model",
}
"""Why some types OpenCV lacks have no numpy forward."""

def _interp_wrong(layer: Layer) -> str | None:
    p = layer.params.get("interp_param", {})
    if "shrink_factor" in p or p.get("pad_beg", 0) or p.get("pad_end", 0):
        # measured, OpenCV 4.14: shrink_factor alone gives a 0x0 output, zoom_factor with
        # shrink_factor ignores the shrink, pad_beg/pad_end (cropping) are ignored
        return "OpenCV's Interp ignores shrink_factor and pad_beg/pad_end"
    return None


def _axpy_wrong(layer: Layer) -> str | None:
    # Axpy is F = a * X + Y with a = bottom[0] (N x C), X = bottom[1], Y = bottom[2]
    # (SENet's axpy_layer.hpp; Cambricon/caffe include/caffe/layers/axpy_layer.hpp).
    # Measured on arcface_lresnet_se: OpenCV 4.14's importer (Scale + Eltwise) gives
    # bottom[0] * bottom[2] + bottom[1] exactly.
    return ("OpenCV 4.14 computes bottom0 * bottom2 + bottom1 where Axpy is "
            "bottom0 * bottom1 + bottom2")


def _tile_wrong(layer: Layer) -> str | None:
    # measured, OpenCV 4.14: its Tile is ONNX's; from a Caffe model it fails with
    # "Tile: repeats needs to be treated as parameter but it is missing" (tile_layer.cpp:31)
    return "OpenCV's Tile is ONNX's Tile and does not read Caffe's tile_param"


OPENCV_WRONG: dict[str, Callable[[Layer], str | None]] = {"Interp": _interp_wrong,
                                                          "Axpy": _axpy_wrong,
                                                          "Tile": _tile_wrong}
"""Types OpenCV has but computes against the fork's definition for some parameters:
layer -> why (then verify runs the numpy forward instead), or None."""

_HAS: dict[tuple[str, int], bool] = {}


def opencv_has(type_name: str, bottoms: int = 1) -> bool:
    """Whether OpenCV's Caffe importer can create a layer of ``type_name`` (cached)."""
    key = (type_name, max(bottoms, 1))
    if key not in _HAS:
        _HAS[key] = _probe(*key)
    return _HAS[key]


def _probe(type_name: str, bottoms: int) -> bool:
    import cv2
    names = [f"b{i}" for i in range(bottoms)]
    text = "".join(f'input: "{b}" input_dim: 1 input_dim: 2 input_dim: 2 input_dim: 2\n'
                   for b in names)
    text += (f'layer {{ name: "probe" type: "{type_name}" '
             + " ".join(f'bottom: "{b}"' for b in names) + ' top: "probe" }\n')
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        net = cv2.dnn.readNetFromCaffe(np.frombuffer(text.encode(), np.uint8))
        for b in names:
            net.setInput(np.zeros((1, 2, 2, 2), np.float32), b)
        net.forward()
    except cv2.error as e:
        return "Can't create layer" not in str(e)
    finally:
        cv2.utils.logging.setLogLevel(level)
    return True


def layer_keys(graph: Graph) -> list[tuple[str, int]]:
    """(name, k) of each layer: the k-th layer of that name (names may repeat)."""
    seen: dict[str, int] = {}
    keys = []
    for layer in graph.layers:
        k = seen.get(layer.name, 0)
        seen[layer.name] = k + 1
        keys.append((layer.name, k))
    return keys


@dataclass
class Plan:
    """How one graph is given to OpenCV."""
    rename: dict[tuple[str, int], str] = field(default_factory=dict)
    """layer key -> the OpenCV type registered for it (a numpy forward)"""
    adapters: dict[str, Any] = field(default_factory=dict)
    """OpenCV type -> its Python layer class (held here: OpenCV keeps no reference)"""
    cut: dict[tuple[str, int], str] = field(default_factory=dict)
    """layer key -> why it cannot run (it, and what is computed from it)"""
    unavailable: dict[str, str] = field(default_factory=dict)
    """unique blob name -> why OpenCV gives no value for it"""
    numpy_types: set[str] = field(default_factory=set)
    """the types run with their numpy forward"""
    overridden: dict[str, str] = field(default_factory=dict)
    """layer name -> why its numpy forward replaces OpenCV's own implementation"""


def plan(graph: Graph, drop: Collection[str] = (), replace_wrong: bool = True) -> Plan:
    """Which layers of ``graph`` run in numpy inside OpenCV and which cannot run at all.

    Layers of the types in ``drop`` are left out by the caller (see
    ``opencv_text``) and are not considered here.  ``replace_wrong``: also run in
    numpy the layers OpenCV has but computes wrongly (``OPENCV_WRONG``)."""
    p = Plan()
    for layer, key in zip(graph.layers, layer_keys(graph), strict=True):
        if layer.type == "Input" or layer.type in drop:
            continue
        after = next((p.unavailable[b] for b in layer.bottoms if b in p.unavailable), None)
        reason = after
        wrong = (OPENCV_WRONG.get(layer.type, lambda _: None)(layer)
                 if after is None and replace_wrong else None)
        if reason is None and (wrong or not opencv_has(registry.opencv_type(layer.type),
                                                       len(layer.bottoms))):
            forward = registry.forward(layer.type)
            spec = registry.get(layer.type)
            if forward is not None and spec is not None:
                name = f"c2m_{layer.type}_{len(p.adapters)}"
                p.rename[key] = name
                p.adapters[name] = _adapter(layer, forward, spec.shape)
                p.numpy_types.add(layer.type)
                if wrong:
                    p.overridden[layer.name] = wrong
                continue
            why = NO_FORWARD.get(layer.type, "caffe2metal has no numpy forward for it")
            reason = (f"OpenCV cannot create layer '{layer.name}' of type {layer.type!r}, and "
                      f"{why}")
        if reason is not None:
            p.cut[key] = reason
            root = reason if after is None else after
            for top in layer.tops:
                p.unavailable[top] = root
    return p


def _adapter(layer: Layer, forward: registry.Forward, shape: registry.ShapeRule | None) -> type:
    """A Python layer for OpenCV running ``forward`` on ``layer`` (the graph's, not
    OpenCV's parameters: OpenCV passes no layer name to tell them apart)."""

    class NumpyLayer:
        def __init__(self, params: dict, blobs: list) -> None:
            self.layer = layer

        def getMemoryShapes(self, inputs: list) -> list[list[int]]:
            ins = [tuple(int(d) for d in s) for s in inputs]
            tops: list = [None]
            if shape is not None:
                try:
                    tops = list(shape(layer, ins)[0])
                except (registry.Unknown, ValueError, KeyError, IndexError):
                    tops = [None]
            if any(t is None for t in tops):       # no rule: what the forward gives on zeros
                tops = [o.shape for o in forward(layer, [np.zeros(s, np.float32) for s in ins])]
            return [[int(d) for d in t] for t in tops]

        def forward(self, inputs: list) -> list[np.ndarray]:
            outs = forward(layer, [np.asarray(x, np.float32) for x in inputs])
            return [np.ascontiguousarray(o, dtype=np.float32) for o in outs]

    NumpyLayer.__name__ = f"NumpyLayer_{layer.type}"
    return NumpyLayer


@contextmanager
def registered(p: Plan) -> Iterator[Plan]:
    """The plan's Python layers registered in OpenCV for the duration of the block."""
    import cv2
    held = dict(p.adapters)          # OpenCV keeps no reference: hold them until unregistered
    done: list[str] = []
    try:
        for name, cls in held.items():
            cv2.dnn_registerLayer(name, cls)  # type: ignore[arg-type]
            done.append(name)
        yield p
    finally:
        for name in reversed(done):
            cv2.dnn_unregisterLayer(name)
        del held
