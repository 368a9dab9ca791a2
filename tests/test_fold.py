"""BatchNorm/Scale folding: every case the converter must handle, on tiny nets built here.

Each net gets deterministic weights with BatchNorm statistics far from identity
(scale factor s != 1).  Folded blobs are checked against the formula written
out independently below, and original vs merged are run in OpenCV (fusion off):
max|diff| / max|ref| <= 1e-5 for these shallow nets.
"""
from __future__ import annotations

import numpy as np
import pytest

from caffe2metal import fold
from caffe2metal.caffe.caffemodel import write_caffemodel
from caffe2metal.examples.weights import init_weights, random_inputs
from caffe2metal.export.caffe import merged_layers
from caffe2metal.net.reader import read_model, read_prototxt
from caffe2metal.pipeline import convert
from conftest import opencv_run

INPUT = 'input: "data"\ninput_shape { dim: 1 dim: 8 dim: 10 dim: 12 }\n'


def conv(name, bottom, top=None, out=8, bias=False, extra=""):
    b = "" if bias else " bias_term: false"
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top or name}"\n'
            f'  convolution_param {{ num_output: {out} kernel_size: 3 pad: 1{b}{extra} }} }}\n')


def bn(name, bottom, top=None, eps=None, extra=""):
    fields = ([f"eps: {eps}"] if eps is not None else []) + ([extra] if extra else [])
    p = f" batch_norm_param {{ {' '.join(fields)} }}" if fields else ""
    return (f'layer {{ name: "{name}" type: "BatchNorm" bottom: "{bottom}" '
            f'top: "{top or bottom}"{p} }}\n')


def scale(name, bottom, top=None, bias=True, bottoms=()):
    extra = "".join(f' bottom: "{b}"' for b in bottoms)
    p = " scale_param { bias_term: true }" if bias else ""
    return (f'layer {{ name: "{name}" type: "Scale" bottom: "{bottom}"{extra} '
            f'top: "{top or bottom}"{p} }}\n')


def relu(name, bottom):
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{bottom}" top: "{bottom}" }}\n'


def build(tmp_path, text, seed=0, s=999.98, tweak=None):
    """Write the net, weights with BN statistics (mean*s, var*s, s), return the model."""
    proto = tmp_path / "net.prototxt"
    proto.write_text(text)
    model = read_prototxt(proto)
    init_weights(model, seed)
    rng = np.random.default_rng(seed + 100)
    for layer in model.graph.layers:
        if layer.type == "BatchNorm":
            c = layer.blobs[0].size
            mean, var = rng.normal(0, 0.5, c), rng.uniform(0.2, 2.0, c)
            layer.blobs[:3] = [(mean * s).astype(np.float32), (var * s).astype(np.float32),
                               np.array([s], np.float32)]
        if layer.type == "Scale" and layer.blobs:
            layer.blobs[0] = rng.uniform(0.5, 1.5, layer.blobs[0].shape).astype(np.float32)
    if tweak:
        tweak(model)
    weights = tmp_path / "net.caffemodel"
    write_caffemodel(weights, merged_layers(model.graph))
    return read_model(proto, weights)


def run_both(tmp_path, model, result, outputs):
    feed = random_inputs(model, 3, 1)[0]
    ref = opencv_run(model.prototxt, model.caffemodel, feed, outputs)
    out = result.out
    new = opencv_run(out / result.manifest["merged"]["prototxt"],
                     out / result.manifest["merged"]["caffemodel"], feed,
                     [_last_writer(out, result, o) for o in outputs])
    for name, a, b in zip(outputs, ref, new, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max(), err_msg=name)
    return ref


def _last_writer(out, result, layer_name):
    """The merged net's layer that now writes what `layer_name` wrote."""
    merged = read_prototxt(out / result.manifest["merged"]["prototxt"])
    orig = result.model.graph
    top = orig.blob_names[next(layer for layer in orig.layers if layer.name == layer_name).tops[0]]
    writers = [layer.name for layer in merged.graph.layers if top in
               [merged.graph.blob_names[t] for t in layer.tops]]
    return (writers[-1], top)


def expected_fold(w, b, chain, eps):
    """The fold written out plainly: per output channel o, W'[o] = W[o]*k[o],
    b' = (b-mean)*k+beta."""
    mean, var, s = (np.float64(x) for x in chain["bn"][:3]) if "bn" in chain else (0, 1, 1)
    f = 0.0 if s == 0 else 1.0 / s
    k = np.ones(w.shape[0]) if "bn" not in chain else 1.0 / np.sqrt(mean * 0 + var * f + eps)
    mu = np.zeros(w.shape[0]) if "bn" not in chain else mean * f
    gamma, beta = chain.get("scale", (np.ones(w.shape[0]), np.zeros(w.shape[0])))
    k = k * gamma
    b = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    wf = w.astype(np.float64) * k[:, None, None, None]
    return wf.astype(np.float32), ((b - mu) * k + beta).astype(np.float32)


def _blobs(model, name):
    return next(layer for layer in model.graph.layers if layer.name == name).blobs


def _merged(result):
    out = result.out
    return read_model(out / result.manifest["merged"]["prototxt"],
                      out / result.manifest["merged"]["caffemodel"])


@pytest.mark.parametrize("eps", [None, 1e-3, 1e-8])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_eps_and_bias(tmp_path, eps, conv_bias):
    text = INPUT + conv("c", "data", bias=conv_bias) + bn("c/bn", "c", eps=eps) + \
        scale("c/scale", "c") + relu("c/relu", "c")
    model = build(tmp_path, text)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    assert [f.layers for f in result.plan.folds] == [["c/bn", "c/scale"]]
    merged = _merged(result)
    assert [layer.type for layer in merged.graph.layers] == ["Convolution", "ReLU"]
    w = _blobs(model, "c")[0]
    b = _blobs(model, "c")[1] if conv_bias else None
    ew, eb = expected_fold(w, b, {"bn": _blobs(model, "c/bn"), "scale": _blobs(model, "c/scale")},
                           1e-5 if eps is None else eps)
    got_w, got_b = _blobs(merged, "c")
    np.testing.assert_allclose(got_w, ew, rtol=1e-6)
    np.testing.assert_allclose(got_b, eb, rtol=1e-6, atol=1e-6)
    run_both(tmp_path, model, result, ["c/relu"])


@pytest.mark.parametrize("s", [1.0, 999.98, 0.0])
def test_scale_factor_blob(tmp_path, s):
    text = INPUT + conv("c", "data") + bn("c/bn", "c") + scale("c/scale", "c")
    model = build(tmp_path, text, s=s)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    merged = _merged(result)
    w = _blobs(model, "c")[0]
    ew, eb = expected_fold(w, None, {"bn": _blobs(model, "c/bn"),
                                     "scale": _blobs(model, "c/scale")}, 1e-5)
    np.testing.assert_allclose(_blobs(merged, "c")[0], ew, rtol=1e-6)
    np.testing.assert_allclose(_blobs(merged, "c")[1], eb, rtol=1e-6, atol=1e-6)
    if s == 0:      # factor 0 means mean = var = 0: k = gamma / sqrt(eps)
        gamma = _blobs(model, "c/scale")[0].astype(np.float64)
        np.testing.assert_allclose(_blobs(merged, "c")[0][:, 0, 0, 0],
                                   (w[:, 0, 0, 0] * gamma / np.sqrt(1e-5)).astype(np.float32),
                                   rtol=1e-6)
    run_both(tmp_path, model, result, ["c/scale"])


def test_batchnorm_without_scale_and_scale_without_bias(tmp_path):
    text = (INPUT + conv("a", "data") + bn("a/bn", "a") + relu("a/relu", "a")
            + conv("b", "a") + bn("b/bn", "b") + scale("b/scale", "b", bias=False))
    model = build(tmp_path, text)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    assert [f.layers for f in result.plan.folds] == [["a/bn"], ["b/bn", "b/scale"]]
    merged = _merged(result)
    ew, eb = expected_fold(_blobs(model, "b")[0], None, {
        "bn": _blobs(model, "b/bn"),
        "scale": (_blobs(model, "b/scale")[0], np.zeros(8))}, 1e-5)
    np.testing.assert_allclose(_blobs(merged, "b")[0], ew, rtol=1e-6)
    np.testing.assert_allclose(_blobs(merged, "b")[1], eb, rtol=1e-6, atol=1e-6)
    run_both(tmp_path, model, result, ["a/relu", "b/scale"])


def test_scale_alone_after_producer(tmp_path):
    text = INPUT + conv("c", "data", bias=True) + scale("c/scale", "c")
    model = build(tmp_path, text)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    assert [f.layers for f in result.plan.folds] == [["c/scale"]]
    run_both(tmp_path, model, result, ["c/scale"])


def test_nvcaffe_five_blob_batchnorm(tmp_path):
    text = INPUT + conv("c", "data") + bn("c/bn", "c")

    def five(model):
        layer = next(x for x in model.graph.layers if x.name == "c/bn")
        rng = np.random.default_rng(5)
        layer.blobs += [rng.uniform(0.5, 2, 8).astype(np.float32),
                        rng.normal(0, 1, 8).astype(np.float32)]
    model = build(tmp_path, text, tweak=five)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    merged = _merged(result)
    blobs = _blobs(model, "c/bn")
    ew, eb = expected_fold(_blobs(model, "c")[0], None,
                           {"bn": blobs, "scale": (blobs[3], blobs[4])}, 1e-5)
    np.testing.assert_allclose(_blobs(merged, "c")[0], ew, rtol=1e-6)
    np.testing.assert_allclose(_blobs(merged, "c")[1], eb, rtol=1e-6, atol=1e-6)


def test_not_in_place_chain_renames_the_top(tmp_path):
    text = (INPUT + conv("c", "data") + bn("c/bn", "c", top="c/bn") + scale("c/scale", "c/bn")
            + relu("r", "c/bn") + conv("d", "c/bn", bias=True))
    model = build(tmp_path, text)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    merged = _merged(result)
    c = next(layer for layer in merged.graph.layers if layer.name == "c")
    assert merged.graph.blob_names[c.tops[0]] == "c/bn"
    assert result.manifest["folds"][0]["top"] == "c/bn"
    run_both(tmp_path, model, result, ["r", "d"])


@pytest.mark.parametrize("case, reason", [
    ("shared", "also read by"),
    ("input", "net input"),
    ("eltwise", "Eltwise"),
    ("concat", "Concat"),
    ("slice", "Slice"),
    ("two_bottom_scale", "two bottoms"),
    ("batch_stats", "use_global_stats"),
])
def test_no_fold_where_results_would_change(tmp_path, case, reason):
    pre = INPUT + conv("a", "data", bias=True) + conv("b", "data", bias=True)
    body = {
        "shared": conv("c", "data") + bn("c/bn", "c", top="c/bn") + scale("c/scale", "c/bn")
                  + 'layer { name: "p" type: "Pooling" bottom: "c" top: "p" '
                    'pooling_param { pool: MAX kernel_size: 1 } }\n',
        "input": bn("in/bn", "data", top="in/bn") + scale("in/scale", "in/bn"),
        "eltwise": 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "e" }\n'
                   + bn("e/bn", "e") + scale("e/scale", "e"),
        "concat": 'layer { name: "e" type: "Concat" bottom: "a" bottom: "b" top: "e" }\n'
                  + bn("e/bn", "e") + scale("e/scale", "e"),
        "slice": 'layer { name: "e" type: "Slice" bottom: "a" top: "e" top: "f" '
                 'slice_param { slice_point: 4 } }\n'
                 + bn("e/bn", "e") + scale("e/scale", "e"),
        "two_bottom_scale": 'layer { name: "g" type: "Pooling" bottom: "b" top: "g" '
                            'pooling_param { pool: AVE global_pooling: true } }\n'
                            + scale("e/scale", "a", top="e", bias=False, bottoms=["g"]),
        "batch_stats": conv("c", "data") + bn("c/bn", "c", extra="use_global_stats: false")
                       + scale("c/scale", "c"),
    }[case]
    model = build(tmp_path, pre + body)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    assert result.plan.kept, "nothing was kept"
    assert any(reason in k.reason for k in result.plan.kept), [k.reason for k in result.plan.kept]
    kept = {n for k in result.plan.kept for n in k.layers}
    merged = _merged(result)
    for name in kept:         # kept layers keep their values bit for bit
        for x, y in zip(_blobs(model, name), _blobs(merged, name), strict=True):
            np.testing.assert_array_equal(x, y)
    assert fold.plan(merged.graph).folds == []
    if case != "batch_stats":      # OpenCV always uses the stored statistics
        outs = [layer.name for layer in model.graph.layers
                if layer.tops and layer.tops[0] in model.graph.outputs()]
        run_both(tmp_path, model, result, outs)


@pytest.mark.parametrize("group", [1, 2, 8])
def test_grouped_and_depthwise_convolution(tmp_path, group):
    text = (INPUT + conv("c", "data", extra=f" group: {group}") + bn("c/bn", "c")
            + scale("c/s", "c"))
    model = build(tmp_path, text)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    assert len(result.plan.folds) == 1
    run_both(tmp_path, model, result, ["c/s"])


@pytest.mark.parametrize("group, bias", [(1, True), (2, False), (4, True)])
def test_deconvolution_output_channels_are_axis_1(tmp_path, group, bias):
    b = "" if bias else " bias_term: false"
    text = INPUT + (f'layer {{ name: "d" type: "Deconvolution" bottom: "data" top: "d" '
                    f'convolution_param {{ num_output: 12 kernel_size: 4 stride: 2 pad: 1 '
                    f'group: {group}{b} }} }}\n') \
        + bn("d/bn", "d") + scale("d/s", "d")
    model = build(tmp_path, text)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    assert len(result.plan.folds) == 1
    merged = _merged(result)
    w = _blobs(model, "d")[0].astype(np.float64)          # [in][out/g][kh][kw]
    bnb, sc = _blobs(model, "d/bn"), _blobs(model, "d/s")
    s = np.float64(bnb[2][0])
    k = sc[0] / np.sqrt(bnb[1] / s + 1e-5)
    per = 12 // group
    expect = np.empty_like(w)
    for g in range(group):       # plain loop over groups: the reference, not the fast path
        rows = slice(g * w.shape[0] // group, (g + 1) * w.shape[0] // group)
        expect[rows] = w[rows] * k[g * per:(g + 1) * per][None, :, None, None]
    np.testing.assert_allclose(_blobs(merged, "d")[0], expect.astype(np.float32), rtol=1e-6)
    run_both(tmp_path, model, result, ["d/s"])


@pytest.mark.parametrize("bias, transpose", [(True, False), (False, False), (True, True)])
def test_inner_product(tmp_path, bias, transpose):
    extra = ("" if bias else " bias_term: false") + (" transpose: true" if transpose else "")
    text = INPUT + (f'layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                    f'inner_product_param {{ num_output: 6{extra} }} }}\n') + bn("fc/bn", "fc") \
        + scale("fc/s", "fc")
    model = build(tmp_path, text)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    merged = _merged(result)
    w = _blobs(model, "fc")[0].astype(np.float64)
    bnb, sc = _blobs(model, "fc/bn"), _blobs(model, "fc/s")
    k = sc[0] / np.sqrt(bnb[1] / np.float64(bnb[2][0]) + 1e-5)
    expect = w * (k[None, :] if transpose else k[:, None])
    np.testing.assert_allclose(_blobs(merged, "fc")[0], expect.astype(np.float32), rtol=1e-6)
    if not transpose:
        run_both(tmp_path, model, result, ["fc/s"])


def test_identity_batchnorm_leaves_weights_bit_equal(tmp_path):
    text = INPUT + conv("c", "data") + bn("c/bn", "c", eps=0)

    def identity(model):
        layer = next(x for x in model.graph.layers if x.name == "c/bn")
        layer.blobs[:3] = [np.zeros(8, np.float32), np.ones(8, np.float32), np.ones(1, np.float32)]
    model = build(tmp_path, text, tweak=identity)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    merged = _merged(result)
    np.testing.assert_array_equal(_blobs(merged, "c")[0].view(np.uint32),
                                  _blobs(model, "c")[0].view(np.uint32))
    np.testing.assert_array_equal(_blobs(merged, "c")[1], np.zeros(8, np.float32))


def test_merged_prototxt_keeps_everything_else_verbatim(tmp_path):
    text = ("# a comment the user wrote\r\n" + INPUT.replace("\n", "\r\n")
            + conv("c", "data").replace("\n", "\r\n")
            + bn("c/bn", "c").replace("\n", "\r\n") + scale("c/s", "c").replace("\n", "\r\n")
            + 'layer {\r\n  name: "up"  # fork layer\r\n  type: "Upsample"\r\n  bottom: "c"\r\n'
              '  top: "up"\r\n  upsample_param { scale: 2 }\r\n  some_fork_field: 3\r\n}')
    model = build(tmp_path, text)
    result = convert(model.prototxt, model.caffemodel, tmp_path / "out", metal=False)
    merged_text = (result.out / result.manifest["merged"]["prototxt"]).read_bytes().decode()
    assert merged_text.startswith("# a comment the user wrote\r\n")
    assert 'some_fork_field: 3\r\n}' in merged_text and merged_text.endswith("}")
    assert '"BatchNorm"' not in merged_text and '"Scale"' not in merged_text
    assert "bias_term: true" in merged_text and "bias_term: false" not in merged_text
    assert "\n" not in merged_text.replace("\r\n", "")       # line endings as written
    reread = read_prototxt(result.out / result.manifest["merged"]["prototxt"])
    assert [layer.type for layer in reread.graph.layers] == ["Convolution", "Upsample"]
    assert reread.graph.layers[1].unknown_fields == ["some_fork_field"]


def test_no_fold_into_weights_shared_with_another_layer(tmp_path):
    """Caffe gives both layers the blob of the shared param name: folding one BatchNorm
    into it would change the other layer's results."""
    shared = ' param { name: "w_shared" }'
    text = (INPUT + conv("a", "data").replace('top: "a"', 'top: "a"' + shared)
            + conv("b", "data").replace('top: "b"', 'top: "b"' + shared)
            + bn("a/bn", "a") + scale("a/s", "a"))
    model = build(tmp_path, text)
    plan = fold.plan(model.graph)
    assert plan.folds == []
    assert "shares its parameter 'w_shared'" in plan.kept[0].reason
