"""Internal blob names never equal a user's name (issue 13, red-team class 6)."""
from __future__ import annotations

import numpy as np
import pytest

from caffe2metal.errors import GraphError
from caffe2metal.net.reader import read_prototxt
from caffe2metal.pipeline import convert
from caffe2metal.verification import verify
from conftest import with_weights, write_net

# `x` is written in place by the BatchNorm, the Scale and the ReLU; the user also has
# blobs named `x#1` and `x#2` (a different branch).  Before: the in-place values of `x`
# were named `x#1`, `x#2` too, and the manifest said the convolution wrote `x`'s third
# value where it wrote `x#2`.
NET = """
name: "hash"
input: "data"
input_shape { dim: 1 dim: 8 dim: 10 dim: 10 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "x"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }
layer { name: "scale" type: "Scale" bottom: "x" top: "x" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
layer { name: "other" type: "Convolution" bottom: "data" top: "x#1"
  convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "other_relu" type: "ReLU" bottom: "x#1" top: "x#2" }
layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "x#2" top: "out" }
"""


def test_user_names_with_hash_keep_their_values(tmp_path):
    model = read_prototxt(write_net(tmp_path, NET))
    g = model.graph
    values = list(g.blob_names)
    assert len(values) == len(set(values))
    # the user's blobs keep their own names; the in-place values get other ones
    assert g.layer("other").tops == ["x#1"] and g.layer("other_relu").tops == ["x#2"]
    bn_top = g.layer("bn").tops[0]
    assert bn_top not in ("x#1", "x#2") and g.blob_names[bn_top] == "x"
    assert g.layer("sum").bottoms == [g.layer("relu").tops[0], "x#2"]


def test_user_names_with_hash_convert_and_verify(tmp_path):
    proto = write_net(tmp_path, NET)
    model, weights = with_weights(proto)
    result = convert(proto, weights, tmp_path / "out")
    by_name = {e["name"]: e for e in result.manifest["layers"]}
    assert by_name["conv"]["folded"] == ["bn", "scale"]
    assert by_name["conv"]["activation"]["layer"] == "relu"
    assert by_name["other"]["output"]["blob"] == "x#1"
    report = verify(proto, weights, tmp_path / "out")
    assert report.ok, [(r.name, r.rel, r.note) for r in report.layers + report.outputs]
    assert not any("OpenCV" in r.note for r in report.layers + report.outputs)


NOT_IN_PLACE = """
input: "data"
input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }
layer { name: "split" type: "Split" bottom: "data" %s }
"""


def test_a_top_produced_by_multiple_sources_is_refused(tmp_path):
    proto = write_net(tmp_path, NOT_IN_PLACE % 'top: "a" top: "data"')   # top 1 is not bottom 1
    with pytest.raises(GraphError, match="layer 'split': top 'data' is produced by multiple "
                                         "sources"):
        read_prototxt(proto)


def test_top_j_named_like_bottom_j_is_in_place(tmp_path):
    model = read_prototxt(write_net(tmp_path, NOT_IN_PLACE % 'top: "data"'))
    assert model.graph.layer("split").tops == ["data#1"]


def test_in_place_tops_are_numbered_as_before(tmp_path):
    model = read_prototxt(write_net(tmp_path, NET.replace("x#1", "y").replace("x#2", "z")))
    assert [model.graph.layer(n).tops[0] for n in ("conv", "bn", "scale", "relu")] == \
        ["x", "x#1", "x#2", "x#3"]
    assert np.array_equal(model.shapes.blobs["x#3"], (1, 8, 10, 10))
