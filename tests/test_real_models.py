"""The real public architectures in ../shared/models, with weights made here.

* every one of them reads, and `inspect` prints it (text and JSON);
* where OpenCV can load it, our inferred shapes equal OpenCV's getLayersShapes;
* where OpenCV can run it, the merged model computes what the original does:
  max|diff| / max|reference| <= 2e-4 on every net output (for SSD: on the
  inputs of DetectionOutput), OpenCV's own fusion off on both.

OpenCV is given `opencv_text`: the TEST-phase text (OpenCV ignores phase
rules) with the fork's DepthwiseConvolution called "Convolution" (same blobs,
same math); that changes nothing that is computed.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from caffe2metal import fold
from caffe2metal.examples import weights as synth
from caffe2metal.net.reader import read_model
from caffe2metal.pipeline import convert
from caffe2metal.verification.opencv import opencv_text
from conftest import mark_slow, model_id, real_models, with_weights

MODELS = real_models()

# Architectures OpenCV 4.x cannot load, and why (checked when this list was made).
NOT_IN_OPENCV = {
    "enet": "custom `BN` layer type and Python layers",
    "segnet": "custom `BN` type; no deploy input (DenseImageData data layer)",
    "yolov3": "fork `Upsample` layer type",
}
# OpenCV asserts in DetectionOutput for this net; compare everything before it.
DROP_DETECTION_OUTPUT = {"faceboxes"}
# OpenCV 4.14's depthwise 3x3 pad-1 convolution on a 1x1 map adds something the
# only valid tap cannot give (measured on SSDLite's last head: 1.5386 where
# w*x = 0.8910*1.5776 = 1.4056; our merged model agrees with float64 numpy to
# 1e-7).  Run such nets at an input size whose smallest map is larger (600: 2x2).
INPUT_SIZE = {"mobilenetv2_ssdlite": 600}


def _drop(model_name):
    return ("DetectionOutput",) if model_name in DROP_DETECTION_OUTPUT else ()


def _runnable_copy(model, tmp_path, name, model_name):
    """The TEST-phase prototxt as OpenCV needs it (see opencv_text)."""
    p = tmp_path / f"{name}.prototxt"
    p.write_text(opencv_text(model, _drop(model_name)))
    return p


# The slow marker (`make test-fast` leaves these out): inspect is two subprocesses per
# model, so the fast run keeps the models with an odd format (V1, CRLF without a trailing
# newline, fork and custom layers) and MobileNet-SSD; the OpenCV comparisons keep the
# models that take under about a second each.
INSPECT_FAST = {"mobilenet_ssd", "caffenet_v1", "erfnet", "enet", "yolov3"}
SLOW_SHAPES = {"caffenet_v1", "arcface_lresnet_se", "vgg_ssd300", "resnet50", "se_bn_inception"}
SLOW_MERGED = {"erfnet", "arcface_lresnet_se", "caffenet_v1", "vgg_ssd300", "resnet50",
               "densenet121", "mobilenetv2_ssd", "mobilenetv2_ssdlite", "se_bn_inception",
               "mobilenet_v2"}


def _prepare(path, tmp_path, calibrate=True):
    d = tmp_path / model_id(path)
    d.mkdir()
    text = path.read_text()
    if model_id(path) in INPUT_SIZE:
        text = text.replace("dim: 300", f"dim: {INPUT_SIZE[model_id(path)]}")
    (d / "deploy.prototxt").write_text(text)
    return with_weights(d / "deploy.prototxt", calibrate=calibrate, drop=_drop(d.name))


@pytest.mark.parametrize("path", mark_slow(MODELS, {model_id(p) for p in MODELS} - INSPECT_FAST,
                                           key=model_id), ids=model_id)
def test_inspect_reads_every_real_model(path):
    run = subprocess.run([sys.executable, "-m", "caffe2metal", "inspect", str(path), "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["layers"], "no layers"
    text = subprocess.run([sys.executable, "-m", "caffe2metal", "inspect", str(path)],
                          capture_output=True, text=True)
    assert text.returncode == 0 and "fold plan:" in text.stdout


RUNNABLE = [p for p in MODELS if model_id(p) not in NOT_IN_OPENCV]


def _opencv_input_shapes(model):
    g = model.graph
    shapes = [tuple(s) for s in g.inputs.values()]
    shapes += [tuple(model.shapes.blobs[t])
               for layer in g.layers if layer.type == "Input" for t in layer.tops]
    return shapes


@pytest.mark.parametrize("path", mark_slow(RUNNABLE, SLOW_SHAPES, key=model_id), ids=model_id)
def test_shapes_equal_opencv(path, tmp_path):
    import cv2
    model, weights = _prepare(path, tmp_path, calibrate=False)
    proto = _runnable_copy(model, tmp_path, "opencv", model_id(path))
    net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    shapes = _opencv_input_shapes(model)
    ids, _, outs = net.getLayersShapes(shapes if len(shapes) > 1 else shapes[0])
    by_name = {}
    for layer in model.graph.layers:
        by_name.setdefault(layer.name, layer)
    compared = 0
    for lid, out in zip(ids, outs, strict=True):
        layer = by_name.get(net.getLayer(int(lid)).name)
        if layer is None:
            continue
        # OpenCV's output count for a layer need not be the number of tops we see
        for top, theirs in zip(layer.tops, out, strict=False):
            ours = model.shapes.blobs[top]
            theirs = tuple(int(v) for v in np.array(theirs).reshape(-1))
            assert ours is not None, f"{layer.name}: we found no shape, OpenCV says {theirs}"
            assert len(ours) == len(theirs) and all(
                a is None or a == b for a, b in zip(ours, theirs, strict=True)), \
                f"{layer.name} ({layer.type}): ours {ours}, OpenCV {theirs}"
            compared += 1
    assert compared >= len(model.graph.layers) * 0.9


def _compared_outputs(graph):
    """Unique blob names to compare: DetectionOutput inputs, else the net outputs."""
    det = [layer for layer in graph.layers if layer.type == "DetectionOutput"]
    if det:
        return [b for layer in det for b in layer.bottoms]
    return graph.outputs()


@pytest.mark.parametrize("path", mark_slow(RUNNABLE, SLOW_MERGED, key=model_id), ids=model_id)
def test_merged_model_computes_the_same(path, tmp_path):
    model, weights = _prepare(path, tmp_path)
    result = convert(model.prototxt, weights, tmp_path / "out", metal=False)
    merged = read_model(result.out / result.manifest["merged"]["prototxt"],
                        result.out / result.manifest["merged"]["caffemodel"])
    # nothing foldable is left, and everything kept has a reason
    assert fold.plan(merged.graph).folds == []
    kept = {n for k in result.plan.kept for n in k.layers}
    left = {layer.name for layer in merged.graph.layers if layer.type in ("BatchNorm", "Scale")}
    assert left == kept
    assert len(merged.graph.layers) == len(model.graph.layers) - sum(
        len(f.layers) for f in result.plan.folds)

    ref_proto = _runnable_copy(model, tmp_path, "reference", model_id(path))
    new_proto = _runnable_copy(merged, tmp_path, "merged", model_id(path))
    blobs = _compared_outputs(model.graph)
    names = model.graph.blob_names
    ref_layers = [(model.graph.producers()[b].name, names[b]) for b in blobs]
    last_writer = {merged.graph.blob_names[t]: layer.name
                   for layer in merged.graph.layers for t in layer.tops}
    new_layers = [(last_writer[names[b]], names[b]) for b in blobs]
    feed = synth.random_inputs(model, seed=7, count=1)[0]
    from conftest import opencv_run
    ref = opencv_run(ref_proto, weights, feed, ref_layers)
    new = opencv_run(new_proto, merged.caffemodel, feed, new_layers)
    for blob, a, b in zip(blobs, ref, new, strict=True):
        scale = np.abs(a).max()
        assert np.isfinite(a).all() and scale > 0, f"{names[blob]}: reference is degenerate"
        rel = np.abs(a - b).max() / scale
        assert rel <= 2e-4, f"{names[blob]}: max|diff|/max|ref| = {rel:.3g}"
