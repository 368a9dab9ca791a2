"""The manifest's ``preprocessing``: recorded by convert (options, else the prototxt's
transform_param, else "none"), applied by ``verify --image`` and ``run --image``."""
from __future__ import annotations

import json
from importlib.resources import files

import cv2
import numpy as np
import pytest
from jsonschema import Draft202012Validator

from caffe2metal import api
from caffe2metal.caffe.caffemodel import write_caffemodel
from caffe2metal.cli import main
from caffe2metal.examples import weights as synth
from caffe2metal.export.caffe import merged_layers
from caffe2metal.export.preprocessing import NONE_NOTE
from caffe2metal.net.reader import read_prototxt
from caffe2metal.runtime import run_plan

SCHEMA = json.loads((files("caffe2metal.export") / "manifest.schema.json").read_text())

LAYERS = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
"""
DEPLOY = 'name: "tiny"\ninput: "data"\ninput_shape { dim: 1 dim: 3 dim: 24 dim: 32 }\n' + LAYERS
TRAIN_TEST = """name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { mirror: true mean_value: 1 scale: 2 } data_param { source: "x" } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { %s } data_param { source: "y" batch_size: 1 } }
""" + LAYERS + """
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool" bottom: "label" top: "loss" }
"""
SHAPE = ["1,3,24,32"]
PADDED = ("mean: not foldable, 'conv1' pads by [1, 1]: Caffe pads the mean-subtracted image "
          "with zeros, i.e. the raw image with the mean; a bias change would be wrong at the "
          "border")


def _fold(scale: float, mean: str | None = PADDED) -> dict:
    """conv1 (pad 1) reads the input: the scale folds, a mean does not."""
    note = f"scale: multiply the weights of 'conv1' by {scale:g} (exact in real arithmetic); "
    return {"layer": "conv1", "scale": True, "mean": mean is None,
            "note": note + (mean or "no mean to fold")}


def _net(tmp_path, text: str, name: str = "tiny"):
    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(text)
    model = read_prototxt(proto, input_shapes={"": (1, 3, 24, 32)})
    synth.init_weights(model, 0)
    weights = proto.with_suffix(".caffemodel")
    write_caffemodel(weights, merged_layers(model.graph), net_name=model.graph.name)
    return proto, weights


def _image(tmp_path):
    img = np.random.default_rng(5).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), img)
    return path, img


def _record(out) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    Draft202012Validator(SCHEMA).validate(manifest)
    return manifest["preprocessing"]


def test_options_are_recorded(tmp_path):
    proto, weights = _net(tmp_path, DEPLOY)
    done = api.convert(proto, weights, tmp_path / "o", mean="104,117,123", scale=0.017,
                       channel_order="RGB")
    assert _record(done.out) == done.manifest["preprocessing"] == {
        "source": "options", "input": "data", "resize": "bilinear", "channel_order": "RGB",
        "mean": [104.0, 117.0, 123.0], "scale": 0.017, "fold": _fold(0.017)}


def test_one_option_records_the_defaults_of_the_others(tmp_path):
    proto, weights = _net(tmp_path, DEPLOY)
    assert main(["convert", str(proto), str(weights), "-o", str(tmp_path / "o"),
                 "--mean", "127.5"]) == 0
    assert _record(tmp_path / "o") == {"source": "options", "input": "data",
                                       "resize": "bilinear", "channel_order": "BGR",
                                       "mean": [127.5], "scale": 1.0, "fold": _fold(1)}


def test_nothing_is_assumed_without_options(tmp_path):
    proto, weights = _net(tmp_path, DEPLOY)
    done = api.convert(proto, weights, tmp_path / "o")
    assert _record(done.out) == {"source": "none", "note": NONE_NOTE}


def test_transform_param_of_the_test_phase_data_layer(tmp_path):
    proto, weights = _net(tmp_path, TRAIN_TEST % "mean_value: 104 mean_value: 117 "
                          "mean_value: 123 scale: 0.007843 crop_size: 24")
    done = api.convert(proto, weights, tmp_path / "o", input_shapes=SHAPE)
    rec = _record(done.out)
    assert rec == {"source": "transform_param", "layer": "data", "input": "data",
                   "resize": "bilinear", "channel_order": "BGR",
                   "mean": [104.0, 117.0, 123.0], "scale": 0.007843, "note": rec["note"],
                   "fold": _fold(0.007843)}
    assert "center-crops" in rec["note"]
    # the data layer is still dropped as before: the merged net is a deploy net
    assert [d["name"] for d in done.dropped] == ["data", "loss"]


def test_options_replace_the_transform_param(tmp_path):
    proto, weights = _net(tmp_path, TRAIN_TEST % "mean_value: 104 scale: 0.5")
    done = api.convert(proto, weights, tmp_path / "o", input_shapes=SHAPE,
                       channel_order="RGB")
    assert _record(done.out) == {"source": "options", "input": "data", "resize": "bilinear",
                                 "channel_order": "RGB", "mean": [], "scale": 1.0,
                                 "note": "the options replace the transform_param of layer "
                                         "'data'", "fold": _fold(1, None)}


def test_mean_file_is_not_read_and_not_assumed(tmp_path):
    proto, weights = _net(tmp_path, TRAIN_TEST % 'mean_file: "mean.binaryproto"')
    rec = _record(api.convert(proto, weights, tmp_path / "o", input_shapes=SHAPE).out)
    assert rec["source"] == "none" and "mean_file" in rec["note"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mean="1,2"), "--mean has 2 values"),
    (dict(scale=0), "--scale 0"),
    (dict(mean="nan"), "--mean 'nan'"),
])
def test_bad_options_write_nothing(tmp_path, kwargs, message):
    proto, weights = _net(tmp_path, DEPLOY)
    with pytest.raises(api.Caffe2MetalError, match=message):
        api.convert(proto, weights, tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def _blob(img, rec) -> np.ndarray:
    """What cv2.dnn.blobFromImage makes of ``img`` with the record's values."""
    mean = rec["mean"] * (3 if len(rec["mean"]) == 1 else 1) or [0, 0, 0]
    return cv2.dnn.blobFromImage(img, rec["scale"], (32, 24), mean,
                                 swapRB=rec["channel_order"] == "RGB", crop=False)


@pytest.fixture
def recorded(tmp_path):
    """A net whose manifest records its preprocessing from the transform_param."""
    proto, weights = _net(tmp_path, TRAIN_TEST % "mean_value: 104 mean_value: 117 "
                          "mean_value: 123 scale: 0.017")
    done = api.convert(proto, weights, tmp_path / "o", input_shapes=SHAPE)
    return proto, weights, done.out, _image(tmp_path)


def test_run_applies_the_manifest(recorded):
    _, _, out, (path, img) = recorded
    rec = _record(out)
    done = api.run(out, image=path)
    want = run_plan(out, {"data": _blob(img, rec)})
    np.testing.assert_allclose(done.outputs["pool"], want.outputs["pool"], rtol=1e-5)
    assert done.input.endswith("mean [104, 117, 123] subtracted, times 0.017; preprocessing "
                               "as the manifest records (from the transform_param of layer "
                               "'data')")
    assert "input: image" in done.render()


def test_run_without_a_record_feeds_the_pixels_as_they_are(tmp_path):
    proto, weights = _net(tmp_path, DEPLOY)
    out = api.convert(proto, weights, tmp_path / "o").out
    path, img = _image(tmp_path)
    done = api.run(out, image=path)
    raw = {"mean": [], "scale": 1.0, "channel_order": "BGR"}
    want = run_plan(out, {"data": _blob(img, raw)})
    np.testing.assert_allclose(done.outputs["pool"], want.outputs["pool"], rtol=1e-5)
    assert "no mean subtraction, no scaling; preprocessing none" in done.input


def test_verify_applies_the_manifest_unless_told_otherwise(recorded):
    proto, weights, out, (path, _) = recorded
    check = api.verify(proto, weights, out, image=path, input_shapes=SHAPE)
    assert check.ok, check.render()
    assert check.report.input.endswith("mean [104, 117, 123] subtracted, times 0.017; "
                                       "preprocessing as the manifest records (from the "
                                       "transform_param of layer 'data')")
    mine = api.verify(proto, weights, out, image=path, input_shapes=SHAPE, scale=0.5)
    assert mine.report.input.endswith("no mean subtraction, times 0.5")


def test_convert_verify_applies_what_it_records(tmp_path, capsys):
    proto, weights = _net(tmp_path, TRAIN_TEST % "mean_value: 104 scale: 0.017")
    path, _ = _image(tmp_path)
    status = main(["convert", str(proto), str(weights), "-o", str(tmp_path / "o"),
                   "--input-shape", SHAPE[0], "--verify", "--image", str(path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "mean [104] subtracted, times 0.017; preprocessing as the manifest records (from " \
           "the transform_param of layer 'data')" in out
    done = api.convert(proto, weights, tmp_path / "p", input_shapes=SHAPE, verify=True,
                       image=path)
    assert "preprocessing as the manifest records" in done.verification.report.input


@pytest.mark.parametrize("pad", [0, 1])
def test_the_fold_record_says_what_folding_into_the_first_convolution_gives(tmp_path, pad):
    """Folded by hand as the record describes (weights x scale, bias - sum W x scale x mean),
    the convolution on the raw image in OpenCV against the original on the preprocessed
    image: equal without padding; with padding the border differs, as the record says."""
    text = DEPLOY.replace("pad: 1", f"pad: {pad}")
    proto, weights = _net(tmp_path, text)
    mean, scale = np.array([104.0, 117.0, 123.0]), 0.017
    done = api.convert(proto, weights, tmp_path / "o", mean="104,117,123", scale=scale)
    fold = _record(done.out)["fold"]
    assert (fold["layer"], fold["scale"], fold["mean"]) == ("conv1", True, pad == 0)

    from caffe2metal.caffe.caffemodel import read_caffemodel
    layers = read_caffemodel(weights)
    w, b = (np.asarray(x, np.float64) for x in layers[0].blobs)
    folded_w = w * scale
    folded_b = b - (folded_w * mean[None, :, None, None]).sum(axis=(1, 2, 3))

    class Folded:
        name, type = layers[0].name, layers[0].type
        blobs = [folded_w.astype(np.float32), folded_b.astype(np.float32)]
    write_caffemodel(tmp_path / "folded.caffemodel", [Folded(), *layers[1:]])
    raw = np.random.default_rng(3).uniform(0, 255, (1, 3, 24, 32)).astype(np.float32)
    conv = []
    for model, x in ((weights, (raw - mean[None, :, None, None].astype(np.float32)) * scale),
                     (tmp_path / "folded.caffemodel", raw)):
        net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
        net.setInput(np.ascontiguousarray(x, np.float32))
        conv.append(np.array(net.forward("conv1")))
    diff = np.abs(conv[0] - conv[1]) / np.abs(conv[0]).max()
    if pad == 0:
        assert diff.max() < 1e-5           # float32 sums of 27 products of size ~255 x w
    else:
        assert diff[..., 1:-1, 1:-1].max() < 1e-5 and diff.max() > 1e-2
