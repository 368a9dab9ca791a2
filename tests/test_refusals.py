"""Refusals: what Caffe itself rejects, and what could only be written wrong.

1. Silently degraded output: float16 weights that overflow, flush to zero or keep
   fewer bits than float16 gives the rest of their layer (``export.files.half_problem``),
   a kept BatchNorm/Scale whose scale or shift overflows float32, PriorBox parameters
   that give inf/NaN priors.  Refused at export, naming the layer and the element or
   field; exit 2, nothing written.
2. Parameters Caffe's layer setup CHECKs (stride/dilation/kernel 0, pooling pad >=
   kernel, Crop offsets, DetectionOutput num_classes, ...) and absurd shapes: refused
   when the net is read, one line naming the file, layer and field.
"""
from __future__ import annotations

import numpy as np
import pytest

from caffe2metal import cli
from caffe2metal.caffe.caffemodel import write_caffemodel
from caffe2metal.errors import GraphError
from caffe2metal.examples import weights as synth
from caffe2metal.export.caffe import merged_layers
from caffe2metal.net.reader import read_prototxt
from conftest import write_net

HEAD = 'name: "t"\ninput: "data"\ninput_shape {{ dim: 1 dim: {c} dim: {h} dim: {h} }}\n'


def _net(tmp_path, body: str, c: int = 4, h: int = 8):
    return write_net(tmp_path, HEAD.format(c=c, h=h) + body)


def _conv(params: str, name: str = "c") -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "data" top: "{name}" '
            f"convolution_param {{ {params} }} }}\n")


def _pool(params: str) -> str:
    return ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
            f"pooling_param {{ {params} }} }}\n")


def _crop(params: str, size: str = "dim: 1 dim: 4 dim: 4 dim: 4") -> str:
    return (f'input: "size"\ninput_shape {{ {size} }}\n'
            'layer { name: "crop" type: "Crop" bottom: "data" bottom: "size" top: "crop" '
            f"crop_param {{ {params} }} }}\n")


def _det(params: str) -> str:
    return ('layer { name: "det" type: "DetectionOutput" bottom: "data" bottom: "data" '
            f'bottom: "data" top: "det" detection_output_param {{ {params} }} }}\n')


def _priorbox(params: str) -> str:
    return ('layer { name: "pb" type: "PriorBox" bottom: "data" bottom: "data" top: "pb" '
            f"prior_box_param {{ {params} }} }}\n")


def _run(argv) -> int:
    return cli.main([str(a) for a in argv])


def _convert(proto, out) -> int:
    """convert with a caffemodel that exists (the prototxt is refused before it is read)."""
    weights = proto.with_suffix(".caffemodel")
    weights.write_bytes(b"")
    return _run(["convert", proto, weights, "-o", out])


# ---------------------------------------------------------------- 2. what Caffe rejects

CAFFE_REJECTS = {
    "conv stride 0": (_conv("num_output: 4 kernel_size: 3 stride: 0"), "c",
                      "convolution_param.stride: stride [0, 0]: stride dimensions must be "
                      "nonzero"),
    "conv stride_h 0": (_conv("num_output: 4 kernel_size: 3 stride_h: 0 stride_w: 1"), "c",
                        "convolution_param.stride_h: stride [0, 1]: stride dimensions must "
                        "be nonzero"),
    "conv dilation 0": (_conv("num_output: 4 kernel_size: 3 dilation: 0"), "c",
                        "convolution_param.dilation: dilation [0, 0]: dilation dimensions "
                        "must be nonzero"),
    "conv kernel 0": (_conv("num_output: 4 kernel_size: 0"), "c",
                      "convolution_param.kernel_size: kernel [0, 0]: filter dimensions must "
                      "be nonzero"),
    "conv kernel twice": (_conv("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3"), "c",
                          "convolution_param.kernel_size: give either kernel_size or "
                          "kernel_h/kernel_w, not both"),
    "conv kernel_h alone": (_conv("num_output: 4 kernel_h: 3"), "c",
                            "convolution_param.kernel_h: kernel_h and kernel_w must be given "
                            "together, and only for 2-D convolutions"),
    "conv group 0": (_conv("num_output: 4 kernel_size: 3 group: 0"), "c",
                     "convolution_param.group: group 0 must be positive"),
    "conv group": (_conv("num_output: 4 kernel_size: 3 group: 3"), "c",
                   "convolution_param.group: 4 input / 4 output channels are not divisible "
                   "by group 3"),
    "conv num_output 0": (_conv("num_output: 0 kernel_size: 3"), "c",
                          "convolution_param.num_output: must be set and positive (is 0)"),
    "deconv stride 0": ('layer { name: "d" type: "Deconvolution" bottom: "data" top: "d" '
                        "convolution_param { num_output: 4 kernel_size: 2 stride: 0 } }\n",
                        "d", "convolution_param.stride: stride [0, 0]: stride dimensions "
                        "must be nonzero"),
    "pool kernel 0": (_pool("pool: MAX kernel_size: 0"), "p",
                      "pooling_param.kernel_size: kernel [0, 0]: filter dimensions cannot be "
                      "zero"),
    "pool no kernel": (_pool("pool: MAX stride: 2"), "p",
                       "pooling_param.kernel_size: pooling kernel size is not set"),
    "pool pad >= kernel": (_pool("pool: MAX kernel_size: 2 pad: 2"), "p",
                           "pooling_param.pad: pad [2, 2] must be smaller than the kernel "
                           "[2, 2]"),
    "pool stride 0": (_pool("pool: AVE kernel_size: 2 stride: 0"), "p",
                      "pooling_param.stride: stride [0, 0] must be positive"),
    "pool kernel_h alone": (_pool("pool: MAX kernel_h: 2 kernel_size: 2"), "p",
                            "pooling_param.kernel_h: give kernel_size OR both kernel_h and "
                            "kernel_w"),
    "global pool with kernel": (_pool("pool: AVE global_pooling: true kernel_size: 2"), "p",
                                "pooling_param.kernel_size: global_pooling takes no kernel "
                                "size"),
    "global pool stride": (_pool("pool: AVE global_pooling: true stride: 2"), "p",
                           "pooling_param.global_pooling: global pooling takes only pad 0 "
                           "and stride 1"),
    "stochastic pad": (_pool("pool: STOCHASTIC kernel_size: 3 pad: 1"), "p",
                       "pooling_param.pad: padding with pool STOCHASTIC: Caffe pads only "
                       "average and max pooling"),
    "crop offset outside": (_crop("axis: 2 offset: 5"), "crop",
                            "crop_param.offset: the crop of axis 2 (size 4 at offset 5) is "
                            "outside the input's 8"),
    "crop too many offsets": (_crop("axis: 2 offset: 1 offset: 1 offset: 1"), "crop",
                              "crop_param.offset: 3 offsets for the 2 axes from axis 2 (give "
                              "one, or one per axis)"),
    "crop size bigger": (_crop("axis: 1", "dim: 1 dim: 8 dim: 4 dim: 4"), "crop",
                         "crop_param.offset: the crop of axis 1 (size 8 at offset 0) is "
                         "outside the input's 4"),
    "detection num_classes 0": (_det("num_classes: 0"), "det",
                                "detection_output_param.num_classes: must be set and "
                                "positive (is 0)"),
    "detection no num_classes": (_det("share_location: true"), "det",
                                 "detection_output_param.num_classes: must be set and "
                                 "positive (is None)"),
    "detection eta": (_det("num_classes: 2 nms_param { eta: 2 }"), "det",
                      "detection_output_param.nms_param.eta: 2.0 must be in (0, 1]"),
    "priorbox ratio 0": (_priorbox("min_size: 4 aspect_ratio: 0"), "pb",
                         "prior_box_param.aspect_ratio: 0.0 must be positive and finite"),
    "priorbox ratio negative": (_priorbox("min_size: 4 aspect_ratio: 2 aspect_ratio: -1"),
                                "pb", "prior_box_param.aspect_ratio[1]: -1.0 must be "
                                "positive and finite"),
    "priorbox min_size inf": (_priorbox("min_size: inf"), "pb",
                              "prior_box_param.min_size: inf must be positive and finite"),
    "priorbox max_size inf": (_priorbox("min_size: 4 max_size: inf"), "pb",
                              "prior_box_param.max_size: inf must be finite and greater than "
                              "min_size 4.0"),
    "priorbox variance 0": (_priorbox("min_size: 4 variance: 0"), "pb",
                            "prior_box_param.variance: 0.0 must be positive and finite"),
    "priorbox variance inf": (_priorbox("min_size: 4 variance: 0.1 variance: 0.1 "
                                        "variance: inf variance: 0.2"), "pb",
                              "prior_box_param.variance[2]: inf must be positive and finite"),
    "priorbox 3 variances": (_priorbox("min_size: 4 variance: 0.1 variance: 0.1 "
                                       "variance: 0.2"), "pb",
                             "prior_box_param.variance: need 1 or 4 values, got 3"),
    "priorbox step inf": (_priorbox("min_size: 4 step: inf"), "pb",
                          "prior_box_param.step: inf must be positive and finite"),
    "priorbox step beyond float32": (_priorbox("min_size: 4 step: 1e39"), "pb",
                                     "prior_box_param.step: inf must be positive and finite"),
    "priorbox offset inf": (_priorbox("min_size: 4 offset: inf"), "pb",
                            "prior_box_param.offset: inf must be finite"),
    "priorbox too many priors": (_priorbox("min_size: 4 " + "min_size: 5 " * 300), "pb",
                                 "prior_box_param.min_size: 8x8 cells x 301 priors per "
                                 "cell = 19264 priors, more than 16777216"),
}


@pytest.mark.parametrize("body,layer,message", list(CAFFE_REJECTS.values()),
                         ids=list(CAFFE_REJECTS))
def test_what_caffe_rejects_is_refused_when_read(tmp_path, body, layer, message):
    if "19264" in message:                       # the prior bound, at a size a test can reach
        import caffe2metal.layers.ssd as ssd_layers
        pytest.MonkeyPatch().setattr(ssd_layers, "MAX_PRIORS", 16777216 // 1024)
        message = message.replace("16777216", str(16777216 // 1024))
    proto = _net(tmp_path, body)
    with pytest.raises(GraphError) as e:
        read_prototxt(proto)
    assert str(e.value) == f"{proto}, layer '{layer}': {message}"


@pytest.mark.parametrize("case", ["conv stride 0", "pool pad >= kernel", "crop offset outside",
                                  "detection num_classes 0", "priorbox ratio 0"])
def test_what_caffe_rejects_exits_2_and_writes_nothing(tmp_path, capsys, case):
    body, layer, message = CAFFE_REJECTS[case]
    proto = _net(tmp_path, body)
    out = tmp_path / "OUT"
    assert _convert(proto, out) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"caffe2metal: error: {proto}, layer '{layer}': {message}"
    assert not out.exists()


@pytest.mark.parametrize("dims,why", [
    ("dim: 1 dim: 0 dim: 4611686018427387904 dim: 4",
     "has a dimension that is not a positive integer"),
    ("dim: 1 dim: 4294967296 dim: 4294967296 dim: 4", "elements, more than Caffe's limit"),
])
def test_absurd_input_shape_is_one_line(tmp_path, capsys, dims, why):
    proto = write_net(tmp_path, f'name: "t"\ninput: "data"\ninput_shape {{ {dims} }}\n'
                      + _conv("num_output: 4 kernel_size: 1"))
    out = tmp_path / "OUT"
    assert _convert(proto, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"caffe2metal: error: {proto}: input 'data': shape ")
    assert why in err and "\n" not in err
    assert not out.exists()


# ---------------------------------------------------------------- 1. never written wrong

def _weights(proto, edit):
    model = read_prototxt(proto)
    synth.init_weights(model, 0)
    edit({layer.name: layer for layer in model.graph.layers})
    path = proto.with_suffix(".caffemodel")
    write_caffemodel(path, merged_layers(model.graph), net_name=model.graph.name)
    return path


def _set(name, index, where, value):
    def edit(layers):
        blob = np.array(layers[name].blobs[index], np.float32)
        blob[where] = value
        layers[name].blobs[index] = blob
    return edit


def _both(*edits):
    def edit(layers):
        for e in edits:
            e(layers)
    return edit


CONV2 = _conv("num_output: 8 kernel_size: 3") + (
    'layer { name: "c2" type: "Convolution" bottom: "c" top: "c2" '
    "convolution_param { num_output: 4 kernel_size: 1 } }\n")
KEPT = ('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }\n'
        'layer { name: "sc" type: "Scale" bottom: "bn" top: "bn" '
        "scale_param { bias_term: true } }\n")
SSD = ('layer { name: "pb" type: "PriorBox" bottom: "data" bottom: "data" top: "pb" '
       "prior_box_param { min_size: 4 step: 2 offset: 3e38 } }\n")

DEGRADED = {
    # row 1 of c: all 3e-5 (subnormal in float16), not negligible beside the layer's 0.05
    "float16 row below 2^-14": (
        CONV2, _both(_set("c", 0, (slice(None),), 0.05), _set("c", 0, (1,), 3e-5)),
        ["--dtype", "float16"], "c",
        "weight 3e-05 at element [1][0][0][0] would be 2.99811e-05 in float16, an error "
        "beyond float16's precision (2^-11) at its output channel's largest |weight| 3e-05 "
        "(float16 keeps 11 bits only from 6.1e-5 up): use --dtype float32"),
    "float16 overflow": (
        CONV2, _set("c2", 0, (2, 5, 0, 0), 7e4), ["--dtype", "float16"], "c2",
        "weight 70000 at element [2][0][0][5] does not fit in float16 (max 65504): use "
        "--dtype float32"),
    "channel_affine scale beyond float32": (
        KEPT, _both(_set("bn", 0, (slice(None),), 0.0), _set("bn", 1, (slice(None),), 0.25),
                    _set("bn", 2, (slice(None),), 1.0), _set("sc", 0, (3,), 3e38)),
        [], "bn", "holds 5.99988e+38 at element [3], beyond float32 (max 3.4e38)"),
    "channel_affine shift beyond float32": (
        KEPT, _both(_set("bn", 0, (slice(None),), 0.0), _set("bn", 0, (1,), -3e38),
                    _set("bn", 1, (slice(None),), 0.25), _set("bn", 2, (slice(None),), 1.0),
                    _set("sc", 0, (slice(None),), 1.0), _set("sc", 1, (slice(None),), 0.0)),
        [], "bn", "holds 5.99988e+38 at element [1], beyond float32 (max 3.4e38)"),
    "priors beyond float32": (
        SSD, lambda layers: None, [], "pb",
        "prior_box_param.step: prior 0 of cell (0, 0) would have xmin inf (step, offset or "
        "box size beyond float32)"),
}


@pytest.mark.parametrize("body,edit,args,layer,message", list(DEGRADED.values()),
                         ids=list(DEGRADED))
def test_degraded_output_is_refused_and_nothing_written(tmp_path, capsys, body, edit, args,
                                                        layer, message):
    proto = _net(tmp_path, body)
    weights = _weights(proto, edit)
    out = tmp_path / "OUT"
    assert _run(["convert", proto, weights, "-o", out, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"caffe2metal: error: layer '{layer}': {message}"
    assert not out.exists()


def test_float16_keeps_tiny_values_beside_larger_ones(tmp_path):
    """2e-8 in a row of 0.05 (flushes to 0: error 2e-8, far below float16's 2.4e-5 on 0.05),
    and a dead row of 1e-6 (below 2^-11 of the layer's largest): converted."""
    proto = _net(tmp_path, CONV2)
    weights = _weights(proto, _both(_set("c", 0, (slice(None),), 0.05),
                                    _set("c", 0, (0, 0, 0, 0), 2e-8),
                                    _set("c", 0, (2,), 1e-6)))
    out = tmp_path / "OUT"
    assert _run(["convert", proto, weights, "-o", out, "--dtype", "float16"]) == 0
    w = np.fromfile(out / "metal" / "weights_c.dat", "<f2").reshape(8, 3, 3, 4)
    assert w[0, 0, 0, 0] == 0 and w[1].min() == np.float16(0.05)
