"""caffe2metal.metal: the files `convert` writes under OUT/metal, end to end.

Every layout case builds a tiny Caffe net in code (fixed seeds), converts it
with `convert()`, reads the weight and bias files back from disk as the
manifest describes them (dtype, shape, size, sha256), runs the numpy MPS
model (mps.py) on them and compares with a plain float64 NCHW reference of
Caffe's definition written here: im2col through ``sliding_window_view`` for
Convolution, an ``np.add.at`` scatter for Deconvolution, a matrix product for
InnerProduct, BatchNorm/Scale per channel.  (tests/test_mps.py tests mps.py
itself.)  Every manifest is validated against caffe2metal/export/manifest.schema.json.
SSD priors are compared with OpenCV's PriorBox Concat output for the built-in
example and the real SSD models; vgg_ssd300 is also verified end to end here
(test_verify.py holds the other architectures; this keeps each file < 1 min).

Tolerance: the MPS model accumulates in float64 from float32 (folded) weights,
the reference is float64 from the original blobs: rtol 1e-5, atol 1e-5 on
outputs of order 1..10.
"""
from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from caffe2metal import fold, mps
from caffe2metal.caffe import textproto
from caffe2metal.errors import ExportError
from caffe2metal.examples import build as build_example
from caffe2metal.examples import weights as synth
from caffe2metal.export import files as metal_files
from caffe2metal.export import metal
from caffe2metal.export.caffe import write_merged_caffemodel
from caffe2metal.net.reader import read_model, read_prototxt
from caffe2metal.pipeline import convert
from caffe2metal.verification.opencv import caffemodel_bytes, opencv_net
from conftest import mark_slow

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
SCHEMA = json.loads((files("caffe2metal.export") / "manifest.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
RTOL = ATOL = 1e-5


# ---------------------------------------------------------------- helpers

def check_schema(manifest: dict) -> None:
    errors = sorted(VALIDATOR.iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def net_text(layers: str, shape=(1, 8, 9, 9)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'name: "tiny"\ninput: "data"\ninput_shape {{ {dims} }}\n{layers}\n'


def write_net(tmp: Path, text: str, seed: int = 0, name: str = "tiny") -> tuple[Path, Path]:
    """The prototxt plus a caffemodel of random blobs (realistic BatchNorm statistics)."""
    tmp.mkdir(parents=True, exist_ok=True)
    proto = tmp / f"{name}.prototxt"
    proto.write_text(text)
    model = read_prototxt(proto)
    rng = np.random.default_rng(seed)
    for layer in model.graph.layers:
        shapes = model.shapes.params.get(layer.name) or []
        blobs = [rng.normal(0, 0.5, s).astype(np.float32) for s in shapes]
        if layer.type == "BatchNorm":
            s = np.float32(rng.uniform(100, 1000))
            blobs = [rng.normal(0, 0.3, shapes[0]) * s, rng.uniform(0.5, 2.0, shapes[1]) * s,
                     np.array([s])]
            blobs = [b.astype(np.float32) for b in blobs]
        elif layer.type == "Scale" and blobs:
            blobs[0] = rng.uniform(0.5, 1.5, shapes[0]).astype(np.float32)
        layer.blobs = blobs
    weights = tmp / f"{name}.caffemodel"
    write_merged_caffemodel(weights, model.graph)
    return proto, weights


def convert_net(tmp: Path, text: str, seed: int = 0, **kw):
    proto, weights = write_net(tmp, text, seed)
    result = convert(proto, weights, tmp / "out", **kw)
    check_schema(result.manifest)
    on_disk = json.loads((tmp / "out" / "manifest.json").read_text())
    assert on_disk == result.manifest
    return result, read_model(proto, weights), tmp / "out"


def read_back(out: Path, spec: dict) -> np.ndarray:
    """A file exactly as the manifest describes it: size, dtype, shape, sha256."""
    path = out / spec["file"]
    assert path.resolve().parent == (out / "metal").resolve()
    data = path.read_bytes()
    dtype = {"float32": "<f4", "float16": "<f2"}[spec["dtype"]]
    assert len(data) == np.prod(spec["shape"]) * np.dtype(dtype).itemsize
    assert hashlib.sha256(data).hexdigest() == spec["sha256"]
    return np.frombuffer(data, dtype).reshape(spec["shape"])


def entry(manifest: dict, name: str) -> dict:
    return next(e for e in manifest["layers"] if e["name"] == name)


# ---------------------------------------------------------------- Caffe reference, NCHW float64

def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def ref_conv(x, w, b, stride=1, pad=0, dilation=1, group=1):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    x = np.pad(np.asarray(x, np.float64)[0], ((0, 0), (ph, ph), (pw, pw)))
    out, cg, kh, kw = w.shape
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    cols = np.lib.stride_tricks.sliding_window_view(x, span, axis=(1, 2))[:, ::sh, ::sw, ::dh, ::dw]
    c, ho, wo = cols.shape[:3]
    cols = cols.reshape(group, cg, ho, wo, kh, kw)
    y = np.einsum("gchwpq,gocpq->gohw", cols, np.asarray(w, np.float64).reshape(
        group, out // group, cg, kh, kw)).reshape(out, ho, wo)
    return (y if b is None else y + np.asarray(b, np.float64)[:, None, None])[None]


def ref_deconv(x, w, b, stride=1, pad=0, dilation=1, group=1):
    """Caffe Deconvolution as the scatter it is: every input pixel adds its kernel."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    x = np.asarray(x, np.float64)[0]
    cin, og, kh, kw = w.shape
    c, h, wd = x.shape
    full = np.zeros((og * group, sh * (h - 1) + dh * (kh - 1) + 1,
                     sw * (wd - 1) + dw * (kw - 1) + 1))
    wg = np.asarray(w, np.float64).reshape(group, cin // group, og, kh, kw)
    xg = x.reshape(group, cin // group, h, wd)
    contrib = np.einsum("gcij,gcopq->goijpq", xg, wg).reshape(og * group, h, wd, kh, kw)
    o, i, j, p, q = np.indices(contrib.shape, sparse=True)
    np.add.at(full, (o, i * sh + p * dh, j * sw + q * dw), contrib)
    y = full[:, ph:full.shape[1] - ph, pw:full.shape[2] - pw]
    return (y if b is None else y + np.asarray(b, np.float64)[:, None, None])[None]


def ref_ip(x, w, b, transpose=False):
    w = np.asarray(w, np.float64)
    y = np.asarray(x, np.float64).reshape(1, -1) @ (w if transpose else w.T)
    return y if b is None else y + np.asarray(b, np.float64)


def ref_affine(x, layer):
    """BatchNorm or Scale, written from Caffe's definition."""
    x = np.asarray(x, np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    bl = [np.asarray(b, np.float64).reshape(-1) for b in layer.blobs]
    if layer.type == "BatchNorm":
        f = 0.0 if bl[2][0] == 0 else 1.0 / bl[2][0]
        eps = layer.params.get("batch_norm_param", {}).get("eps", 1e-5)
        return (x - (bl[0] * f).reshape(shape)) / np.sqrt(bl[1] * f + eps).reshape(shape)
    beta = bl[1] if len(bl) > 1 else np.zeros_like(bl[0])
    return x * bl[0].reshape(shape) + beta.reshape(shape)


def geometry(p: dict) -> dict:
    """stride, pad, dilation of a convolution_param, Caffe defaults (2-D, one value or _h/_w)."""
    def get(name, default):
        one = (p.get(name) or [default])[0]
        return (p.get(f"{name}_h", one), p.get(f"{name}_w", one))
    return dict(stride=get("stride", 1), pad=get("pad", 0), dilation=(p.get("dilation") or [1])[0])


def ref_layer(layer, x):
    p = layer.params.get("convolution_param", {})
    geo = geometry(p)
    b = layer.blobs[1] if len(layer.blobs) > 1 else None
    if layer.type in ("Convolution", "DepthwiseConvolution"):
        return ref_conv(x, layer.blobs[0], b, group=p.get("group", 1), **geo)
    if layer.type == "ConvolutionDepthwise":
        return ref_conv(x, layer.blobs[0], b, group=x.shape[1], **geo)
    if layer.type == "Deconvolution":
        return ref_deconv(x, layer.blobs[0], b, group=p.get("group", 1), **geo)
    if layer.type == "InnerProduct":
        transpose = layer.params.get("inner_product_param", {}).get("transpose", False)
        return ref_ip(x, layer.blobs[0], b, transpose)
    if layer.type in ("BatchNorm", "Scale"):
        return ref_affine(x, layer)
    if layer.type == "ReLU":
        s = layer.params.get("relu_param", {}).get("negative_slope", 0.0)
        return np.where(x > 0, x, x * s)
    raise AssertionError(f"no reference for {layer.type}")


def ref_forward(model, x) -> dict[str, np.ndarray]:
    """Every unique blob of a linear tiny net, from the original blobs."""
    values = {"data": np.asarray(x, np.float64)}
    for layer in model.graph.layers:
        values[layer.tops[0]] = ref_layer(layer, values[layer.bottoms[0]])
    return values


def metal_layer(out: Path, e: dict, x: np.ndarray) -> np.ndarray:
    """One manifest layer from its files, as MPS computes it; x and result NCHW."""
    w, b = read_back(out, e["weights"]), read_back(out, e["bias"])
    xh = np.moveaxis(np.asarray(x)[0], 0, -1)
    xh = xh.reshape(1, 1, -1) if xh.ndim == 1 else xh
    y = mps.KINDS[e["kind"]].run(e, xh, w, b)
    if e["kind"] == "fully_connected":
        return y.reshape(1, -1)
    return y.transpose(2, 0, 1)[None] if np.asarray(x).ndim == 4 else y.reshape(1, -1)


def check_all_layers(result, model, out, x=None, rtol=RTOL, atol=ATOL):
    """Every exported layer, recomputed from its files, equals the Caffe reference."""
    graph = model.graph
    shape = model.shapes.blobs["data"]
    x = np.random.default_rng(7).uniform(-1, 1, shape) if x is None else x
    values = ref_forward(model, x)
    merged = fold.apply(graph, fold.plan(graph))
    by_name = {layer.name: layer for layer in merged.layers}
    assert result.manifest["layers"], "nothing was exported"
    for e in result.manifest["layers"]:
        if e["kind"] == "channel_affine":
            src, dst = graph.layer(e["chain"][0]).bottoms[0], graph.layer(e["chain"][-1]).tops[0]
        else:
            src, dst = by_name[e["name"]].bottoms[0], by_name[e["name"]].tops[0]
        got = metal_layer(out, e, values[src])
        ref = values[dst].reshape(got.shape)
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * max(1.0, np.abs(ref).max()),
                                   err_msg=e["name"])


# ---------------------------------------------------------------- layouts, end to end

def conv(name, bottom, top, num_output, extra="", bias=True, type_="Convolution"):
    bias_text = "" if bias else " bias_term: false"
    return (f'layer {{ name: "{name}" type: "{type_}" bottom: "{bottom}" top: "{top}"\n'
            f'  convolution_param {{ num_output: {num_output}{bias_text} {extra} }} }}\n')


CASES = {
    # name: (layers, input shape, expected (kind, groups, dense_from_groups, weights shape))
    "grouped": (conv("c", "data", "c", 16, "kernel_size: 3 pad: 1 group: 2"), (1, 8, 7, 7),
                ("convolution", 2, None, [16, 3, 3, 4])),
    "grouped_dense": (conv("c", "data", "c", 9, "kernel_size: 3 pad: 1 group: 3"), (1, 6, 7, 7),
                      ("convolution", 1, 3, [9, 3, 3, 6])),
    "depthwise_strided": (conv("c", "data", "c", 8, "kernel_size: 3 pad: 1 stride: 2 group: 8"),
                          (1, 8, 9, 9), ("depthwise_convolution", 8, None, [8, 3, 3])),
    "dilated": (conv("c", "data", "c", 8, "kernel_size: 3 pad: 2 dilation: 2"), (1, 4, 9, 9),
                ("convolution", 1, None, [8, 3, 3, 4])),
    "nonsquare_strided": (conv("c", "data", "c", 6, "kernel_h: 3 kernel_w: 1 stride_h: 2 "
                               "stride_w: 1 pad_h: 1 pad_w: 0"), (1, 4, 9, 8),
                          ("convolution", 1, None, [6, 3, 1, 4])),
    "deconv_groups": (conv("d", "data", "d", 8, "kernel_size: 4 stride: 2 pad: 1 group: 2",
                           type_="Deconvolution"), (1, 8, 5, 5),
                      ("convolution_transpose", 2, None, [8, 4, 4, 4])),
    "deconv_groups_dense": (conv("d", "data", "d", 6, "kernel_size: 3 stride: 2 group: 3",
                                 type_="Deconvolution"), (1, 6, 4, 4),
                            ("convolution_transpose", 1, 3, [6, 3, 3, 6])),
    "deconv_dilated_nonsquare": (conv("d", "data", "d", 4, "kernel_h: 3 kernel_w: 2 stride_h: 1 "
                                      "stride_w: 2 dilation: 2", type_="Deconvolution"),
                                 (1, 4, 5, 4), ("convolution_transpose", 1, None, [4, 3, 2, 4])),
    "fork_convolution_depthwise": (conv("c", "data", "c", 8, "kernel_size: 3 pad: 1",
                                        type_="ConvolutionDepthwise"), (1, 8, 6, 6),
                                   ("depthwise_convolution", 8, None, [8, 3, 3])),
    "fork_depthwise_convolution": (conv("c", "data", "c", 8, "kernel_size: 3 pad: 1 group: 8",
                                        type_="DepthwiseConvolution"), (1, 8, 6, 6),
                                   ("depthwise_convolution", 8, None, [8, 3, 3])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_against_caffe_reference(tmp_path, case):
    layers, shape, (kind, groups, dense, wshape) = CASES[case]
    result, model, out = convert_net(tmp_path, net_text(layers, shape))
    (e,) = result.manifest["layers"]
    assert (e["kind"], e["groups"], e["dense_from_groups"], e["weights"]["shape"]) == \
        (kind, groups, dense, wshape)
    assert e["weights"]["layout"] == mps.KINDS[kind].layout
    check_all_layers(result, model, out)


def test_conv_bytes_are_the_documented_transpose(tmp_path):
    result, model, out = convert_net(tmp_path, net_text(conv("c", "data", "c", 5, "kernel_h: 3 "
                                                             "kernel_w: 2"), (1, 3, 6, 6)))
    w = model.graph.layer("c").blobs[0]
    e = entry(result.manifest, "c")
    assert (out / e["weights"]["file"]).read_bytes() == \
        np.ascontiguousarray(w.transpose(0, 2, 3, 1)).astype("<f4").tobytes()
    # a first layer with 3 input channels: exactly out*kH*kW*3 values, no padding to 4
    assert (out / e["weights"]["file"]).stat().st_size == 5 * 3 * 2 * 3 * 4


def test_dense_from_groups_is_block_diagonal(tmp_path):
    result, model, out = convert_net(tmp_path, net_text(
        conv("c", "data", "c", 9, "kernel_size: 1 group: 3"), (1, 6, 4, 4)))
    w = read_back(out, entry(result.manifest, "c")["weights"]).reshape(3, 3, 3, 2)  # [g][o][G][c]
    caffe = model.graph.layer("c").blobs[0].reshape(3, 3, 2)                       # [g][o][c]
    for g in range(3):
        np.testing.assert_array_equal(w[g, :, g], caffe[g])
        assert not np.delete(w[g], g, axis=1).any()


def test_deconv_group_layout_is_group_major_and_flipped(tmp_path):
    result, model, out = convert_net(tmp_path, net_text(
        conv("d", "data", "d", 8, "kernel_size: 2 stride: 2 group: 2", type_="Deconvolution"),
        (1, 8, 3, 3)))
    w = read_back(out, entry(result.manifest, "d")["weights"])            # [out][kH][kW][in/g]
    caffe = model.graph.layer("d").blobs[0]                                 # [in][out/g][kH][kW]
    # output channel 4 + o belongs to group 1 and reads Caffe inputs 4..7, kernel flipped
    np.testing.assert_array_equal(w[4 + 1, 0, 1, :], caffe[4:8, 1, 1, 0])
    np.testing.assert_array_equal(w[2, 1, 0, :], caffe[0:4, 2, 0, 1])


FC_NET = (conv("c", "data", "c", 6, "kernel_size: 3 stride: 2") +
          'layer { name: "fc" type: "InnerProduct" bottom: "c" top: "fc" '
          'inner_product_param { num_output: 10 } }\n'
          'layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" '
          'inner_product_param { num_output: 7 transpose: true } }\n')


def test_fully_connected_after_conv_and_after_fc(tmp_path):
    result, model, out = convert_net(tmp_path, net_text(FC_NET, (1, 4, 9, 7)))
    fc, fc2 = entry(result.manifest, "fc"), entry(result.manifest, "fc2")
    # [out][H][W][C] of the conv output (6 channels, 4x3), kernel = the whole image
    assert fc["weights"]["shape"] == [10, 4, 3, 6] and fc["kernel"] == [4, 3]
    assert fc["input"] == {"blob": "c", "shape": [1, 6, 4, 3]}
    assert fc2["weights"]["shape"] == [7, 1, 1, 10] and fc2["input_channels"] == 10
    w = model.graph.layer("fc").blobs[0]
    np.testing.assert_array_equal(read_back(out, fc["weights"]),
                                  w.reshape(10, 6, 4, 3).transpose(0, 2, 3, 1))
    check_all_layers(result, model, out)


def bn_scale(name, bottom, top, eps=None):
    eps_text = f" batch_norm_param {{ eps: {eps} }}" if eps else ""
    return (f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "{bottom}" '
            f'top: "{top}"{eps_text} }}\n'
            f'layer {{ name: "{name}/scale" type: "Scale" bottom: "{top}" top: "{top}" '
            'scale_param { bias_term: true } }\n')


FOLD_NET = (bn_scale("in", "data", "data")                  # on the input: kept, channel_affine
            + conv("c1", "data", "c1", 8, "kernel_size: 3 pad: 1", bias=False)
            + bn_scale("c1", "c1", "c1", eps=0.001)
            + 'layer { name: "c1/relu" type: "ReLU" bottom: "c1" top: "c1" '
              'relu_param { negative_slope: 0.1 } }\n'
            + conv("c2", "c1", "c2", 8, "kernel_size: 1")      # keeps its bias, then BN
            + bn_scale("c2", "c2", "c2/bn"))


def test_folded_kept_and_activation(tmp_path):
    result, model, out = convert_net(tmp_path, net_text(FOLD_NET, (1, 4, 6, 6)))
    m = result.manifest
    assert [e["name"] for e in m["layers"]] == ["in/bn", "c1", "c2"]      # net order
    aff, c1, c2 = m["layers"]
    assert aff["kind"] == "channel_affine" and aff["chain"] == ["in/bn", "in/scale"]
    assert aff["folded"] == [] and aff["weights"]["shape"] == [4] == aff["bias"]["shape"]
    assert c1["folded"] == ["c1/bn", "c1/scale"] and c1["chain"] == []
    assert c1["activation"] == {"layer": "c1/relu", "type": "ReLU", "negative_slope": 0.1}
    assert c2["output"]["blob"] == "c2/bn" and c2["activation"] is None
    chain = [model.graph.layer("in/bn"), model.graph.layer("in/scale")]
    k, c = fold.chain_affine(model.graph, chain)
    np.testing.assert_allclose(read_back(out, aff["weights"]), k, rtol=1e-7)
    np.testing.assert_allclose(read_back(out, aff["bias"]), c, rtol=1e-6, atol=1e-7)
    check_all_layers(result, model, out)


def test_bias_is_float32_zeros_when_absent_and_float16_weights(tmp_path):
    text = net_text(conv("c", "data", "c", 6, "kernel_size: 3", bias=False), (1, 4, 5, 5))
    result, model, out = convert_net(tmp_path, text, dtype="float16")
    e = entry(result.manifest, "c")
    assert e["weights"]["dtype"] == "float16" and e["bias"]["dtype"] == "float32"
    assert result.manifest["metal"]["weights_dtype"] == "float16"
    np.testing.assert_array_equal(read_back(out, e["bias"]), np.zeros(6, np.float32))
    w = model.graph.layer("c").blobs[0]
    np.testing.assert_array_equal(read_back(out, e["weights"]),
                                  w.transpose(0, 2, 3, 1).astype(np.float16))
    assert (out / e["weights"]["file"]).stat().st_size == w.size * 2


def test_float16_overflow_is_an_error(tmp_path):
    proto, weights = write_net(tmp_path, net_text(conv("c", "data", "c", 2, "kernel_size: 1"),
                                                  (1, 2, 3, 3)))
    model = read_prototxt(proto)
    model.graph.layers[0].blobs = [np.full((2, 2, 1, 1), 1e5, np.float32),
                                   np.zeros(2, np.float32)]
    write_merged_caffemodel(weights, model.graph)
    with pytest.raises(ExportError, match="float16"):
        convert(proto, weights, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()            # nothing half-written


def test_activations_prelu_relu6_and_shared_output(tmp_path):
    text = net_text(
        conv("a", "data", "a", 4, "kernel_size: 1")
        + 'layer { name: "a/prelu" type: "PReLU" bottom: "a" top: "a" }\n'
        + conv("b", "a", "b", 4, "kernel_size: 1")
        + 'layer { name: "b/relu6" type: "ReLU6" bottom: "b" top: "b" }\n'
        + conv("c", "b", "c", 4, "kernel_size: 1")
        + 'layer { name: "c/relu" type: "ReLU" bottom: "c" top: "c_relu" }\n'
        + 'layer { name: "sum" type: "Eltwise" bottom: "c" bottom: "c_relu" top: "sum" }\n',
        (1, 4, 3, 3))
    result, model, out = convert_net(tmp_path, text)
    a, b, c = (entry(result.manifest, n) for n in "abc")
    assert a["activation"]["type"] == "PReLU" and a["activation"]["channel_shared"] is False
    np.testing.assert_array_equal(read_back(out, a["activation"]["slopes"]),
                                  model.graph.layer("a/prelu").blobs[0])
    assert b["activation"] == {"layer": "b/relu6", "type": "ReLU6"}
    assert c["activation"] is None                  # 'c' is read by the ReLU and the Eltwise
    assert result.manifest["metal"]["skipped"] == []


def test_unexportable_layers_are_listed_not_dropped(tmp_path):
    text = net_text(
        conv("a", "data", "a", 4, "kernel_size: 1")
        + 'layer { name: "n" type: "Normalize" bottom: "a" top: "n" }\n'
        + 'layer { name: "p" type: "PReLU" bottom: "n" top: "p" }\n'
        + 'layer { name: "gate" type: "Scale" bottom: "p" bottom: "a" top: "g" }\n',
        (1, 4, 3, 3))
    result, model, out = convert_net(tmp_path, text)
    skipped = {s["name"]: s["reason"] for s in result.manifest["metal"]["skipped"]}
    assert set(skipped) == {"p", "gate"}
    assert "second bottom" in skipped["gate"]
    assert [e["name"] for e in result.manifest["layers"]] == ["a"]
    # Normalize has no MPS kind: its scale is a file of the plan's normalize op
    (norm,) = result.manifest["metal"]["normalize"]
    assert norm["name"] == "n" and norm["scale"]["layout"] == "[1] scale"
    np.testing.assert_array_equal(read_back(out, norm["scale"]),
                                  np.reshape(model.graph.layer("n").blobs[0], -1))


def test_forge_naming(tmp_path):
    result, _, out = convert_net(tmp_path, net_text(FC_NET, (1, 4, 9, 7)), naming="forge")
    assert entry(result.manifest, "fc")["weights"]["file"] == "metal/fc_w.bin"
    assert entry(result.manifest, "fc")["bias"]["file"] == "metal/fc_b.bin"
    assert sorted(p.name for p in (out / "metal").iterdir()) == \
        ["c_b.bin", "c_w.bin", "fc2_b.bin", "fc2_w.bin", "fc_b.bin", "fc_w.bin"]


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("name, safe", [
    ("conv1/dw", "conv1_dw"), ("..", "__"), (".", "_"), (".hidden", "_hidden"),
    ("../../etc/passwd", "___.._etc_passwd"), ("/abs/path", "_abs_path"),
    ("C:\\x", "C__x"), ("a b\tc", "a_b_c"), ("CON", "CON_"), ("nul", "nul_"), ("com1.x", "com1_.x"),
    ("LPT9", "LPT9_"), ("CONSOLE", "CONSOLE"), ("été", "_t_"), ("", "_"), ("a.b-c_d", "a.b-c_d"),
])
def test_safe_name(name, safe):
    assert metal_files.safe_name(name) == safe
    for naming in ("apple", "forge"):
        for f in metal.file_names(name, naming):
            assert "/" not in f and "\\" not in f and not f.startswith(".")
            assert f.split(".")[0].upper() not in metal_files._RESERVED


def test_long_names_stay_short_and_distinct():
    a, b = metal_files.safe_name("x" * 300), metal_files.safe_name("x" * 299 + "y")
    assert len(a) <= 120 and a != b


HOSTILE = ["..", "../../escape", "/etc/passwd", ".hidden", "CON", "a b", "nul.txt", "x/../../y"]


def test_hostile_names_stay_inside_out(tmp_path):
    layers, bottom = "", "data"
    for i, name in enumerate(HOSTILE):
        layers += conv(name, bottom, f"t{i}", 4, "kernel_size: 1")
        bottom = f"t{i}"
    for naming in ("apple", "forge"):
        result, _, out = convert_net(tmp_path / naming, net_text(layers, (1, 4, 2, 2)),
                                     naming=naming)
        assert [e["name"] for e in result.manifest["layers"]] == HOSTILE
        metal_files = list((out / "metal").iterdir())
        assert len(metal_files) == 2 * len(HOSTILE)
        assert not [p for p in metal_files if p.name.startswith(".")]
        assert {p.name for p in (tmp_path / naming).iterdir()} == \
            {"tiny.prototxt", "tiny.caffemodel", "out"}
        assert {p.name for p in out.iterdir()} == \
            {"manifest.json", "metal", "tiny_merged.prototxt", "tiny_merged.caffemodel"}
    assert {p.name for p in tmp_path.iterdir()} == {"apple", "forge"}


@pytest.mark.parametrize("a, b", [("conv/1", "conv_1"), ("Conv1", "conv1"), ("a b", "a_b"),
                                  ("CON", "con_")])
def test_names_that_share_a_file_are_an_error(tmp_path, a, b):
    text = net_text(conv(a, "data", "t1", 4, "kernel_size: 1")
                    + conv(b, "t1", "t2", 4, "kernel_size: 1"), (1, 4, 2, 2))
    proto, weights = write_net(tmp_path, text)
    with pytest.raises(ExportError) as err:
        convert(proto, weights, tmp_path / "out")
    assert f"'{a}'" in str(err.value) and f"'{b}'" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_dtype_and_naming_are_errors(tmp_path):
    proto, weights = write_net(tmp_path, net_text(conv("c", "data", "c", 4, "kernel_size: 1"),
                                                  (1, 4, 2, 2)))
    with pytest.raises(ExportError, match="dtype"):
        convert(proto, weights, tmp_path / "o1", dtype="int8")
    with pytest.raises(ExportError, match="naming"):
        convert(proto, weights, tmp_path / "o2", naming="tf")


# ---------------------------------------------------------------- schema

def test_schema_rejects_what_it_should(tmp_path):
    Draft202012Validator.check_schema(SCHEMA)
    result, _, _ = convert_net(tmp_path, net_text(FOLD_NET, (1, 4, 6, 6)))
    good = result.manifest

    def broken(change):
        m = json.loads(json.dumps(good))
        change(m)
        return list(VALIDATOR.iter_errors(m))

    assert broken(lambda m: m.update(version=3))
    assert broken(lambda m: m.update(format="other"))
    assert broken(lambda m: m.pop("layers"))
    assert broken(lambda m: m.update(extra=1))
    assert broken(lambda m: m["layers"][1]["weights"].update(file="metal/../../x.dat"))
    assert broken(lambda m: m["layers"][1]["weights"].update(file="/etc/passwd"))
    assert broken(lambda m: m["layers"][1]["weights"].update(file="metal/.hidden"))
    assert broken(lambda m: m["layers"][1]["bias"].update(dtype="float16"))
    assert broken(lambda m: m["layers"][1]["weights"].update(sha256="abc"))
    assert broken(lambda m: m["layers"][1].update(kind="pooling"))
    assert broken(lambda m: m["layers"][1].pop("activation"))
    assert broken(lambda m: m["layers"][1]["activation"].pop("negative_slope"))
    assert broken(lambda m: m["layers"][0].update(chain=[]))
    assert not broken(lambda m: None)


def test_manifest_without_metal_is_valid(tmp_path):
    proto, weights = write_net(tmp_path, net_text(FOLD_NET, (1, 4, 6, 6)))
    result = convert(proto, weights, tmp_path / "out", metal=False)
    check_schema(result.manifest)
    assert not (tmp_path / "out" / "metal").exists()


# ---------------------------------------------------------------- SSD priors

def opencv_priors(model, concat="mbox_priorbox") -> np.ndarray:
    """OpenCV's output of the Concat that collects the PriorBox layers."""
    net = opencv_net(model.document.text, caffemodel_bytes(model))
    for name, x in synth.random_inputs(model, 1, 1)[0].items():
        net.setInput(x, name)
    return net.forward(concat)


def check_ssd(manifest, out, model, ref):
    check_schema(manifest)
    ssd = manifest["ssd"]
    priors = read_back(out, ssd["priors"])
    assert ref.shape == (1,) + priors.shape
    # OpenCV evaluates the corner formula in float32, Caffe (and we) in double: <= 1 ulp
    np.testing.assert_allclose(priors, ref[0], rtol=0, atol=1e-6)
    concat = model.graph.layer(ssd["priorbox_concat"])
    producers = model.graph.producers()
    assert [h["priorbox"] for h in ssd["heads"]] == [producers[b].name for b in concat.bottoms]
    assert ssd["num_priors"] == sum(h["num_priors"] for h in ssd["heads"]) == priors.shape[1] // 4
    assert [h["first_prior"] for h in ssd["heads"]] == \
        list(np.cumsum([0] + [h["num_priors"] for h in ssd["heads"]])[:-1])
    for h in ssd["heads"]:
        pb = model.graph.layer(h["priorbox"])
        fh, fw = model.shapes.blobs[pb.bottoms[0]][2:]
        assert h["feature_map"] == [fh, fw]
        assert h["num_priors"] == fh * fw * h["priors_per_cell"]
        loc = entry(manifest, h["loc"])          # the loc/conf heads are exported layers
        assert loc["output"]["shape"][1] == 4 * h["priors_per_cell"]
        assert loc["output"]["shape"][2:] == [fh, fw]
        conf = entry(manifest, h["conf"])
        assert conf["output"]["shape"][1] == \
            ssd["detection_output"]["num_classes"] * h["priors_per_cell"]
    assert ssd["loc_order"] == [h["loc"] for h in ssd["heads"]]
    assert ssd["conf_order"] == [h["conf"] for h in ssd["heads"]]


def test_example_priors_and_ssd_description(tmp_path):
    proto, weights = build_example(tmp_path / "ex")
    result = convert(proto, weights, tmp_path / "out")
    model = read_model(proto, weights)
    check_ssd(result.manifest, tmp_path / "out", model, opencv_priors(model))
    ssd = result.manifest["ssd"]
    assert ssd["detection_output"] == {
        "layer": "detection_out", "num_classes": 5, "share_location": True,
        "background_label_id": 0, "nms_threshold": 0.45, "top_k": 100, "eta": 1.0,
        "keep_top_k": 100, "confidence_threshold": 0.25, "code_type": "CENTER_SIZE",
        "variance_encoded_in_target": False}
    assert (ssd["priorbox_concat"], ssd["loc_concat"], ssd["conf_concat"]) == \
        ("mbox_priorbox", "mbox_loc", "mbox_conf")
    assert ssd["loc_order"][:2] == ["conv8_mbox_loc", "conv13_mbox_loc"]
    assert ssd["image_size"] == [300, 300]
    assert [h["feature_map"] for h in ssd["heads"]] == [[19, 19], [10, 10], [5, 5], [3, 3],
                                                        [2, 2], [1, 1]]
    assert ssd["num_priors"] == 1917
    # every conv of the example is exported: 29 backbone/extra + 12 heads
    assert len(result.manifest["layers"]) == 41
    assert all(e["kind"] in ("convolution", "depthwise_convolution")
               for e in result.manifest["layers"])


SSD_MODELS = ["mobilenet_ssd", "mobilenetv2_ssdlite", "vgg_ssd300", "res10_ssd_face"]


def _real(names):
    if MODELS.is_dir():
        return names
    return [pytest.param(None, marks=pytest.mark.skip(reason=f"{MODELS} not present"),
                         id="no-shared-models")]


@pytest.mark.parametrize("name", mark_slow(_real(SSD_MODELS), {"vgg_ssd300"}))
def test_real_ssd_priors(tmp_path, name):
    model = read_prototxt(MODELS / name / "deploy.prototxt")
    synth.init_weights(model, 0)
    plan = fold.plan(model.graph)
    merged = fold.apply(model.graph, plan)
    keys = metal.export(model, merged, plan, tmp_path, dtype="float32")
    manifest = {"format": "caffe2metal", "version": 2,
                "source": {"prototxt": "p", "caffemodel": "c"}, "inputs": [],
                "merged": {"prototxt": "p", "caffemodel": "c"}, "folds": [], "kept": [], **keys}
    check_ssd(manifest, tmp_path, model, opencv_priors(model))
    det = manifest["ssd"]["detection_output"]
    expected = {"mobilenet_ssd": (21, 100, 100, 0.25), "mobilenetv2_ssdlite": (21, 100, 100, 0.35),
                "vgg_ssd300": (21, 400, 200, 0.5), "res10_ssd_face": (2, 400, 200, 0.01)}[name]
    assert (det["num_classes"], det["top_k"], det["keep_top_k"], det["confidence_threshold"]) \
        == expected
    assert (det["nms_threshold"], det["code_type"], det["share_location"]) == \
        (0.45, "CENTER_SIZE", True)
    if name in ("vgg_ssd300", "res10_ssd_face"):      # conv4_3_norm: its scale, [C]
        (norm,) = manifest["metal"]["normalize"]
        assert (norm["name"], norm["scale"]["layout"]) == ("conv4_3_norm", "[C] scale")
        assert "Normalize" not in {s["type"] for s in manifest["metal"]["skipped"]}


# ---------------------------------------------------------------- a real architecture, verified

def resize_input(text: str, h: int, w: int) -> str:
    """The prototxt with its (first) input's height and width replaced."""
    doc = textproto.parse(text)
    top = {f.name: f for f in reversed(doc.fields)}
    if "input_shape" in top:
        dims = top["input_shape"].get("dim")
    elif "input_dim" in top:
        dims = [f for f in doc.fields if f.name == "input_dim"][:4]
    else:
        block = next(b for b in doc.fields if b.name == "layer" and
                     textproto.unquote(b.get("type")[0].value) == "Input")
        dims = block.get("input_param")[0].get("shape")[0].get("dim")
    for f, v in sorted([(dims[2], h), (dims[3], w)], key=lambda e: -e[0].value_start):
        text = text[:f.value_start] + str(v) + text[f.value_start + len(f.value):]
    return text


def verify_real_architecture(tmp_path, name, size=None, calibrate=True, drop=()):
    """Convert a shared model with synthetic weights (input resized to ``size``) and verify it."""
    from caffe2metal.verification import verify
    text = (MODELS / name / "deploy.prototxt").read_text()
    if size:
        text = resize_input(text, size, size)
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(text)
    model = read_prototxt(proto)
    synth.init_weights(model, 0)
    if calibrate:
        synth.calibrate(model, 0, drop=drop)
    weights = tmp_path / "deploy.caffemodel"
    write_merged_caffemodel(weights, model.graph)
    result = convert(proto, weights, tmp_path / "out")
    check_schema(result.manifest)
    return verify(proto, weights, tmp_path / "out"), result.manifest


@pytest.mark.slow
@pytest.mark.parametrize("name", _real(["vgg_ssd300"]))
def test_verify_vgg_ssd300(tmp_path, name):
    """The heaviest architecture (31 GMAC at 300x300) at the smallest input its extra layers
    allow (260x260); here rather than in test_verify.py to keep each file under a minute."""
    report, manifest = verify_real_architecture(tmp_path, name, 260)
    assert report.ok, [(r.name, r.rel, r.note) for r in report.failures]
    assert len([r for r in report.layers if r.kind != "priors"]) == len(manifest["layers"])
    assert all(r.counted for r in report.layers + report.outputs)
    assert any(r.kind == "priors" and r.ok for r in report.layers)


def test_priors_that_do_not_match_the_heads_are_not_written(tmp_path):
    """FaceBoxes-style nets size their heads for more anchors than SSD's PriorBox gives:
    a priors.dat would mislead the app, so none is written and the manifest says why."""
    from conftest import with_weights
    text = '''input: "data"
input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
layer { name: "f" type: "Convolution" bottom: "data" top: "f"
  convolution_param { num_output: 8 kernel_size: 3 stride: 4 pad: 1 } }
layer { name: "loc" type: "Convolution" bottom: "f" top: "loc"
  convolution_param { num_output: LOC kernel_size: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc" top: "loc_flat" }
layer { name: "conf" type: "Convolution" bottom: "f" top: "conf"
  convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf" top: "conf_flat" }
layer { name: "pb" type: "PriorBox" bottom: "f" bottom: "data" top: "pb"
  prior_box_param { min_size: 8 clip: false variance: 0.1 } }
layer { name: "det" type: "DetectionOutput"
  bottom: "loc_flat" bottom: "conf_flat" bottom: "pb" top: "det"
  detection_output_param { num_classes: 2 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 10 } code_type: CENTER_SIZE keep_top_k: 10 } }
'''
    for loc, consistent in ((4, True), (8, False)):
        d = tmp_path / str(loc)
        d.mkdir()
        proto = d / "net.prototxt"
        proto.write_text(text.replace("LOC", str(loc)).replace(
            "num_output: 2 kernel_size", f"num_output: {2 * loc // 4} kernel_size"))
        model, weights = with_weights(proto, calibrate=False)
        convert(proto, weights, d / "out")
        manifest = json.loads((d / "out" / "manifest.json").read_text())
        assert ("ssd" in manifest) == consistent
        assert (d / "out" / "metal" / "priors.dat").exists() == consistent
        reasons = [s["reason"] for s in manifest["metal"]["skipped"] if s["name"] == "det"]
        assert bool(reasons) != consistent
        if reasons:
            assert "not SSD's PriorBox" in reasons[0]


def test_schema_kinds_are_the_mps_kinds_table():
    """One table of MPS kinds: the schema's enum, the writer and verify all read mps.KINDS."""
    kind_enum = SCHEMA["$defs"]["layer"]["properties"]["kind"]["enum"]
    assert sorted(kind_enum) == sorted(mps.KINDS)
    for name, kind in mps.KINDS.items():
        assert kind.name == name and kind.mps_kernel.startswith("MPSCNN") and kind.layout
