"""The command line: exit statuses, --input-shape for train/test nets, verify's image input,
the report's wording, --help text, and a stdout that cannot be written."""
from __future__ import annotations

import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import caffe2metal
from caffe2metal import api, cli
from caffe2metal.caffe.caffemodel import write_caffemodel
from caffe2metal.examples import weights as synth
from caffe2metal.export.caffe import merged_layers
from caffe2metal.net.reader import read_model, read_prototxt
from caffe2metal.verification import inputs as vin
from caffe2metal.verification import opencv as cvmod

ROOT = Path(__file__).resolve().parents[1]

TRAIN_VAL = """name: "tiny"
layer {
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
  include { phase: TRAIN }
  data_param { source: "train_lmdb" batch_size: 64 backend: LMDB }
}
layer {
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
  include { phase: TEST }
  data_param { source: "val_lmdb" batch_size: 50 backend: LMDB }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 }
}
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer {
  name: "fc"
  type: "InnerProduct"
  bottom: "conv1"
  top: "fc"
  inner_product_param { num_output: 5 }
}
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc"
        include { phase: TEST } }
"""

SE_NET = """name: "se"
input: "data"
input_shape { dim: 1 dim: 4 dim: 6 dim: 6 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "sc" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "gate" type: "Sigmoid" bottom: "pool" top: "gate" }
layer { name: "se_scale" type: "Scale" bottom: "conv" bottom: "gate" top: "out"
        scale_param { axis: 0 } }
"""


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    built = caffe2metal.example(tmp_path_factory.mktemp("example"))
    out = tmp_path_factory.mktemp("converted") / "out"
    caffe2metal.convert(built.prototxt, out=out)
    return built.prototxt, built.caffemodel, out


def write_train_val(tmp_path: Path) -> tuple[Path, Path]:
    proto = tmp_path / "train_val.prototxt"
    proto.write_text(TRAIN_VAL)
    model = read_prototxt(proto, input_shapes={"": (1, 3, 8, 8)})
    synth.init_weights(model, 0)
    weights = tmp_path / "train_val.caffemodel"
    write_caffemodel(weights, merged_layers(model.graph), net_name=model.graph.name)
    return proto, weights


def png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (its pixel data is not there)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def opencv_refuses(monkeypatch):
    """OpenCV cannot load any model (as for a layer type it does not have)."""
    def refuse(*args, **kwargs):
        raise cv2.error("OpenCV(4.x) dnn: Can't create layer of type 'Fancy' in function "
                        "'getLayerInstance'")
    monkeypatch.setattr(cvmod, "opencv_net", refuse)


# ---------------------------------------------------------------- 1. exit statuses

def test_convert_verify_last_line_is_the_outcome(example, tmp_path, capsys):
    proto, weights, _ = example
    status, out, err = run(capsys, "convert", proto, weights, "-o", tmp_path / "o", "--verify")
    assert status == cli.OK and err == ""
    assert out.rstrip().splitlines()[-1] == "verify: PASS"


def test_convert_verify_that_cannot_run_is_status_3_and_out_is_complete(
        example, tmp_path, capsys, monkeypatch):
    proto, weights, _ = example
    opencv_refuses(monkeypatch)
    out_dir = tmp_path / "o"
    status, out, err = run(capsys, "convert", proto, weights, "-o", out_dir, "--verify")
    assert status == cli.NOT_VERIFIED == 3
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("verify: could not run: ") and "OpenCV cannot load" in last
    assert last.endswith(f"(the conversion in {out_dir} is complete)")
    assert (out_dir / "manifest.json").is_file() and err == ""
    # the API: no exception once OUT is complete; the reason is on the result
    done = caffe2metal.convert(proto, weights, tmp_path / "p", verify=True)
    assert done.verification is None and "OpenCV cannot load" in done.verification_error
    assert done.render().splitlines()[-1].startswith("verify: could not run: ")


def test_verify_alone_when_opencv_cannot_run_the_model_is_status_3(example, capsys,
                                                                     monkeypatch):
    proto, weights, out_dir = example
    opencv_refuses(monkeypatch)
    status, out, err = run(capsys, "verify", proto, weights, out_dir)
    assert status == 3 and out == ""
    assert one_error_line(err).startswith("caffe2metal: could not verify: ")
    with pytest.raises(api.VerificationUnavailable):
        caffe2metal.api.verify(proto, weights, out_dir)


def test_verify_with_a_wrong_out_is_bad_input(example, tmp_path, capsys):
    proto, weights, _ = example
    status, _, err = run(capsys, "verify", proto, weights, tmp_path / "nothing")
    assert status == 2 and one_error_line(err).startswith("caffe2metal: error: ")


def test_verify_incomplete_is_status_3(example, capsys, monkeypatch):
    proto, weights, out_dir = example
    real = api._verify

    def partly(*args, **kwargs):
        checked = real(*args, **kwargs)
        checked.report.layers[0].counted = False
        checked.report.layers[0].note = "not counted: for the test"
        return checked
    monkeypatch.setattr(api, "_verify", partly)
    status, out, _ = run(capsys, "verify", proto, weights, out_dir)
    assert status == 3 and out.rstrip().splitlines()[-1].startswith("verify: INCOMPLETE")


def test_statuses_are_documented():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for text in (cli.__doc__, readme):
        for status in ("0 ", "1 ", "2 ", "3 ", "130"):
            assert status in text


# ---------------------------------------------------------------- 2. --input-shape

def test_train_val_without_shape_names_the_missing_shape(tmp_path, capsys):
    proto, weights = write_train_val(tmp_path)
    status, _, err = run(capsys, "convert", proto, weights, "-o", tmp_path / "o")
    line = one_error_line(err)
    assert status == 2 and not (tmp_path / "o").exists()
    assert str(proto) in line and "layer 'data'" in line and "no input shape" in line
    assert "--input-shape" in line and "earlier layer" not in line


def test_inspect_lists_dropped_layers_and_why_shapes_are_unknown(tmp_path, capsys):
    proto, _ = write_train_val(tmp_path)
    status, out, _ = run(capsys, "inspect", proto)
    assert status == 0
    assert "3 layer(s) dropped to make a deploy net" in out
    for name in ("data (Data)", "loss (SoftmaxWithLoss)", "acc (Accuracy)"):
        assert f"  {name}: " in out
    assert re.search(r"^shapes unknown .*layer 'data'.*--input-shape", out, re.M)
    status, out, _ = run(capsys, "inspect", proto, "--input-shape", "data=1,3,8,8")
    assert status == 0 and "input data: 1x3x8x8" in out and "shapes unknown" not in out
    info = caffe2metal.api.inspect(proto, input_shapes=["1,3,8,8"])
    assert [d["name"] for d in info.dropped] == ["data", "loss", "acc"]
    assert info.inputs == {"data": [1, 3, 8, 8]} and not info.missing_inputs


def test_train_val_converts_to_a_deploy_file_and_verifies(tmp_path, capsys):
    proto, weights = write_train_val(tmp_path)
    out_dir = tmp_path / "o"
    status, out, err = run(capsys, "convert", proto, weights, "-o", out_dir,
                           "--input-shape", "1,3,8,8", "--verify")
    assert status == 0, out + err
    assert "  dropped loss (SoftmaxWithLoss): " in out
    assert out.rstrip().splitlines()[-1] == "verify: PASS"
    merged = (out_dir / "train_val_merged.prototxt").read_text()
    assert 'input: "data"\ninput_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n' in merged
    for gone in ('"Data"', "SoftmaxWithLoss", "Accuracy", "label"):
        assert gone not in merged
    deploy = read_prototxt(out_dir / "train_val_merged.prototxt")
    assert deploy.graph.inputs == {"data": (1, 3, 8, 8)} and not deploy.dropped
    # OpenCV loads the merged file as a deploy net
    net = cv2.dnn.readNetFromCaffe(str(out_dir / "train_val_merged.prototxt"),
                                   str(out_dir / "train_val_merged.caffemodel"))
    net.setInput(np.zeros((1, 3, 8, 8), np.float32))
    assert net.forward().shape == (1, 5)
    # verify alone needs the same shape
    status, _, err = run(capsys, "verify", proto, weights, out_dir)
    assert status == 2 and "--input-shape" in one_error_line(err)
    status, _, _ = run(capsys, "verify", proto, weights, out_dir, "--input-shape", "1,3,8,8")
    assert status == 0


def test_input_shape_sets_a_declared_input(tmp_path):
    proto = tmp_path / "n.prototxt"
    proto.write_text('input: "data"\nlayer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    with pytest.raises(caffe2metal.Caffe2MetalError, match="input-shape"):
        read_model(proto)
    model = read_model(proto, input_shapes={"data": (1, 2, 3, 4)})
    assert model.graph.inputs == {"data": (1, 2, 3, 4)}
    assert model.shapes.blobs["r"] == (1, 2, 3, 4)
    proto.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 5 dim: 5 }\n'
                     'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    assert read_model(proto, input_shapes={"": (1, 3, 7, 7)}).shapes.blobs["r"] == (1, 3, 7, 7)


@pytest.mark.parametrize("value, message", [
    ("1,3,x,4", "expected [NAME=]N,C,H,W"),
    ("0,3,4,4", "expected [NAME=]N,C,H,W"),
    ("ghost=1,3,8,8", "no input of that name"),
])
def test_bad_input_shape_is_one_line(tmp_path, capsys, value, message):
    proto, _ = write_train_val(tmp_path)
    status, _, err = run(capsys, "inspect", proto, "--input-shape", value)
    assert status == 2 and message in one_error_line(err)


# ---------------------------------------------------------------- 3. verify's input

def test_image_mean_scale_channel_order_is_blob_from_image(example, tmp_path):
    proto, weights, _ = example
    img = np.random.default_rng(3).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), img)
    model = read_model(proto, weights)
    spec = vin.image_input(tmp_path / "x.png", mean="104,117,123", scale=0.017,
                           channel_order="RGB")
    feed, described = vin.make_inputs(model, spec)
    expected = cv2.dnn.blobFromImage(img, 0.017, (300, 300), (104, 117, 123), swapRB=True,
                                     crop=False)
    np.testing.assert_allclose(feed["data"], expected, rtol=1e-6, atol=1e-5)
    assert described == (f"image {tmp_path / 'x.png'} resized to 300x300 (cv2.resize "
                         "INTER_LINEAR), channels RGB (B and R swapped), mean [104, 117, 123] "
                         "subtracted, times 0.017")


def test_convert_verify_takes_the_image_options(example, tmp_path, capsys):
    proto, weights, _ = example
    cv2.imwrite(str(tmp_path / "x.png"), np.full((20, 30, 3), 128, np.uint8))
    status, out, _ = run(capsys, "convert", proto, weights, "-o", tmp_path / "o", "--verify",
                         "--image", tmp_path / "x.png", "--mean", "127.5", "--scale",
                         "0.0078125")
    assert status == 0
    assert re.search(r"^input: image .*x\.png resized to 300x300 .*channels BGR \(as read\), "
                     r"mean \[127\.5\] subtracted, times 0\.0078125$", out, re.M)


@pytest.mark.parametrize("make, args, message", [
    (lambda d: d / "missing.png", (), "no such image file"),
    (lambda d: (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really") and
     d / "broken.png", (), "cannot decode"),
    (lambda d: png(d / "huge.png", 20000, 20000), (), "more than the 268435456"),
    (lambda d: None, ("--seed", "-1"), "--seed -1"),
    (lambda d: None, ("--mean", "1,2"),      # convert: no image needed (the manifest's record)
     {"verify": "only apply to an --image", "convert": "--mean has 2 values"}),
    (lambda d: cv2.imwrite(str(d / "ok.png"), np.zeros((4, 4, 3), np.uint8)) and d / "ok.png",
     ("--mean", "1,2"), "--mean has 2 values"),
])
@pytest.mark.parametrize("command", ["verify", "convert"])
def test_bad_verify_input_is_one_line_and_writes_nothing(example, tmp_path, capsys, make,
                                                        args, message, command):
    proto, weights, out_dir = example
    image = make(tmp_path)
    argv = ["--image", image] if image is not None else []
    argv += list(args)
    if command == "convert":
        target = tmp_path / "o"
        status, _, err = run(capsys, "convert", proto, weights, "-o", target, "--verify", *argv)
        assert not target.exists()
    else:
        status, _, err = run(capsys, "verify", proto, weights, out_dir, *argv)
    message = message[command] if isinstance(message, dict) else message
    assert status == 2 and message in one_error_line(err)


def test_image_options_need_verify(example, tmp_path, capsys):
    proto, weights, _ = example
    status, _, err = run(capsys, "convert", proto, weights, "-o", tmp_path / "o", "--image",
                         "x.png")
    assert status == 2 and "--image only applies with --verify" in one_error_line(err)


# ---------------------------------------------------------------- 4. tolerance per row

def test_verify_table_shows_each_rows_tolerance(example, tmp_path, capsys):
    proto, weights, _ = example
    status, out, _ = run(capsys, "convert", proto, weights, "-o", tmp_path / "o",
                         "--dtype", "float16", "--verify")
    assert status == 0
    heads = [line for line in out.splitlines() if "max |diff|" in line and "above" not in line]
    assert len(heads) == 3 and all(h.split()[-1] == "tol" for h in heads)   # + the plan run
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.endswith(" ok") and len(line.split()) >= 8}
    assert rows["conv0"][-2] == "0.002"              # float16 weights
    assert rows["detection_out"][-2] == "0.001"      # end to end, DetectionOutput
    assert rows["mbox_loc"][-2] == "0.2"             # the plan run, float16 weights
    assert "8.0e-4" in vin.__doc__ or "8.0e-4" in sys.modules[
        "caffe2metal.verification.report"].__doc__


# ---------------------------------------------------------------- 5. wording

def test_convert_report_counts_batchnorm_chains_apart_and_lists_each_kept_layer_once(
        tmp_path, capsys):
    proto = tmp_path / "se.prototxt"
    proto.write_text(SE_NET)
    model = read_prototxt(proto)
    synth.init_weights(model, 0)
    weights = tmp_path / "se.caffemodel"
    write_caffemodel(weights, merged_layers(model.graph), net_name=model.graph.name)
    status, out, _ = run(capsys, "convert", proto, weights, "-o", tmp_path / "o")
    assert status == 0
    first = out.splitlines()[0]
    assert first == f"{proto}: 1 BatchNorm chain folded, 1 other Scale layer kept"
    assert out.count("se_scale") == 1
    assert re.search(r"^  kept    se_scale \(no Metal file\): Scale with two bottoms", out, re.M)


def test_help_has_no_rst_backticks(capsys):
    for argv in ([], ["inspect"], ["convert"], ["verify"], ["compare"], ["example"]):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        text = capsys.readouterr().out
        assert "usage:" in text and "`" not in text, argv


def test_make_convert_with_a_model_verifies():
    dry = subprocess.run(["make", "-n", "convert", "MODEL=m.prototxt", "OUT=o"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in dry.splitlines() if "caffe2metal convert" in x)
    assert "m.prototxt" in line and "-o o" in line and "--verify" in line


# ---------------------------------------------------------------- 6. stdout

def _cli_process(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "caffe2metal", *map(str, args)],
                          capture_output=False, text=True, **kwargs)


@pytest.mark.parametrize("command", ["inspect", "convert", "example"])
def test_full_stdout_is_one_error_line(example, tmp_path, command):
    proto, weights, _ = example
    argv = {"inspect": ["inspect", proto, weights],
            "convert": ["convert", proto, weights, "-o", tmp_path / "o"],
            "example": ["example", tmp_path / "ex"]}[command]
    with open("/dev/full", "w") as full:
        r = _cli_process(*argv, stdout=full, stderr=subprocess.PIPE)
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert line.startswith("caffe2metal: cannot write the report to stdout: ")


def test_closed_stdout_is_one_error_line(example):
    proto, weights, _ = example
    r = subprocess.run(f'exec >&-; "{sys.executable}" -m caffe2metal inspect "{proto}"',
                       shell=True, capture_output=False, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1
    assert one_error_line(r.stderr) == "caffe2metal: cannot write the report: stdout is closed"


def test_broken_pipe_is_quiet_success(example):
    proto, weights, _ = example
    r = subprocess.run(f'"{sys.executable}" -m caffe2metal inspect "{proto}" "{weights}" '
                       "| head -1; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("net ")
