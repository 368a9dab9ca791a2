"""Reading prototxt files: input forms, V1 upgrade, phases, in-place naming, fork fields, errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from caffe2metal.caffe.caffemodel import ModelLayer, write_caffemodel
from caffe2metal.errors import Caffe2MetalError
from caffe2metal.net.reader import read_model, read_prototxt

CONV = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
        '  convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }\n'
        'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n')


@pytest.mark.parametrize("header", [
    'input: "data"\ninput_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n',
    'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 9\ninput_dim: 9\n',
    'layer { name: "data" type: "Input" top: "data" '
    'input_param { shape { dim: 1 dim: 3 dim: 9 dim: 9 } } }\n',
])
def test_three_ways_to_declare_the_input(tmp_path, header):
    p = tmp_path / "n.prototxt"
    p.write_text(header + CONV)
    m = read_prototxt(p)
    conv = next(layer for layer in m.graph.layers if layer.name == "conv")
    assert m.shapes.blobs[conv.tops[0]] == (1, 4, 4, 4)
    assert m.shapes.params["conv"] == [(4, 3, 3, 3), (4,)]


def test_in_place_tops_get_unique_names(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n' + CONV)
    g = read_prototxt(p).graph
    conv, relu = g.layers
    assert conv.tops == ["conv"] and relu.bottoms == ["conv"] and relu.tops == ["conv#1"]
    assert g.blob_names["conv#1"] == "conv" and g.outputs() == ["conv#1"]
    assert [layer.name for layer in g.consumers()["conv"]] == ["relu"]


def test_v1_layers_are_upgraded(tmp_path):
    p = tmp_path / "v1.prototxt"
    p.write_text('input: "data"\ninput_dim: 1 input_dim: 3 input_dim: 9 input_dim: 9\n'
                 'layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1\n'
                 '  convolution_param { num_output: 4 kernel_size: 3 } }\n'
                 'layers { name: "relu" type: RELU bottom: "conv" top: "conv" }\n'
                 'layers { name: "fc" type: INNER_PRODUCT bottom: "conv" top: "fc"\n'
                 '  inner_product_param { num_output: 2 } }\n')
    m = read_prototxt(p)
    assert m.v1 and [layer.type for layer in m.graph.layers] == ["Convolution", "ReLU",
                                                                 "InnerProduct"]
    assert m.shapes.params["fc"] == [(2, 4 * 7 * 7), (2,)]


def test_test_phase_filtering(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n'
                 'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data"\n'
                 '  include { phase: TRAIN } batch_norm_param { use_global_stats: false } }\n'
                 'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data"\n'
                 '  include { phase: TEST } batch_norm_param { use_global_stats: true } }\n'
                 'layer { name: "drop" type: "Dropout" bottom: "data" top: "data"\n'
                 '  exclude { phase: TEST } }\n')
    m = read_prototxt(p)
    assert [layer.name for layer in m.graph.layers] == ["bn"]
    assert m.graph.layers[0].params["batch_norm_param"]["use_global_stats"] is True
    assert m.excluded == ["bn", "drop"]


def test_fork_fields_are_reported_and_shapes_after_them_unknown(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n'
                 'layer { name: "x" type: "ReLU" bottom: "data" top: "x" my_fork_param { k: 1 } }\n'
                 'layer { name: "y" type: "ReLU" bottom: "x" top: "y" }\n')
    m = read_prototxt(p)
    assert m.graph.layers[0].unknown_fields == ["my_fork_param"]
    assert m.shapes.blobs["x"] is None and m.shapes.blobs["y"] is None


def test_unknown_layer_type_gives_unknown_shapes_downstream(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n'
                 'layer { name: "x" type: "MyMagic" bottom: "data" top: "x" }\n'
                 'layer { name: "y" type: "ReLU" bottom: "x" top: "y" }\n')
    m = read_prototxt(p)
    assert m.shapes.blobs["x"] is None and m.shapes.blobs["y"] is None


@pytest.mark.parametrize("newline, trailing", [("\r\n", False), ("\n", False), ("\r\n", True)])
def test_crlf_and_missing_trailing_newline(tmp_path, newline, trailing):
    text = ('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n' + CONV).rstrip("\n")
    p = tmp_path / "n.prototxt"
    p.write_bytes((text.replace("\n", newline) + (newline if trailing else "")).encode())
    assert len(read_prototxt(p).graph.layers) == 2


def test_pooling_rounding_and_pad_clipping(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 10 dim: 10 }\n'
                 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                 'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
                 'layer { name: "q" type: "Pooling" bottom: "data" top: "q" '
                 'pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }\n'
                 'layer { name: "g" type: "Pooling" bottom: "data" top: "g" '
                 'pooling_param { pool: AVE global_pooling: true } }\n')
    s = read_prototxt(p).shapes.blobs
    assert s["p"] == (1, 3, 5, 5)      # ceil((10-3)/2)+1 = 5 (floor would give 4)
    assert s["q"] == (1, 3, 6, 6)      # ceil((10+2-2)/2)+1 = 6; (6-1)*2 = 10 < 10+1 keeps it
    assert s["g"] == (1, 3, 1, 1)


# ---------------------------------------------------------------- errors

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "caffe2metal", *map(str, args)],
                          capture_output=True, text=True)


def _good(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n' + CONV)
    w = tmp_path / "n.caffemodel"
    rng = np.random.default_rng(0)
    write_caffemodel(w, [ModelLayer("conv", "Convolution", [
        rng.normal(size=(4, 3, 3, 3)).astype(np.float32), np.zeros(4, np.float32)])])
    return p, w


def _assert_clean_error(run, *needles):
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe2metal: error: "), run.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_error_missing_file(tmp_path):
    _assert_clean_error(_cli("inspect", tmp_path / "nope.prototxt"), "nope.prototxt",
                        "no such file")


def test_error_files_swapped(tmp_path):
    p, w = _good(tmp_path)
    _assert_clean_error(_cli("inspect", w, p), "n.caffemodel", "binary")


def test_error_syntax_has_line_and_column(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text('input: "data"\nlayer {\n  name: "x"\n  type: "ReLU"\n  bottom: "data" }}\n')
    _assert_clean_error(_cli("inspect", p), "bad.prototxt", "5:")


def test_error_truncated_caffemodel(tmp_path):
    p, w = _good(tmp_path)
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    _assert_clean_error(_cli("inspect", p, w), "n.caffemodel")


def test_error_wrong_blob_shape_names_layer_and_blob(tmp_path):
    p, w = _good(tmp_path)
    write_caffemodel(w, [ModelLayer("conv", "Convolution", [
        np.zeros((4, 3, 5, 5), np.float32), np.zeros(4, np.float32)])])
    _assert_clean_error(_cli("inspect", p, w), "layer 'conv'", "blob 0", "[4, 3, 3, 3]")


def test_error_wrong_blob_count(tmp_path):
    p, w = _good(tmp_path)
    write_caffemodel(w, [ModelLayer("conv", "Convolution", [np.zeros((4, 3, 3, 3), np.float32)])])
    _assert_clean_error(_cli("inspect", p, w), "layer 'conv'", "2 parameter blob")


def test_error_layer_without_weights(tmp_path):
    p, w = _good(tmp_path)
    write_caffemodel(w, [ModelLayer("other", "ReLU", [])])
    _assert_clean_error(_cli("inspect", p, w), "layer 'conv'", "no layer of that name")


def test_error_unknown_bottom(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n'
                 'layer { name: "r" type: "ReLU" bottom: "ghost" top: "r" }\n')
    _assert_clean_error(_cli("inspect", p), "layer 'r'", "ghost")


def test_errors_are_one_exception_family(tmp_path):
    with pytest.raises(Caffe2MetalError):
        read_model(tmp_path / "missing.prototxt")


def test_convert_names_a_missing_prototxt_before_its_weights(tmp_path):
    _assert_clean_error(_cli("convert", tmp_path / "nope.prototxt"), "nope.prototxt",
                        "no such file")
