"""caffe2metal.layers: the registry of Caffe layer types, one module per family."""
from __future__ import annotations

import numpy as np
import pytest

from caffe2metal import fold, layers
from caffe2metal.layers import registry
from caffe2metal.net.reader import read_prototxt
from caffe2metal.pipeline import convert
from caffe2metal.verification import verify
from conftest import with_weights, write_net


def test_a_second_registration_of_a_type_is_an_error():
    with pytest.raises(RuntimeError, match="'Convolution' registered twice"):
        registry.register("Convolution")


def test_an_unregistered_type_is_unknown_never_guessed(tmp_path):
    assert registry.get("NoSuchLayer") is None and "NoSuchLayer" not in layers.known()
    proto = write_net(tmp_path, """
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "odd" type: "NoSuchLayer" bottom: "data" top: "odd" }
layer { name: "r" type: "ReLU" bottom: "odd" top: "r" }
""")
    shapes = read_prototxt(proto).shapes
    assert shapes.blobs["odd"] is None and shapes.blobs["r"] is None
    assert shapes.params["odd"] is None


def test_every_producer_exports_and_has_a_reference():
    """A type that absorbs a fold must also say how MPS runs it and what Caffe computes."""
    assert set(registry.producer_types()) == {
        "Convolution", "DepthwiseConvolution", "ConvolutionDepthwise", "Deconvolution",
        "InnerProduct"}
    for name in registry.producer_types():
        spec = registry.get(name)
        assert spec.export is not None and spec.reference is not None, name
        assert spec.producer.param_key in ("convolution_param", "inner_product_param")


@pytest.mark.parametrize("alias", ["DepthwiseConvolution", "ConvolutionDepthwise"])
def test_depthwise_fork_aliases_fold_export_and_verify(tmp_path, alias):
    """A fork alias of Convolution, declared once in layers/convolution.py: its shape rule,
    fold, Metal export (depthwise), OpenCV name and numpy reference all follow. The layer's
    name differs from its top: OpenCV names converted convolutions after their top."""
    group = "" if alias == "ConvolutionDepthwise" else "group: 8"
    proto = write_net(tmp_path, f"""
name: "alias"
input: "data"
input_shape {{ dim: 1 dim: 8 dim: 12 dim: 12 }}
layer {{ name: "dw_layer" type: "{alias}" bottom: "data" top: "dw"
  convolution_param {{ num_output: 8 {group} kernel_size: 3 pad: 1 bias_term: false }} }}
layer {{ name: "dw/bn" type: "BatchNorm" bottom: "dw" top: "dw" }}
layer {{ name: "dw/scale" type: "Scale" bottom: "dw" top: "dw" scale_param {{ bias_term: true }} }}
layer {{ name: "relu" type: "ReLU" bottom: "dw" top: "dw" }}
""")
    model, weights = with_weights(proto)
    assert model.shapes.blobs["dw"] == (1, 8, 12, 12)
    plan = fold.plan(model.graph)
    assert [(f.producer, f.layers) for f in plan.folds] == [("dw_layer", ["dw/bn", "dw/scale"])]
    result = convert(proto, weights, tmp_path / "out")
    (entry,) = result.manifest["layers"]
    assert entry["kind"] == "depthwise_convolution" and entry["weights"]["shape"] == [8, 3, 3]
    report = verify(proto, weights, tmp_path / "out")
    assert report.ok, [(r.name, r.rel, r.note) for r in report.layers + report.outputs]
    x = np.random.default_rng(0).standard_normal((8, 12, 12))
    layer = model.graph.layer("dw_layer")
    y = registry.get(alias).reference(layer, x)
    w = np.asarray(layer.blobs[0], np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    want = sum(xp[:, i:i + 12, j:j + 12] * w[:, 0, i, j, None, None]
               for i in range(3) for j in range(3))
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
