"""SSD's Normalize end to end: its scale is a float32 Metal file (``metal.normalize``), the
plan's ``normalize`` app op reads it, and `run` from OUT matches OpenCV's NormalizeBBox
(which computes Caffe's x / sqrt(sum x^2 + eps) * scale, per pixel over the channels or,
across_spatial, over the whole blob)."""
from __future__ import annotations

import numpy as np
import pytest

from caffe2metal.caffe.caffemodel import write_caffemodel
from caffe2metal.examples import weights as synth
from caffe2metal.export.caffe import merged_layers
from caffe2metal.net.reader import read_prototxt
from caffe2metal.pipeline import convert
from caffe2metal.runtime import PlanError, default_feed, load_plan, run_plan
from conftest import opencv_run, write_net
from test_metal import check_schema

NET = """name: "n"
input: "data"
input_shape {{ dim: 1 dim: 6 dim: 5 dim: 7 }}
layer {{ name: "c" type: "Convolution" bottom: "data" top: "c"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 }} }}
layer {{ name: "n" type: "Normalize" bottom: "c" top: "n"
  norm_param {{ {params} }} }}
"""


def _build(tmp_path, params: str):
    proto = write_net(tmp_path, NET.format(params=params))
    model = read_prototxt(proto)
    synth.init_weights(model, 0)
    norm = model.graph.layer("n")
    rng = np.random.default_rng(1)      # distinct per-channel scales (synth writes 20s)
    norm.blobs = [rng.uniform(0.5, 30, norm.blobs[0].shape).astype(np.float32)]
    weights = proto.with_suffix(".caffemodel")
    write_caffemodel(weights, merged_layers(model.graph), net_name=model.graph.name)
    return proto, weights, norm.blobs[0]


@pytest.mark.parametrize("params", [
    "across_spatial: false channel_shared: false",
    "across_spatial: false channel_shared: false eps: 0.5",   # where eps goes shows
    "across_spatial: false",                                  # channel_shared (default true)
    "channel_shared: true",                                   # across_spatial (default true)
    "channel_shared: true eps: 3",
])
def test_normalize_runs_from_out_as_opencv(tmp_path, params):
    proto, weights, scale = _build(tmp_path, params)
    out = convert(proto, weights, tmp_path / "out").out
    manifest = load_plan(out)
    check_schema(manifest)
    assert manifest["metal"]["skipped"] == []
    (entry,) = manifest["metal"]["normalize"]
    op = next(o for o in manifest["plan"] if o["name"] == "n")
    assert op["app"]["scale"] == entry["scale"] and entry["name"] == "n"
    assert entry["scale"]["shape"] == [scale.size]
    data = np.fromfile(out / entry["scale"]["file"], "<f4")
    np.testing.assert_array_equal(data, scale.reshape(-1))
    feed = default_feed(manifest)
    (ref,) = opencv_run(proto, weights, feed, ["n"])
    mine = run_plan(out, feed).outputs["n"]
    rel = float(np.abs(mine - ref).max() / np.abs(ref).max())
    assert rel <= 1e-5, rel


def test_normalize_across_spatial_per_channel_scale_is_caffes(tmp_path):
    """across_spatial with a scale per channel: Caffe's normalize_layer.cpp Forward_cpu in
    float64 numpy; OpenCV 4.14 refuses this net (normalize_bbox_layer.cpp asserts
    ``scale.total() == numPlanes``, C*H*W there)."""
    proto, weights, scale = _build(tmp_path, "channel_shared: false eps: 0.25")
    out = convert(proto, weights, tmp_path / "out").out
    feed = default_feed(load_plan(out))
    r = run_plan(out, feed)
    x = r.values["c"].astype(np.float64)
    want = x / np.sqrt((x * x).sum() + 0.25) * scale.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(r.outputs["n"], want, rtol=1e-6, atol=0)


def test_normalize_scale_of_the_wrong_size_names_op_and_field(tmp_path):
    import json
    proto, weights, _ = _build(tmp_path, "across_spatial: false channel_shared: false")
    out = convert(proto, weights, tmp_path / "out").out
    m = json.loads((out / "manifest.json").read_text())
    op = next(o for o in m["plan"] if o["name"] == "n")
    op["app"]["channel_shared"] = True
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PlanError, match=r"op 'n': app.scale: 8 values for 8 channels"):
        run_plan(out)
