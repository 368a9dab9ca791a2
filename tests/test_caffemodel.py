"""caffe2metal.caffemodel: wire-format caffemodel reader/writer.

Cross-checked against the protobuf classes compiled from caffe.proto and
against OpenCV's Caffe importer.  Hand-encoded messages use the small encoder
below, independent of the module under test.
"""
from __future__ import annotations

import gc
import io
import signal
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffe2metal.caffe.caffemodel import (
    V1_LAYER_TYPES,
    CaffeModel,
    ModelLayer,
    parse_caffemodel,
    read_caffemodel,
    write_caffemodel,
)
from caffe2metal.caffe.proto import caffe_pb2
from caffe2metal.errors import Caffe2MetalError, ExportError, ModelFormatError

# --------------------------------------------------------------------------
# independent protobuf encoder for hand-made messages

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(number: int, wt: int) -> bytes:
    return varint((number << 3) | wt)


def ld(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def vi(number: int, value: int) -> bytes:
    return key(number, 0) + varint(value)


def packed_f32(values) -> bytes:
    return np.asarray(values, "<f4").tobytes()


def unpacked_f32(number: int, values) -> bytes:
    return b"".join(key(number, 5) + np.float32(v).astype("<f4").tobytes()
                    for v in values)


def unpacked_f64(number: int, values) -> bytes:
    return b"".join(key(number, 1) + np.float64(v).astype("<f8").tobytes()
                    for v in values)


def blob_msg(shape, values) -> bytes:
    dims = b"".join(varint(d) for d in shape)
    return ld(5, packed_f32(values)) + ld(7, ld(1, dims))


def layer_msg(name: str, type_: str, blobs=()) -> bytes:
    return ld(1, name.encode()) + ld(2, type_.encode()) + b"".join(ld(7, b) for b in blobs)


def net_msg(*layers: bytes, name: str = "") -> bytes:
    return (ld(1, name.encode()) if name else b"") + b"".join(ld(100, layer) for layer in layers)


def bits(a: np.ndarray) -> np.ndarray:
    """Bit pattern of a float array (NaN payloads and -0.0 included)."""
    a = np.asarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def random_f32(rng, shape) -> np.ndarray:
    """float32 values with arbitrary bit patterns (NaNs, infs, denormals, -0)."""
    return rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32).view("<f4")


def sample_layers(seed=0) -> list[ModelLayer]:
    rng = np.random.default_rng(seed)
    return [
        ModelLayer("data", "Input", []),
        ModelLayer("conv1", "Convolution",
                   [random_f32(rng, (8, 3, 3, 3)), random_f32(rng, (8,))]),
        ModelLayer("bn1", "BatchNorm",
                   [rng.standard_normal(8).astype("f4"), rng.random(8).astype("f4"),
                    np.array([0.999], "f4")]),
        ModelLayer("relu1", "ReLU", []),
        ModelLayer("fc", "InnerProduct",
                   [rng.standard_normal((10, 72)).astype("f4"), np.zeros(10, "f4")]),
        ModelLayer("scalar", "Scale", [np.array(2.5, "f4")]),        # 0-d blob
        ModelLayer("empty", "Dummy", [np.zeros((0, 4), "f4")]),       # zero elements
        ModelLayer("naïve-ünïcode", "Power", [np.ones((1, 1, 1, 1), "f4")]),
    ]


def to_pb(layers, net_name="") -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    if net_name:
        net.name = net_name
    for layer in layers:
        lp = net.layer.add()
        lp.name = layer.name
        lp.type = layer.type
        for blob in layer.blobs:
            bp = lp.blobs.add()
            bp.shape.dim.extend(np.shape(blob))
            bp.shape.SetInParent()
            raw = np.asarray(blob, "<f4").tobytes()
            if raw:     # via the wire, so protobuf keeps every bit (NaN payloads)
                bp.MergeFromString(ld(5, raw))
    return net


@contextmanager
def time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise TimeoutError(f"parser did not finish within {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def model_bytes(layers, net_name="") -> bytes:
    buf = io.BytesIO()
    write_caffemodel(buf, layers, net_name)
    return buf.getvalue()


def assert_layers_equal(got, want):
    assert [(layer.name, layer.type, len(layer.blobs)) for layer in got] == \
           [(layer.name, layer.type, len(layer.blobs)) for layer in want]
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g.blobs, w.blobs, strict=True):
            b = np.asarray(b, "f4")
            assert a.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_array_equal(bits(a), bits(b))


# --------------------------------------------------------------------------
# round trips and protobuf cross-checks

def test_round_trip_file_bit_exact(tmp_path):
    layers = sample_layers()
    path = tmp_path / "m.caffemodel"
    n = write_caffemodel(path, layers, net_name="sample")
    assert n == path.stat().st_size
    model = read_caffemodel(path)
    assert isinstance(model, CaffeModel) and model.net_name == "sample"
    assert model.path == str(path)
    assert_layers_equal(model, layers)
    conv_w = model[1].blobs[0]
    assert not conv_w.flags.writeable          # read-only view of the mapping
    assert not conv_w.flags.owndata
    # no temporary files left behind
    assert [p.name for p in tmp_path.iterdir()] == ["m.caffemodel"]


def test_writer_bytes_equal_protobuf_serialization():
    layers = sample_layers(1)
    ours = model_bytes(layers, "sample")
    assert ours == to_pb(layers, "sample").SerializeToString()
    # and protobuf parses our output to the same content
    net = caffe_pb2.NetParameter.FromString(ours)
    assert net.name == "sample"
    assert [lp.name for lp in net.layer] == [layer.name for layer in layers]
    for lp, layer in zip(net.layer, layers, strict=True):
        assert lp.type == layer.type
        for bp, blob in zip(lp.blobs, layer.blobs, strict=True):
            assert tuple(bp.shape.dim) == np.shape(blob)
            got = np.array(bp.data, "f4")          # NaN == NaN here
            np.testing.assert_array_equal(got, np.asarray(blob, "f4").ravel())


def test_writer_casts_float64_once_and_accepts_duck_typed_layers():
    class Duck:
        def __init__(self, name, type_, blobs):
            self.name, self.type, self.blobs = name, type_, blobs

    w64 = np.random.default_rng(2).standard_normal((3, 2, 1, 1))
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    data = model_bytes(layer for layer in [Duck("c", "Convolution", [w64, big_endian])])
    got = parse_caffemodel(data)[0].blobs
    assert got[0].dtype == np.float32
    np.testing.assert_array_equal(got[0], w64.astype(np.float32))
    np.testing.assert_array_equal(got[1], np.arange(6, dtype="f4").reshape(2, 3))


def test_read_protobuf_modern_net_with_legacy_and_double_blobs():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 2, 2)).astype("f4")
    b = rng.standard_normal(4).astype("f4")
    d = rng.standard_normal((2, 5))
    legacy = rng.standard_normal(6).astype("f4")

    net = caffe_pb2.NetParameter(name="modern")
    net.input.append("data")                  # fields we must skip
    net.input_dim.extend([1, 3, 8, 8])
    lp = net.layer.add(name="conv", type="Convolution", bottom=["data"], top=["conv"])
    lp.convolution_param.num_output = 4
    lp.convolution_param.kernel_size.append(2)
    lp.param.add(lr_mult=1.0)
    bp = lp.blobs.add()
    bp.shape.dim.extend(w.shape)
    bp.data.extend(w.ravel().tolist())
    bp.diff.extend([7.0] * w.size)              # diff is skipped
    bp = lp.blobs.add()
    bp.shape.dim.extend(b.shape)
    bp.data.extend(b.tolist())
    lp = net.layer.add(name="dbl", type="Scale")
    bp = lp.blobs.add()
    bp.shape.dim.extend(d.shape)
    bp.double_data.extend(d.ravel().tolist())
    bp.double_diff.extend([1.0] * d.size)
    lp = net.layer.add(name="legacy", type="InnerProduct")
    bp = lp.blobs.add(num=1, channels=1, height=2, width=3)
    bp.data.extend(legacy.tolist())
    # Caffe's Blob::FromProto: legacy 4-D fields win over `shape` when present
    bp = lp.blobs.add(num=1, channels=1, height=2, width=3)
    bp.shape.dim.append(6)
    bp.data.extend(legacy.tolist())
    net.layer.add(name="relu", type="ReLU")

    model = parse_caffemodel(net.SerializeToString(), file="modern.caffemodel")
    assert model.net_name == "modern"
    assert [(layer.name, layer.type, len(layer.blobs)) for layer in model] == [
        ("conv", "Convolution", 2), ("dbl", "Scale", 1),
        ("legacy", "InnerProduct", 2), ("relu", "ReLU", 0)]
    np.testing.assert_array_equal(model[0].blobs[0], w)
    np.testing.assert_array_equal(model[0].blobs[1], b)
    dbl = model[1].blobs[0]
    assert dbl.dtype == np.float64 and dbl.shape == (2, 5)
    np.testing.assert_array_equal(dbl, d)
    for blob in model[2].blobs:
        assert blob.shape == (1, 1, 2, 3)
        np.testing.assert_array_equal(blob.ravel(), legacy)


# Expected modern names keyed by the V1 enum *name*, so that the enum numbers
# are checked against the compiled caffe.proto, not against our own table.
V1_NAME_TO_MODERN = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax",
    "BNLL": "BNLL", "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution", "DATA": "Data", "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split",
    "SLICE": "Slice", "TANH": "TanH", "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}


def test_v1_type_table_matches_compiled_caffe_proto():
    enum = caffe_pb2.V1LayerParameter.LayerType
    assert {name for name, _ in enum.items()} == set(V1_NAME_TO_MODERN)
    assert {number: V1_NAME_TO_MODERN[name] for name, number in enum.items()} == V1_LAYER_TYPES
    assert V1_LAYER_TYPES[4] == "Convolution" and V1_LAYER_TYPES[39] == "Deconvolution"


def test_read_protobuf_v1_net():
    rng = np.random.default_rng(4)
    net = caffe_pb2.NetParameter(name="v1net")
    expected = []
    for name, number in caffe_pb2.V1LayerParameter.LayerType.items():
        lp = net.layers.add(name=f"l_{name.lower()}", type=number)
        lp.bottom.append("x")
        lp.blobs_lr.extend([1.0, 2.0])
        blobs = []
        if number in (4, 14):       # legacy 4-D blobs, as V1 models store them
            w = rng.standard_normal((2, 3, 1, 1)).astype("f4")
            bias = rng.standard_normal(2).astype("f4")
            lp.blobs.add(num=2, channels=3, height=1, width=1).data.extend(w.ravel().tolist())
            lp.blobs.add(num=1, channels=1, height=1, width=2).data.extend(bias.tolist())
            blobs = [w, bias.reshape(1, 1, 1, 2)]
        expected.append(ModelLayer(f"l_{name.lower()}", V1_NAME_TO_MODERN[name], blobs))
    model = parse_caffemodel(net.SerializeToString())
    assert model.net_name == "v1net"
    assert_layers_equal(model, expected)


def test_non_packed_and_chunked_data_match_protobuf():
    rng = np.random.default_rng(5)
    v = rng.standard_normal(12).astype("f4")
    d = rng.standard_normal(3)
    # dims non-packed; data split: 6 non-packed, 2 packed, 4 non-packed;
    # the shape message comes in the middle and a diff run is interleaved
    blob = (unpacked_f32(5, v[:6])
            + ld(7, vi(1, 3) + vi(1, 4))
            + unpacked_f32(6, np.ones(5))
            + ld(5, packed_f32(v[6:8]))
            + unpacked_f32(5, v[8:]))
    dblob = ld(7, ld(1, varint(3))) + unpacked_f64(8, d) + unpacked_f64(9, d)
    # a V1 layer whose name comes after its blobs
    v1 = ld(6, blob) + vi(5, 14) + ld(4, b"late_name")
    data = ld(1, b"mixed") + ld(2, v1) + ld(2, ld(4, b"dbl") + ld(6, dblob))

    pb = caffe_pb2.NetParameter.FromString(data)
    assert list(pb.layers[0].blobs[0].shape.dim) == [3, 4]
    pb_values = np.array(pb.layers[0].blobs[0].data, "f4")
    np.testing.assert_array_equal(pb_values, v)

    model = parse_caffemodel(data)
    assert [(layer.name, layer.type) for layer in model] == [("late_name", "InnerProduct"),
                                                              ("dbl", "")]
    got = model[0].blobs[0]
    assert got.shape == (3, 4) and got.flags.c_contiguous
    np.testing.assert_array_equal(got.ravel(), pb_values)
    got = model[1].blobs[0]
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, np.array(pb.layers[1].blobs[0].double_data))


def test_repeated_shape_messages_merge_like_protobuf():
    v = np.arange(6, dtype="f4")
    blob = ld(7, ld(1, varint(2))) + ld(5, packed_f32(v)) + ld(7, vi(1, 3))
    data = net_msg(layer_msg("m", "Scale", [blob]))
    assert list(caffe_pb2.NetParameter.FromString(data).layer[0].blobs[0].shape.dim) == [2, 3]
    np.testing.assert_array_equal(parse_caffemodel(data)[0].blobs[0], v.reshape(2, 3))


def test_non_canonical_tag_encoding_of_a_float():
    # field 5 / wire type 5 written as a 2-byte varint tag (0xAD 0x00)
    values = [1.5, -2.0]
    blob = ld(7, ld(1, varint(2))) + b"".join(
        b"\xad\x00" + np.float32(x).tobytes() for x in values)
    model = parse_caffemodel(net_msg(layer_msg("x", "Scale", [blob])))
    np.testing.assert_array_equal(model[0].blobs[0], np.array(values, "f4"))


@settings(max_examples=100, deadline=None)
@given(st.lists(
    st.tuples(st.text(max_size=8),
              st.lists(st.lists(st.integers(0, 3), max_size=4), max_size=3)),
    min_size=1, max_size=4),
    st.integers(0, 2**32 - 1))
def test_round_trip_property(spec, seed):
    rng = np.random.default_rng(seed)
    layers = [ModelLayer(name, "T", [random_f32(rng, tuple(shape)) for shape in shapes])
              for name, shapes in spec]
    data = model_bytes(layers)
    assert data == to_pb(layers).SerializeToString()
    assert_layers_equal(parse_caffemodel(data), layers)


# --------------------------------------------------------------------------
# lifetime, duplicates, overwrite-in-place

def test_arrays_outlive_the_model_and_an_overwrite_of_the_file(tmp_path):
    path = tmp_path / "m.caffemodel"
    layers = sample_layers(6)
    write_caffemodel(path, layers)
    model = read_caffemodel(path)
    w = model[4].blobs[0]
    del model
    gc.collect()
    # rewrite the same path while `w` still maps the old file
    write_caffemodel(path, [ModelLayer("other", "ReLU", [np.zeros(3, "f4")])])
    np.testing.assert_array_equal(w, layers[4].blobs[0])
    assert [layer.name for layer in read_caffemodel(path)] == ["other"]


def test_duplicate_layer_names_last_wins_like_caffe():
    a1 = ModelLayer("a", "Convolution", [np.ones(2, "f4")])
    b = ModelLayer("b", "ReLU", [])
    a2 = ModelLayer("a", "Convolution", [np.full(2, 7, "f4")])
    model = parse_caffemodel(model_bytes([a1, b, a2]))
    assert [layer.name for layer in model] == ["a", "b", "a"]
    assert model.duplicate_names() == ["a"]
    np.testing.assert_array_equal(model.by_name()["a"].blobs[0], [7, 7])


# --------------------------------------------------------------------------
# interop: OpenCV's Caffe importer loads what we write

PROTOTXT = """\
name: "oneconv"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 7 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 1 } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
        inner_product_param { num_output: 5 } }
"""


def numpy_conv(x, w, b, pad):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = np.zeros((n, o, oh, ow), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + oh, j:j + ow]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def test_opencv_loads_our_caffemodel(tmp_path):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 3, 3, 3)).astype("f4")
    b = rng.standard_normal(4).astype("f4")
    wf = rng.standard_normal((5, 4 * 7 * 6)).astype("f4")
    bf = rng.standard_normal(5).astype("f4")
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(PROTOTXT)
    model = tmp_path / "w.caffemodel"
    write_caffemodel(model, [ModelLayer("conv1", "Convolution", [w, b]),
                             ModelLayer("ip1", "InnerProduct", [wf, bf])], "oneconv")
    net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    x = rng.standard_normal((1, 3, 7, 6)).astype("f4")
    net.setInput(x)
    conv_out, ip_out = net.forward(["conv1", "ip1"])
    want_conv = numpy_conv(x.astype(np.float64), w.astype(np.float64), b, 1)
    np.testing.assert_allclose(conv_out, want_conv, rtol=1e-4, atol=1e-4)
    want_ip = want_conv.reshape(1, -1) @ wf.T.astype(np.float64) + bf
    np.testing.assert_allclose(ip_out, want_ip, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------
# errors

def read_error(tmp_path, data: bytes, name="bad.caffemodel") -> ModelFormatError:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ModelFormatError) as info:
        read_caffemodel(path)
    assert str(path) in str(info.value)
    assert info.value.file == str(path)
    return info.value


def test_empty_file(tmp_path):
    err = read_error(tmp_path, b"")
    assert "empty" in err.message


def test_missing_file_is_a_caffe2metal_error(tmp_path):
    with pytest.raises(Caffe2MetalError, match="cannot read caffemodel"):
        read_caffemodel(tmp_path / "nope.caffemodel")


def test_truncated_at_several_offsets(tmp_path):
    layers = [ModelLayer("conv1", "Convolution",
                         [np.arange(24, dtype="f4").reshape(2, 3, 2, 2), np.ones(2, "f4")]),
              ModelLayer("relu1", "ReLU", [])]
    data = model_bytes(layers, "net")
    name_end = len(ld(1, b"net"))                       # 5
    first_layer_end = len(data) - len(ld(100, layer_msg("relu1", "ReLU")))
    # never exactly at a top-level boundary (that is a valid, shorter model)
    offsets = [1, 2, 4, name_end + 1, name_end + 2, name_end + 10, 60,
               first_layer_end - 1, first_layer_end + 1, len(data) - 1]
    assert len(set(offsets)) == len(offsets) and first_layer_end > 60
    for cut in offsets:
        err = read_error(tmp_path, data[:cut], name=f"cut{cut}.caffemodel")
        assert "truncated" in err.message, (cut, str(err))


def test_length_prefix_past_end_of_enclosing_message(tmp_path):
    blob = blob_msg([2], [1.0, 2.0])
    layer = ld(1, b"conv1") + ld(2, b"Convolution") + key(7, 2) + varint(len(blob) + 50) + blob
    # the blob claims 50 bytes more than its layer holds; the file has more
    data = net_msg(layer, layer_msg("pad", "ReLU") + ld(99, b"\x00" * 80))
    assert len(data) > len(net_msg(layer)) + 50
    err = read_error(tmp_path, data)
    assert "past the end of its enclosing LayerParameter" in err.message
    assert err.layer == "conv1" and "layer 'conv1'" in str(err)


def test_twelve_byte_varint(tmp_path):
    err = read_error(tmp_path, b"\x80" * 11 + b"\x01" + net_msg(layer_msg("a", "ReLU")))
    assert "varint longer than 10 bytes" in err.message
    # 11 bytes is one too many as well; 10 bytes (any negative int64) is fine
    dims11 = ld(7, ld(1, b"\x81" + b"\x80" * 9 + b"\x00"))
    err = read_error(tmp_path, net_msg(layer_msg("c", "Scale", [dims11])))
    assert "varint longer than 10 bytes" in err.message and (err.layer, err.blob) == ("c", 0)
    dims10 = ld(7, ld(1, b"\x81" + b"\x80" * 8 + b"\x00"))
    model = parse_caffemodel(net_msg(layer_msg("c", "Scale", [dims10 + ld(5, packed_f32([3]))])))
    assert model[0].blobs[0].shape == (1,)
    # also inside a blob's shape: names the layer and blob
    shape = ld(7, ld(1, varint(2) + b"\xff" * 11 + b"\x01"))
    err = read_error(tmp_path, net_msg(layer_msg("conv1", "Convolution",
                                                 [blob_msg([1], [1.0]), shape])))
    assert "varint longer than 10 bytes" in err.message
    assert (err.layer, err.blob) == ("conv1", 1)


def test_huge_declared_shape_with_little_data(tmp_path):
    blob = blob_msg([10**6, 10**6], [1.0, 2.0, 3.0, 4.0])
    err = read_error(tmp_path, net_msg(layer_msg("fc6", "InnerProduct", [blob])))
    assert "1000000000000 elements" in err.message and "holds 4 float values" in err.message
    assert (err.layer, err.blob) == ("fc6", 0)
    assert "layer 'fc6'" in str(err) and "blob 0" in str(err)


def test_count_mismatch(tmp_path):
    good = blob_msg([3], [1, 2, 3])
    bad = blob_msg([2, 3], [1, 2, 3, 4, 5])
    err = read_error(tmp_path, net_msg(layer_msg("conv1", "Convolution", [good, bad])))
    assert "(2, 3) declares 6 elements" in err.message and "holds 5" in err.message
    assert (err.layer, err.blob) == ("conv1", 1)
    # no shape and no legacy fields: Caffe's empty shape, i.e. a scalar (1 element)
    err = read_error(tmp_path, net_msg(layer_msg("b", "Bias", [ld(5, packed_f32([1, 2]))])))
    assert "declares 1 elements" in err.message


@pytest.mark.parametrize("text", [
    'name: "VGG_ILSVRC_16_layers"\nlayer {\n  name: "data"\n  type: "Input"\n}\n',
    '# deploy file\ninput: "data"\ninput_dim: 1\n',
    'layer {\n  name: "conv1"\n  type: "Convolution"\n}\n',
    '\n\n  layers { name: "x" type: CONVOLUTION }  # 中文注释\n',
])
def test_text_prototxt_passed_as_caffemodel(tmp_path, text):
    err = read_error(tmp_path, text.encode(), name="deploy.prototxt")
    assert "looks like a text prototxt, not a binary caffemodel" in err.message


@pytest.mark.parametrize("data, message, where", [
    # group wire type
    (net_msg(layer_msg("g", "ReLU") + key(9, 3)), "group wire type", ("g", None)),
    # invalid wire type 7
    (net_msg(layer_msg("w", "ReLU") + key(9, 7)), "invalid wire type 7", ("w", None)),
    # field number 0
    (net_msg(layer_msg("z", "ReLU") + b"\x00"), "invalid field number 0", ("z", None)),
    # both data and double_data
    (net_msg(layer_msg("dd", "Scale",
                       [blob_msg([1], [1.0]) + ld(8, np.float64(1).tobytes())])),
     "both data (float) and double_data", ("dd", 0)),
    # V0 layer inside a V1 layer
    (ld(2, ld(4, b"old") + ld(1, ld(1, b"old"))), "V0 layer", ("old", None)),
    # both modern and V1 layers
    (net_msg(layer_msg("m", "ReLU")) + ld(2, ld(4, b"v1")), "both 'layer'", (None, None)),
    # negative dimension
    (net_msg(layer_msg("neg", "Scale", [ld(7, ld(1, varint(-2)))])), "negative dimension",
     ("neg", 0)),
    # packed data not a multiple of 4 bytes
    (net_msg(layer_msg("odd", "Scale", [ld(5, b"\x00" * 7)])), "not a multiple of 4",
     ("odd", 0)),
    # more than 32 axes
    (net_msg(layer_msg("axes", "Scale", [ld(7, ld(1, varint(1) * 40))])), "more than 32 axes",
     ("axes", 0)),
    # wrong wire type for a known field
    (net_msg(ld(1, b"wt") + vi(7, 3)), "expected length-delimited", ("wt", None)),
    # a BlobProto (mean.binaryproto) is not a NetParameter
    (vi(1, 1) + vi(2, 3) + ld(5, packed_f32([1, 2, 3])), "not a NetParameter", (None, None)),
    # valid protobuf without any layer
    (ld(1, b"just a name"), "no layers", (None, None)),
    # HDF5 weights
    (b"\x89HDF\r\n\x1a\n" + b"\x00" * 100, "HDF5", (None, None)),
    # invalid UTF-8 in a layer name
    (net_msg(ld(1, b"\xff\xfe")), "not valid UTF-8", ("#0", None)),
])
def test_malformed_structures(tmp_path, data, message, where):
    err = read_error(tmp_path, data)
    assert message in err.message
    assert (err.layer, err.blob) == where


def test_writer_errors(tmp_path):
    with pytest.raises(ExportError, match="not floating point"):
        model_bytes([ModelLayer("i", "Scale", [np.arange(3)])])
    with pytest.raises(ExportError, match="outside the float32 range") as info:
        model_bytes([ModelLayer("big", "Scale", [np.array([1e300, np.inf])])])
    assert (info.value.layer, info.value.blob) == ("big", 0)
    with pytest.raises(ExportError, match="expected an object with name"):
        model_bytes([("tuple", "Scale", [])])
    # a failed write to a path leaves neither the target nor a temporary file
    path = tmp_path / "out.caffemodel"
    with pytest.raises(ExportError):
        write_caffemodel(path, [ModelLayer("ok", "ReLU", []),
                                ModelLayer("bad", "Scale", [np.arange(2)])])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# fuzzing: only Caffe2MetalError, never anything else, never a hang

VALID = model_bytes([
    ModelLayer("conv1", "Convolution",
               [np.arange(24, dtype="f4").reshape(2, 3, 2, 2), np.ones(2, "f4")]),
    ModelLayer("relu1", "ReLU", []),
    ModelLayer("fc", "InnerProduct", [np.linspace(0, 1, 6, dtype="f4").reshape(2, 3)]),
], "fuzz")
VALID_V1 = caffe_pb2.NetParameter(
    name="v1", layers=[caffe_pb2.V1LayerParameter(
        name="c", type=4, blobs=[caffe_pb2.BlobProto(num=1, channels=1, height=1, width=2,
                                                     data=[1.0, 2.0])])]).SerializeToString()
# non-packed data, so that mutations hit the vectorised run scanner
VALID_UNPACKED = net_msg(layer_msg("u", "Scale", [ld(7, ld(1, varint(5))) +
                                                   unpacked_f32(5, range(5))]))


def parse_or_model_error(data: bytes):
    with time_limit(20):
        try:
            model = parse_caffemodel(data, file="fuzz.caffemodel")
        except Caffe2MetalError as err:
            assert "fuzz.caffemodel" in str(err)
            return
        for layer in model:                 # every returned array is usable
            for blob in layer.blobs:
                assert blob.size == int(np.prod(blob.shape))
                float(np.asarray(blob, np.float64).sum())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    parse_or_model_error(data)


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from([VALID, VALID_V1, VALID_UNPACKED])))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate", "varint"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=12))
        elif op == "delete" and data:
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[i:]
        elif op == "varint" and data:
            data[i:i + 1] = varint(draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutations_of_valid_files(data):
    parse_or_model_error(data)
