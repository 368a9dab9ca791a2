"""Fork layer types in verify: numpy forwards (layers/fork.py, activations.py) run inside
OpenCV where OpenCV lacks the type (verification/fork_layers.py); a type nobody can run
is cut out with what follows it, and the report lists the checks it skipped."""
from __future__ import annotations

import time

import numpy as np
import pytest

from caffe2metal import api
from caffe2metal.layers import registry
from caffe2metal.net.reader import read_prototxt
from caffe2metal.verification import fork_layers, verify
from conftest import SHARED_MODELS, with_weights, write_net

INPUT = 'input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'


def conv(name, bottom, n, k=3, pad=1):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {n} kernel_size: {k} pad: {pad} '
            f'bias_term: false }} }}\n'
            f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "{name}" top: "{name}" }}\n'
            f'layer {{ name: "{name}/scale" type: "Scale" bottom: "{name}" top: "{name}" '
            f'scale_param {{ bias_term: true }} }}\n'
            f'layer {{ name: "{name}/relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')


def fork(name, type_, bottoms, params=""):
    bs = " ".join(f'bottom: "{b}"' for b in bottoms)
    return f'layer {{ name: "{name}" type: "{type_}" {bs} top: "{name}" {params} }}\n'


NETS = {
    "upsample": INPUT + conv("c1", "data", 4) + fork("up", "Upsample", ["c1"],
                                                     "upsample_param { scale: 2 }")
    + conv("c2", "up", 5),
    "interp": INPUT + conv("c1", "data", 4) + fork("ip", "Interp", ["c1"],
                                                   "interp_param { zoom_factor: 2 }")
    + conv("c2", "ip", 5),
    # OpenCV's Interp ignores shrink_factor / pad_beg / pad_end: ours runs instead
    "interp_crop": INPUT + conv("c1", "data", 4)
    + fork("ip", "Interp", ["c1"], "interp_param { zoom_factor: 3 shrink_factor: 2 "
           "pad_beg: -1 pad_end: -1 }") + conv("c2", "ip", 5),
    "shuffle": INPUT + conv("c1", "data", 6) + fork("sh", "ShuffleChannel", ["c1"],
                                                    "shuffle_channel_param { group: 3 }")
    + conv("c2", "sh", 5),
    "axpy": INPUT + conv("c1", "data", 4) + conv("c2", "c1", 4)
    + 'layer { name: "gap" type: "Pooling" bottom: "c2" top: "gap" '
      'pooling_param { pool: AVE global_pooling: true } }\n'
    + 'layer { name: "sig" type: "Sigmoid" bottom: "gap" top: "gap" }\n'
    + fork("ax", "Axpy", ["gap", "c2", "c1"]) + conv("c3", "ax", 5),
    "clip": INPUT + conv("c1", "data", 4) + fork("cl", "Clip", ["c1"],
                                                 "clip_param { min: 0.1 max: 0.5 }")
    + conv("c2", "cl", 5),
    # Crop: OpenCV's own layer is the reference of the plan run's numpy forward; Tile: OpenCV
    # 4.14's is ONNX's (cannot read tile_param): ours runs in it (see test_tile below)
    "crop": INPUT + conv("c1", "data", 4) + conv("c2", "c1", 4, k=3, pad=0)
    + fork("cr", "Crop", ["c1", "c2"], "crop_param { axis: 2 offset: 2 offset: 1 }")
    + conv("c3", "cr", 5),
    "tile": INPUT + conv("c1", "data", 4) + fork("ti", "Tile", ["c1"],
                                                 "tile_param { axis: 2 tiles: 3 }")
    + conv("c2", "ti", 5),
}


def _convert_verify(tmp_path, text):
    proto = write_net(tmp_path, text)
    model, weights = with_weights(proto, calibrate=False)
    out = tmp_path / "out"
    api.convert(proto, weights, out)
    return verify(proto, weights, out), model


@pytest.mark.parametrize("name", sorted(NETS))
def test_fork_layer_nets_verify_every_metal_layer(tmp_path, name):
    report, model = _convert_verify(tmp_path, NETS[name])
    assert report.ok, [(r.name, r.rel, r.note) for r in report.failures]
    convs = [layer.name for layer in model.graph.layers if layer.type == "Convolution"]
    assert [r.name for r in report.layers] == convs
    assert all(r.counted and r.ok and not r.note for r in report.layers + report.outputs)
    assert report.outputs
    # the plan run from OUT: what run cannot execute yet is a skipped row, never a failure
    assert all(s[0].startswith("plan: ") and "run cannot execute op" in s[1]
               for s in report.skipped)
    assert all(r.ok if r.counted else r.note.startswith("skipped: ") for r in report.plan)
    if name in ("crop", "tile"):        # run executes them: every plan row is checked
        assert not report.skipped and report.plan and all(r.counted for r in report.plan)


def test_opencv_types_are_found_by_trying():
    assert not fork_layers.opencv_has("Upsample")
    assert fork_layers.opencv_has("ReLU6") and fork_layers.opencv_has("ShuffleChannel")
    assert not fork_layers.opencv_has("NoSuchTypeAnywhere")


def test_native_types_are_not_registered_over(tmp_path):
    text = (INPUT + conv("c1", "data", 6) + fork("r6", "ReLU6", ["c1"])
            + fork("sh", "ShuffleChannel", ["r6"], "shuffle_channel_param { group: 3 }")
            + fork("ip", "Interp", ["sh"], "interp_param { zoom_factor: 2 }"))
    plan = fork_layers.plan(read_prototxt(write_net(tmp_path, text)).graph)
    assert plan.rename == {} and plan.cut == {}


def _layer(tmp_path, type_, params="", bottoms=1, shape=(1, 1, 1, 1)):
    names = [f"b{i}" for i in range(bottoms)]
    dims = " ".join(f"input_dim: {d}" for d in shape)
    text = "".join(f'input: "{b}" {dims}\n' for b in names) + fork("l", type_, names, params)
    return read_prototxt(write_net(tmp_path, text)).graph.layers[-1]


RNG = np.random.default_rng(7)
TOL = {"rtol": 1e-6, "atol": 1e-6}   # float32 inputs, the same values moved or mixed


def test_upsample_nearest(tmp_path):
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    y = registry.forward("Upsample")(_layer(tmp_path, "Upsample", "upsample_param { scale: 2 }"),
                                     [x])[0]
    want = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)
    np.testing.assert_allclose(y, want, **TOL)
    y = registry.forward("Upsample")(_layer(tmp_path, "Upsample", "upsample_param { scale: 2 "
                                            "pad_out_h: true }"), [x])[0]
    np.testing.assert_allclose(y, want[:, :, :-1], **TOL)


def test_upsample_with_mask_unpools(tmp_path):
    x = RNG.standard_normal((1, 2, 2, 2)).astype(np.float32)
    mask = np.array([[[[0, 3], [10, 15]], [[5, 6], [8, 13]]]], np.float32)
    y = registry.forward("Upsample")(_layer(tmp_path, "Upsample", "upsample_param { scale: 2 }",
                                            2), [x, mask])[0]
    want = np.zeros((1, 2, 16), np.float32)
    for c in range(2):
        for i, m in enumerate(mask[0, c].ravel().astype(int)):
            want[0, c, m] = x[0, c].ravel()[i]
    np.testing.assert_allclose(y, want.reshape(1, 2, 4, 4), **TOL)


def _argmax_loops(x, top_k, out_max_val, axis):
    """argmax_layer.cpp Forward_cpu written out: (value, index) pairs sorted with
    std::greater (Python's tuple order reversed: a tie goes to the larger index)."""
    if axis is None:
        flat = x.reshape(x.shape[0], -1)
        y = np.zeros((x.shape[0], 2 if out_max_val else 1, top_k), np.float32)
        for n in range(x.shape[0]):
            best = sorted(((v, j) for j, v in enumerate(flat[n])), reverse=True)[:top_k]
            y[n, 0] = [j for _, j in best]
            if out_max_val:
                y[n, 1] = [v for v, _ in best]
        return y
    shape = list(x.shape)
    shape[axis] = top_k
    y = np.zeros(shape, np.float32)
    for pos in np.ndindex(*[d for i, d in enumerate(x.shape) if i != axis]):
        at = list(pos)
        line = [x[tuple(at[:axis] + [j] + at[axis:])] for j in range(x.shape[axis])]
        best = sorted(((v, j) for j, v in enumerate(line)), reverse=True)[:top_k]
        for k, (v, j) in enumerate(best):
            y[tuple(at[:axis] + [k] + at[axis:])] = v if out_max_val else j
    return y


@pytest.mark.parametrize("params", ["", "top_k: 3", "top_k: 4 out_max_val: true", "axis: 1",
                                    "axis: 1 top_k: 2 out_max_val: true", "axis: 3 top_k: 2",
                                    "axis: -2 out_max_val: true"])
def test_argmax_as_caffe_computes_it(tmp_path, params):
    """OpenCV has no ArgMax: the reference is Caffe's loop, with ties (rounded values)."""
    x = np.round(RNG.standard_normal((2, 5, 3, 4)), 1).astype(np.float32)
    layer = _layer(tmp_path, "ArgMax", f"argmax_param {{ {params} }}", shape=x.shape)
    p = layer.params.get("argmax_param", {})
    axis = None if "axis" in p else None
    if "axis" in p:
        axis = p["axis"] % 4
    y = registry.forward("ArgMax")(layer, [x])[0]
    want = _argmax_loops(x, p.get("top_k", 1), p.get("out_max_val", False), axis)
    np.testing.assert_array_equal(y, want)
    shape = registry.get("ArgMax").shape(layer, [x.shape])[0][0]
    assert tuple(y.shape) == tuple(shape)


def test_tile_as_caffe_computes_it(tmp_path):
    x = RNG.standard_normal((2, 3, 2, 4)).astype(np.float32)
    for axis, tiles in ((1, 2), (2, 3), (0, 2), (3, 1)):
        layer = _layer(tmp_path, "Tile", f"tile_param {{ axis: {axis} tiles: {tiles} }}",
                       shape=x.shape)
        y = registry.forward("Tile")(layer, [x])[0]
        # tile_layer.cpp: for each of the outer positions, the inner block copied `tiles` times
        outer, inner = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))
        blocks = x.reshape(outer, inner)
        want = np.concatenate([blocks] * tiles, axis=1)
        shape = list(x.shape)
        shape[axis] *= tiles
        np.testing.assert_array_equal(y, want.reshape(shape))


def test_argmax_and_tile_refuse_what_caffe_refuses(tmp_path):
    from caffe2metal.errors import Caffe2MetalError
    text = (INPUT + fork("am", "ArgMax", ["data"], "argmax_param { axis: 1 top_k: 4 }"))
    with pytest.raises(Caffe2MetalError, match=r"argmax_param.top_k: 4 is not in 1..3"):
        read_prototxt(write_net(tmp_path, text))
    text = INPUT + fork("ti", "Tile", ["data"], "tile_param { axis: 1 }")
    with pytest.raises(Caffe2MetalError, match=r"tile_param.tiles: None must be set"):
        read_prototxt(write_net(tmp_path, text))


def _bilinear_aligned(src, oh, ow):
    """Bilinear, corners aligned, one output pixel at a time (float64)."""
    h, w = src.shape[-2:]
    out = np.zeros(src.shape[:-2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            fy = i * (h - 1) / (oh - 1) if oh > 1 else 0.0
            fx = j * (w - 1) / (ow - 1) if ow > 1 else 0.0
            y0, x0 = int(fy), int(fx)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            a, b = fy - y0, fx - x0
            out[..., i, j] = ((1 - a) * ((1 - b) * src[..., y0, x0] + b * src[..., y0, x1])
                              + a * ((1 - b) * src[..., y1, x0] + b * src[..., y1, x1]))
    return out


@pytest.mark.parametrize("params,crop,size", [
    ("zoom_factor: 2", 0, (9, 13)),
    ("shrink_factor: 2", 0, (3, 4)),
    ("height: 11 width: 4", 0, (11, 4)),
    ("zoom_factor: 3 shrink_factor: 2", 0, (7, 10)),
    ("zoom_factor: 2 pad_beg: -1 pad_end: -1", 1, (5, 9)),
])
def test_interp(tmp_path, params, crop, size):
    x = RNG.standard_normal((2, 3, 5, 7)).astype(np.float32)
    layer = _layer(tmp_path, "Interp", f"interp_param {{ {params} }}", shape=x.shape)
    y = registry.forward("Interp")(layer, [x])[0]
    assert y.shape == (2, 3) + size
    assert registry.get("Interp").shape(layer, [x.shape])[0] == [y.shape]
    src = x[:, :, crop:5 - crop, crop:7 - crop].astype(np.float64)
    # 1e-5: Caffe's ratio (eff - 1) / (out - 1) is a float32
    np.testing.assert_allclose(y, _bilinear_aligned(src, *size), rtol=1e-5, atol=1e-5)


def test_shuffle_channel(tmp_path):
    x = RNG.standard_normal((2, 6, 3, 3)).astype(np.float32)
    y = registry.forward("ShuffleChannel")(
        _layer(tmp_path, "ShuffleChannel", "shuffle_channel_param { group: 3 }"), [x])[0]
    g, per = 3, 2
    for i in range(g):
        for j in range(per):
            np.testing.assert_allclose(y[:, j * g + i], x[:, i * per + j], **TOL)


def test_axpy_relu6_clip_threshold(tmp_path):
    a = RNG.standard_normal((2, 3, 1, 1)).astype(np.float32)
    x, y = (RNG.standard_normal((2, 3, 4, 4)).astype(np.float32) * 5 for _ in range(2))
    got = registry.forward("Axpy")(_layer(tmp_path, "Axpy", bottoms=3), [a, x, y])[0]
    want = np.einsum("nc,nchw->nchw", a[:, :, 0, 0], x) + y
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(
        registry.forward("ReLU6")(_layer(tmp_path, "ReLU6"), [x])[0],
        np.where(x < 0, 0, np.where(x > 6, 6, x)))
    np.testing.assert_array_equal(
        registry.forward("Clip")(_layer(tmp_path, "Clip", "clip_param { min: -1 max: 2 }"),
                                 [x])[0], np.where(x < -1, -1, np.where(x > 2, 2, x)))
    np.testing.assert_array_equal(
        registry.forward("Threshold")(_layer(tmp_path, "Threshold",
                                             "threshold_param { threshold: 0.5 }"), [x])[0],
        (x > 0.5).astype(np.float32))


def test_a_type_nobody_can_run_verifies_what_comes_before_and_lists_the_rest(tmp_path):
    # Bias: OpenCV's Caffe importer lacks it and it has no numpy forward; a type nobody
    # registered has unknown shapes (no weights can follow it), so it ends a branch here
    text = (INPUT + conv("c1", "data", 4) + conv("c2", "c1", 4)
            + 'layer { name: "b" type: "Bias" bottom: "c2" top: "b" }\n'
            + conv("c3", "b", 5)
            + conv("c4", "c1", 3)              # a branch that does not need Bias
            + fork("mystery", "NoSuchForkLayer", ["c4"]))
    proto = write_net(tmp_path, text)
    # calibrate cannot run this net either (OpenCV lacks Bias)
    model, weights = with_weights(proto, calibrate=False)
    out = tmp_path / "out"
    api.convert(proto, weights, out)
    report = verify(proto, weights, out)
    rows = {r.name: r for r in report.layers}
    assert set(rows) == {"c1", "c2", "c3", "c4"}
    assert all(rows[n].ok and rows[n].counted for n in ("c1", "c2", "c4"))
    assert not rows["c3"].counted and rows["c3"].note.startswith("skipped: ")
    assert "layer 'b' of type 'Bias'" in rows["c3"].note
    assert report.ok                      # what could be checked passed
    skipped = dict(report.skipped)
    assert set(skipped) == {"c3", "mystery"}   # the layer check, the net outputs after them
    assert "NoSuchForkLayer" in skipped["mystery"]
    # end to end: the inputs of the layers that cannot run stand in for the outputs after them
    assert {r.name for r in report.outputs if r.counted} == {"c2", "c4"}
    assert all(r.ok for r in report.outputs if r.counted)
    from caffe2metal.verification import render
    assert "3 skipped" in render(report)     # c3: its layer row and its net output


YOLO = SHARED_MODELS / "yolov3" / "deploy.prototxt"


@pytest.mark.slow     # ~35 s: 62M weights at 416x416, recomputed layer by layer
@pytest.mark.skipif(not YOLO.is_file(), reason=f"{YOLO} not present")
def test_yolov3_verifies_every_metal_layer(tmp_path):
    proto = tmp_path / "yolov3.prototxt"
    proto.write_text(YOLO.read_text())
    model, weights = with_weights(proto, calibrate=False)
    out = tmp_path / "out"
    t = time.perf_counter()
    api.convert(proto, weights, out)
    report = verify(proto, weights, out)
    assert report.ok, [(r.name, r.rel, r.note) for r in report.failures]
    convs = [layer.name for layer in model.graph.layers if layer.type == "Convolution"]
    assert len(convs) == 75 and [r.name for r in report.layers] == convs
    assert all(r.counted for r in report.layers + report.outputs)
    assert all(s[0].startswith("plan: ") for s in report.skipped)   # run lacks Upsample yet
    assert len(report.outputs) == 3
    assert time.perf_counter() - t < 300
