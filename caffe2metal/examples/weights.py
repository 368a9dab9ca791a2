"""Deterministic weights for a net we only have the architecture of.

Used by the built-in example and by the tests, which run real public
architectures without their (unpublished or large) weights.

Random BatchNorm statistics make activations explode and comparisons
meaningless, so after He-initialising every weighted layer we *calibrate*:
run the net once in OpenCV on random inputs and set each BatchNorm's mean and
variance from the activations it really sees (see ``calibrate``).  The
statistics are stored multiplied by a scale factor far from 1, as training
leaves them in real snapshots.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from ..errors import Caffe2MetalError
from ..graph import Layer
from ..layers import registry
from ..net.reader import Model
from ..verification import fork_layers
from ..verification.opencv import caffemodel_bytes, opencv_net, opencv_text

__all__ = ["calibrate", "init_weights", "random_inputs", "write_synthetic",
           # OpenCV plumbing, at home in caffe2metal.verification.opencv
           "caffemodel_bytes", "opencv_net", "opencv_text"]


def init_weights(model: Model, seed: int = 0) -> None:
    """Give every layer whose blob shapes we know plausible random blobs."""
    rng = np.random.default_rng(seed)
    branch_ends = _residual_branch_ends(model.graph)
    for layer in model.graph.layers:
        shapes = model.shapes.params.get(layer.name)
        if not shapes:
            continue
        blobs = []
        for i, shape in enumerate(shapes):
            shape = tuple(shape)
            t = layer.type
            producer = registry.producer(t)
            if producer is not None and i == 0:
                fan_in = producer.fan_in(layer, shape)
                b = rng.normal(0.0, math.sqrt(2.0 / max(fan_in, 1)), shape)
                if len(shape) == 4 and shape[2] * shape[3] > 1:
                    b = _smooth_kernels(rng, shape, fan_in)
            elif t == "BatchNorm":
                b = [np.zeros(shape), np.ones(shape), np.ones(shape)][i] if i < 3 else \
                    (rng.uniform(0.5, 1.5, shape) if i == 3 else rng.normal(0, 0.1, shape))
            elif t == "Scale" and i == 0 and len(layer.bottoms) == 1:
                # trained residual branches end in a small gamma; 1 would let the
                # residual stream grow with depth
                b = rng.uniform(0.1, 0.3, shape) if layer.name in branch_ends else \
                    rng.uniform(0.5, 1.5, shape)
            elif t == "PReLU":
                b = np.full(shape, 0.25)
            elif t == "Normalize":
                b = np.full(shape, 20.0)
            else:
                b = rng.normal(0.0, 0.1, shape)
            blobs.append(b.astype(np.float32))
        layer.blobs = blobs


def _residual_branch_ends(graph) -> set[str]:
    """Scale layers whose output goes (through in-place layers) straight into a sum."""
    users = graph.consumers()
    ends = set()
    for layer in graph.layers:
        if layer.type != "Scale":
            continue
        blob = layer.tops[0]
        while len(users.get(blob, [])) == 1 and users[blob][0].type in ("ReLU", "PReLU", "Dropout"):
            blob = users[blob][0].tops[0]
        if any(u.type in ("Eltwise", "Axpy") for u in users.get(blob, [])):
            ends.add(layer.name)
    return ends


def _smooth_kernels(rng, shape, fan_in) -> np.ndarray:
    """Random channel mixing times a spatial low-pass with some noise.

    Trained filters are smooth; i.i.d. random taps make a BatchNorm net chaotic,
    where float32 rounding grows by ~1.3x a layer and no comparison of two float32
    runs means anything after thirty layers.
    """
    kh, kw = shape[2], shape[3]
    taps = np.outer(np.hanning(kh + 2)[1:-1], np.hanning(kw + 2)[1:-1])
    taps = taps / np.sqrt((taps ** 2).sum())
    mix = rng.normal(0.0, math.sqrt(2.0 / max(fan_in, 1)), shape[:2] + (1, 1)) * math.sqrt(kh * kw)
    return mix * (taps + rng.normal(0.0, 0.3 / math.sqrt(kh * kw), shape))


def _image_like(rng, shape) -> np.ndarray:
    """Smooth structure at several scales, per-image brightness and contrast, a little noise.

    Pure noise makes deep features almost constant within an image, so BatchNorm
    statistics calibrated on it divide by a tiny spread and amplify float32
    rounding layer after layer; natural images do not behave like that.
    """
    if len(shape) != 4 or shape[2] < 4 or shape[3] < 4:
        return rng.uniform(-1, 1, shape)
    n, c, h, w = shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.zeros(shape)
    for freq in (1, 2, 4, 8):
        phase = rng.uniform(0, 2 * np.pi, (n, c, 2, 1, 1))
        direction = rng.normal(size=(n, c, 2, 1, 1))
        out += rng.uniform(0.3, 1.0, (n, c, 1, 1)) / freq * np.sin(
            2 * np.pi * freq * (direction[:, :, 0] * xx + direction[:, :, 1] * yy) + phase[:, :, 0])
    out = out / np.abs(out).max(axis=(2, 3), keepdims=True)
    contrast = rng.uniform(0.3, 1.0, (n, 1, 1, 1))
    brightness = rng.uniform(-0.4, 0.4, (n, 1, 1, 1))
    return contrast * out + brightness + rng.normal(0, 0.05, shape)


def random_inputs(model: Model, seed: int = 1, count: int = 2) -> list[dict[str, np.ndarray]]:
    """``count`` feeds {input name: float32 array} of image-like data in [-1.5, 1.5]."""
    rng = np.random.default_rng(seed)
    g = model.graph
    shapes: dict[str, tuple | None] = dict(g.inputs)
    for layer in g.layers:
        if layer.type == "Input":
            shapes.update({t: model.shapes.blobs[t] for t in layer.tops})
    return [{g.blob_names.get(b, b): _image_like(rng, s).astype(np.float32)
             for b, s in shapes.items()} for _ in range(count)]


class BatchStatsNorm:
    """calibrate's stand-in for Caffe's BatchNorm in OpenCV: it normalises its input with
    that input's own statistics (as training does) and records them.

    OpenCV constructs a registered layer from (params, blobs), so calibrate
    registers ``functools.partial(BatchStatsNorm, bns=..., seen=...)``: the
    BatchNorm layers (for eps) and the dict each records its (mean, var) into,
    under its index, which it reads from the marker (index + 1) calibrate puts
    into its scale-factor blob.
    """
    def __init__(self, params: dict, blobs: list[np.ndarray], *, bns: Sequence[Layer],
                 seen: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        self.index = int(round(float(np.asarray(blobs[2]).reshape(-1)[0]))) - 1
        self.eps = 1e-5
        self.bns = bns
        self.seen = seen

    def getMemoryShapes(self, inputs: list[list[int]]) -> list[list[int]]:
        return [inputs[0]]

    def forward(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0], np.float64)
        axes = tuple(a for a in range(x.ndim) if a != 1)
        mean = x.mean(axis=axes)
        # Deep features of a random net are almost the same for every input: a
        # per-channel offset far larger than its spread, which a BatchNorm fitted
        # to that spread amplifies (with every float32 rounding in it; measured on
        # MobileNetV2-SSDLite, whose backbone has no BatchNorm: 6e-3 between two
        # float32 runs).  Trained features vary across images by a fair part of
        # their mean: count 10% of it as spread.
        var = x.var(axis=axes) + 0.1 * mean ** 2 + 1e-3
        self.seen[self.index] = (mean, var)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        eps = float(self.bns[self.index].params.get("batch_norm_param", {}).get("eps", 1e-5))
        return [((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)).astype(np.float32)]


class ChannelScale:
    """Caffe's Scale (axis 1) in numpy: OpenCV's own Scale rejects some 2-D inputs
    coming from a Python layer."""
    def __init__(self, params: dict, blobs: list[np.ndarray]) -> None:
        self.blobs = [np.asarray(b, np.float64).reshape(-1) for b in blobs]

    def getMemoryShapes(self, inputs: list[list[int]]) -> list[list[int]]:
        return [inputs[0]]

    def forward(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(inputs[0], np.float64)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        blobs = list(self.blobs)
        gamma = np.asarray(inputs[1], np.float64).reshape(x.shape[:2] + (1,) * (x.ndim - 2)) \
            if len(inputs) > 1 else blobs.pop(0).reshape(shape)
        y = x * gamma + (blobs[0].reshape(shape) if blobs else 0.0)
        return [y.astype(np.float32)]


def calibrate(model: Model, seed: int = 0, batch: int = 4,
              scale_range: tuple[float, float] = (100.0, 2000.0),
              drop: tuple[str, ...] = ()) -> None:
    """Set every BatchNorm's statistics from the activations it sees in OpenCV.

    One forward pass: a Python layer (``BatchStatsNorm``) registered for
    "BatchNorm" normalises its input with that input's own statistics (as
    training does) and records them, so every BatchNorm sees what it would see
    once all earlier ones are set.  The layer finds its own entry through a
    marker in its scale-factor blob.
    Layers of the types in ``drop`` are left out of that pass (see ``opencv_text``).
    """
    import cv2
    g = model.graph
    bns = [layer for layer in g.layers if layer.type == "BatchNorm" and len(layer.blobs) == 3]
    if not bns:
        return
    rng = np.random.default_rng(seed)
    for i, bn in enumerate(bns):
        bn.blobs[2] = np.array([i + 1], np.float32)
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    samples = random_inputs(model, seed + 1, batch)
    feed = {k: np.concatenate([f[k] for f in samples]) for k in samples[0]}
    # fork layers OpenCV lacks run as numpy layers, as in verify (and are cut where none is);
    # the ones OpenCV has are left to it, so the statistics are those of the nets the tests
    # compare in OpenCV (ArcFace-SE's Axpy, which OpenCV computes its own way)
    forks = fork_layers.plan(g, drop, replace_wrong=False)
    # OpenCV keeps no reference of its own to what it is given: hold this one until the end
    batch_stats_norm = functools.partial(BatchStatsNorm, bns=bns, seen=seen)
    # (both are duck-typed OpenCV layers: getMemoryShapes and forward)
    cv2.dnn_registerLayer("BatchNorm", batch_stats_norm)  # type: ignore[arg-type]
    cv2.dnn_registerLayer("Scale", ChannelScale)  # type: ignore[arg-type]
    try:
        with fork_layers.registered(forks):
            net = opencv_net(opencv_text(model, drop, rename=forks.rename, cut=forks.cut),
                             caffemodel_bytes(model))
            for name, x in feed.items():
                net.setInput(x, name)
            net.forward(net.getUnconnectedOutLayersNames())
    finally:
        cv2.dnn_unregisterLayer("BatchNorm")
        cv2.dnn_unregisterLayer("Scale")
    for i, bn in enumerate(bns):
        if i not in seen:      # not on the path to any output OpenCV computed
            bn.blobs[2] = np.array([1.0], np.float32)
            continue
        mean, var = seen[i]
        s = float(rng.uniform(*scale_range))
        if not (np.isfinite(mean * s).all() and np.isfinite(var * s).all()
                and np.abs(var * s).max() < np.finfo(np.float32).max):
            raise Caffe2MetalError("synthetic weights overflow float32 before this BatchNorm",
                                   file=g.source, layer=bn.name)
        bn.blobs[0] = (mean * s).astype(np.float32)
        bn.blobs[1] = (var * s).astype(np.float32)
        bn.blobs[2] = np.array([s], np.float32)


def write_synthetic(model: Model, path, seed: int = 0, calibrate_in_opencv: bool = False,
                    drop: tuple[str, ...] = ()):
    """``init_weights`` (then, ``calibrate_in_opencv``, ``calibrate`` without the types in
    ``drop``) and write the blobs as a caffemodel at ``path``; returns ``path``."""
    from ..caffe.caffemodel import write_caffemodel
    from ..export.caffe import merged_layers
    init_weights(model, seed)
    if calibrate_in_opencv:
        calibrate(model, seed, drop=drop)
    write_caffemodel(path, merged_layers(model.graph), net_name=model.graph.name)
    return path
