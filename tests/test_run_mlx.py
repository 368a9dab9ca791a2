"""`run --backend mlx`: the plan executed by Apple's MLX (its CPU build here) against OpenCV
on the original model and against the numpy backend; the MPS files read as written.

Tolerances.  Against OpenCV: the numpy backend's own (float32 weights 1e-4 of max|ref|).
Against the numpy backend (same files, same input): numpy computes each op in float64 and
rounds its output to float32, MLX computes in float32 throughout (its accumulation order),
so the two differ by float32 rounding compounding through the net: measured 1.2e-6
(mbox_loc) and 6.0e-6 (mbox_conf_flatten) on the example, 30 layers deep, bounded at 1e-5
here (1.7x); over the real architectures (tests/test_run_real_models.py, bound 1e-4) the
worst is 4.8e-5, but for mobilenetv2_ssd's sigmoid of logits ~1100 (explained there).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from caffe2metal import api
from caffe2metal.cli import main
from caffe2metal.runtime import default_feed, load_plan, run_plan
from conftest import ROOT, opencv_run, with_weights, write_net
from test_run import HEADS, same_detections

MLX_VS_NUMPY = 1e-5


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def example(example_outputs):
    return example_outputs


def test_example_float32_weights_matches_opencv_and_numpy(example):
    ex, outs = example
    feed = default_feed(load_plan(outs["float32"]))
    *heads, rows = opencv_run(ex.prototxt, ex.caffemodel, feed, HEADS + ["detection_out"])
    r = run_plan(outs["float32"], backend="mlx")
    numpy = run_plan(outs["float32"])
    for name, ref in zip(HEADS, heads, strict=True):
        assert _rel(r.values[name], ref) <= 1e-4, name        # measured 7.1e-6, 2.7e-5
        assert _rel(r.values[name], numpy.values[name]) <= MLX_VS_NUMPY, name
    assert set(r.outputs) == set(numpy.outputs) == {"detection_out"}
    assert r.outputs["detection_out"].shape == numpy.outputs["detection_out"].shape
    assert r.outputs["detection_out"].dtype == np.float32
    assert same_detections(r.detections, rows) and len(r.detections) > 0


def test_example_float16_weights_match_numpy_on_the_same_files(example):
    """float16 files are loaded as float16 and widened exactly: MLX and numpy compute from the
    same weights, so they agree as closely as with float32 files (measured 1.4e-6, 4.1e-6)."""
    _, outs = example
    r = run_plan(outs["float16"], backend="mlx")
    numpy = run_plan(outs["float16"])
    for name in HEADS:
        assert _rel(r.values[name], numpy.values[name]) <= MLX_VS_NUMPY, name
    assert len(r.detections) == len(numpy.detections) > 0


def test_activations_float16_round_like_the_numpy_backend(example):
    """Both round every MPS op's output to float16 (round to nearest even).  A value that
    float32 and float64 arithmetic put on either side of a float16 rounding boundary rounds
    one half-ulp (2^-11 relative) apart, and 30 layers carry that on: the two float16 runs
    differ by 7.2e-4 (mbox_loc) and 1.9e-3 (mbox_conf_flatten), bounded at 4e-3, against
    2.9e-3 and 1.1e-2 between MLX's own float16 and float32 runs (numpy's: 2.7e-3, 1.1e-2)."""
    _, outs = example
    a = run_plan(outs["float32"], backend="mlx")
    b = run_plan(outs["float32"], backend="mlx", activations="float16")
    numpy = run_plan(outs["float32"], activations="float16")
    for name in HEADS:
        assert 0 < _rel(b.values[name], a.values[name]) <= 2e-2, name    # 2.7e-3, 1.1e-2
        assert _rel(b.values[name], numpy.values[name]) <= 4e-3, name


def _caffe_layout(out, layer: str):
    """Rewrite ``layer``'s MPS weights file ([out][kH][kW][in]) with the Caffe
    [out][in][kH][kW] bytes of the same weights, the manifest's sha256 updated: a file an
    app could be handed by mistake, the same size and a valid manifest."""
    m = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in m["layers"] if e["name"] == layer)
    spec = entry["weights"]
    w = np.fromfile(out / spec["file"], "<f4").reshape(spec["shape"])
    data = np.ascontiguousarray(w.transpose(0, 3, 1, 2)).tobytes()
    (out / spec["file"]).write_bytes(data)
    spec["sha256"] = hashlib.sha256(data).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m))


def test_weights_in_caffe_layout_give_wrong_results(example, tmp_path):
    """The MLX backend reads the files as written: the first convolution (3x3, 3 inputs)
    with its weights in Caffe's order instead of MPS's runs, and is wrong."""
    _, outs = example
    good = run_plan(outs["float32"], backend="mlx").values
    bad_out = tmp_path / "bad"
    shutil.copytree(outs["float32"], bad_out)
    _caffe_layout(bad_out, "conv0")
    bad = run_plan(bad_out, backend="mlx").values
    numpy = run_plan(outs["float32"]).values
    assert _rel(good["conv0#2"], numpy["conv0#2"]) <= MLX_VS_NUMPY
    assert _rel(bad["conv0#2"], numpy["conv0#2"]) > 0.3            # measured 1.4
    assert _rel(bad["mbox_loc"], numpy["mbox_loc"]) > 0.1          # measured 0.81


# A net of the op kinds the example lacks: grouped and dilated convolution, deconvolution
# (stride 2, and 2 groups), average pooling over padding, PReLU, Eltwise with coefficients
# and PROD, Concat of 6 + 5 channels (MPS offsets 0 and 8), an unfoldable BatchNorm+Scale
# (channel_affine), LRN, the MPS neurons, InnerProduct and Softmax.
KINDS_NET = """name: "kinds"
input: "data"
input_shape { dim: 1 dim: 3 dim: 23 dim: 21 }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "r1" type: "PReLU" bottom: "c1" top: "c1" }
layer { name: "g" type: "Convolution" bottom: "c1" top: "g"
  convolution_param { num_output: 8 kernel_size: 3 pad: 2 dilation: 2 group: 2 } }
layer { name: "t" type: "TanH" bottom: "g" top: "g" }
layer { name: "up" type: "Deconvolution" bottom: "g" top: "up"
  convolution_param { num_output: 6 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "upg" type: "Deconvolution" bottom: "g" top: "upg"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "s" type: "Sigmoid" bottom: "upg" top: "upg" }
layer { name: "ap" type: "Pooling" bottom: "upg" top: "ap"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "mp" type: "Pooling" bottom: "up" top: "mp"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "apc" type: "Convolution" bottom: "ap" top: "apc"
  convolution_param { num_output: 5 kernel_size: 1 pad: 0 } }
layer { name: "cat" type: "Concat" bottom: "mp" bottom: "apc" top: "cat" }
layer { name: "e" type: "Eltwise" bottom: "cat" bottom: "cat" top: "e"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -2.0 } }
layer { name: "bn" type: "BatchNorm" bottom: "e" top: "e" }
layer { name: "sc" type: "Scale" bottom: "e" top: "e" scale_param { bias_term: true } }
layer { name: "elu" type: "ELU" bottom: "e" top: "e" }
layer { name: "p" type: "Eltwise" bottom: "e" bottom: "cat" top: "p"
  eltwise_param { operation: PROD } }
layer { name: "lrn" type: "LRN" bottom: "p" top: "lrn"
  lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
layer { name: "fc" type: "InnerProduct" bottom: "lrn" top: "fc"
  inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    d = tmp_path_factory.mktemp("kinds")
    model, weights = with_weights(write_net(d, KINDS_NET), seed=3)
    out = api.convert(model.prototxt, weights, d / "out").out
    return model, weights, out


def test_every_op_kind_matches_opencv_and_numpy(kinds):
    model, weights, out = kinds
    manifest = load_plan(out)
    kernels = {(op.get("mps") or {}).get("kind") or (op.get("mps") or {}).get("kernel")
               or (op.get("app") or {}).get("op") for op in manifest["plan"]}
    assert {"convolution", "convolution_transpose", "channel_affine", "fully_connected",
            "MPSCNNPoolingAverage", "MPSCNNPoolingMax", "MPSCNNNeuronPReLU", "MPSCNNAdd",
            "MPSCNNMultiply", "destinationFeatureChannelOffset", "lrn"} <= kernels, kernels
    feed = default_feed(manifest)
    # (OpenCV layer, the blob its output is: the last write of that name in the plan)
    compared = {"up": "up", "s": "upg", "cat": "cat", "lrn": "lrn", "fc": "fc", "prob": "prob"}
    refs = opencv_run(model.prototxt, weights, feed, list(compared))
    r, numpy = run_plan(out, backend="mlx"), run_plan(out)
    last = {b: t for op in manifest["plan"] for t in op["tops"]
            for b in [(manifest.get("blob_names") or {}).get(t, t)]}
    for top, ref in zip(compared.values(), refs, strict=True):
        mine = r.values[last[top]].reshape(ref.shape)
        assert _rel(mine, ref) <= 1e-4, top                  # measured <= 6.9e-7
        assert _rel(mine, numpy.values[last[top]].reshape(ref.shape)) <= MLX_VS_NUMPY, top


def test_transposed_weights_unflipped_give_wrong_results(kinds, tmp_path):
    """MPSCNNConvolutionTranspose files hold the flipped kernel (used as-is); MLX's own
    conv_transpose2d would flip it again.  The backend correlates with the file as written:
    the same file with the kernel flipped back is wrong."""
    _, _, out = kinds
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = json.loads((bad / "manifest.json").read_text())
    spec = next(e for e in m["layers"] if e["name"] == "up")["weights"]
    w = np.fromfile(bad / spec["file"], "<f4").reshape(spec["shape"])
    data = np.ascontiguousarray(w[:, ::-1, ::-1, :]).tobytes()
    (bad / spec["file"]).write_bytes(data)
    spec["sha256"] = hashlib.sha256(data).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(m))
    good = run_plan(out, backend="mlx").values
    wrong = run_plan(bad, backend="mlx").values
    ref = run_plan(out).values
    assert _rel(good["up"], ref["up"]) <= MLX_VS_NUMPY
    assert _rel(wrong["up"], ref["up"]) > 0.3                  # measured 0.54


# ------------------------------------------------------------------ command line


def test_cli_json_has_the_numpy_backends_format(example, capsys):
    _, outs = example
    assert main(["run", str(outs["float32"]), "--json"]) == 0
    numpy = json.loads(capsys.readouterr().out)
    assert main(["run", str(outs["float32"]), "--json", "--backend", "mlx",
                 "--device", "cpu"]) == 0
    mlx = json.loads(capsys.readouterr().out)
    assert mlx.keys() == numpy.keys() == {"outputs", "detections", "skipped",
                                          "float16_overflow"}
    assert mlx["skipped"] == numpy["skipped"] == mlx["float16_overflow"] == []
    assert {n: v["shape"] for n, v in mlx["outputs"].items()} == \
        {n: v["shape"] for n, v in numpy["outputs"].items()}
    assert [set(d) for d in mlx["detections"]] == [set(d) for d in numpy["detections"]]
    assert main(["run", str(outs["float32"]), "--backend", "mlx"]) == 0
    assert "plan run in mlx (cpu)" in capsys.readouterr().out.splitlines()[0]


def test_cli_device_gpu_without_one_is_a_one_line_error(example, capsys):
    import mlx.core as mx
    if mx.is_available(mx.gpu):
        pytest.skip("this machine has a GPU for MLX")
    _, outs = example
    assert main(["run", str(outs["float32"]), "--backend", "mlx", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device gpu" in err and "GPU" in err


def test_cli_without_mlx_names_the_install_command(example):
    """A process where ``import mlx`` fails (``sys.modules['mlx'] = None``, as if it were
    not installed) runs the real CLI: one line, exit 2, no traceback."""
    _, outs = example
    code = ("import sys; sys.modules['mlx'] = None\n"
            "from caffe2metal.cli import main\n"
            f"sys.exit(main(['run', {str(outs['float32'])!r}, '--backend', 'mlx']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1
    assert "pip install 'caffe2metal[mlx]'" in r.stderr and "Traceback" not in r.stderr
