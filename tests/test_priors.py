"""Tests for caffe2metal.priors.prior_boxes against OpenCV's Caffe PriorBox layer.

Each case builds a tiny Caffe net as prototxt text. The net has a data blob, a
feature blob, and a PriorBox layer with bottoms [feature, data]. No layer has
weights, so ``cv2.dnn.readNetFromCaffe(prototxt)`` loads it without a
caffemodel. The test runs the net and compares the PriorBox top with
``prior_boxes`` using ``atol=ATOL, rtol=0``.

OpenCV 4.x differs from Caffe SSD in ways the helpers must work around:
* it ignores ``img_size``/``img_h``/``img_w`` and always uses the data blob's
  size, so for those cases the data blob is given the override's size;
* it defaults ``clip`` to true when the field is missing (Caffe: false), so
  ``clip`` is always written out;
* it rejects a PriorBox without ``variance`` (Caffe: 0.1), so the Caffe
  default is written out;
* it keeps fractional ``min_size``/``max_size`` (Caffe truncates them to
  int), so only whole sizes are compared with OpenCV.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from caffe2metal.layers.priorbox import prior_boxes, priors_per_cell

cv2 = pytest.importorskip("cv2")

# Max abs difference allowed against OpenCV. Caffe (and prior_boxes) computes
# the corner formula in double before storing a float, while OpenCV computes in
# float, so the two can differ by about 1 ulp (<= 1.2e-7 seen). 1e-6 leaves room.
ATOL = 1e-6

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"

MBOX_VARIANCE = [0.1, 0.1, 0.2, 0.2]


# --------------------------------------------------------------------------
# OpenCV reference
# --------------------------------------------------------------------------

def _fmt_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _param_text(params: dict) -> str:
    """``prior_box_param`` body for OpenCV, with Caffe defaults made explicit."""
    params = dict(params)
    params.setdefault("clip", False)  # OpenCV's default is true, Caffe's false
    if not params.get("variance"):
        params["variance"] = [0.1]  # OpenCV requires it, Caffe defaults to 0.1
    lines = []
    for key, value in params.items():
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        lines.extend(f"    {key}: {_fmt_value(v)}" for v in values)
    return "\n".join(lines)


def _input_net(param_text: str, feature_hw, image_hw) -> str:
    """Two Input layers: data [1,3,H,W] and feat [1,1,h,w]."""
    (fh, fw), (ih, iw) = feature_hw, image_hw
    return f"""
name: "priorbox_input_test"
layer {{
  name: "data" type: "Input" top: "data"
  input_param {{ shape {{ dim: 1 dim: 3 dim: {ih} dim: {iw} }} }}
}}
layer {{
  name: "feat" type: "Input" top: "feat"
  input_param {{ shape {{ dim: 1 dim: 1 dim: {fh} dim: {fw} }} }}
}}
layer {{
  name: "feat_mbox_priorbox" type: "PriorBox"
  bottom: "feat" bottom: "data" top: "feat_mbox_priorbox"
  prior_box_param {{
{param_text}
  }}
}}
"""


def _pooling_net(param_text: str, image_hw, kernel: int, stride: int) -> str:
    """Legacy ``input:``/``input_shape`` data blob; the feature map is a MAX pooling of it."""
    ih, iw = image_hw
    return f"""
name: "priorbox_pool_test"
input: "data"
input_shape {{ dim: 1 dim: 3 dim: {ih} dim: {iw} }}
layer {{
  name: "pool" type: "Pooling" bottom: "data" top: "pool"
  pooling_param {{ pool: MAX kernel_size: {kernel} stride: {stride} }}
}}
layer {{
  name: "pool_mbox_priorbox" type: "PriorBox"
  bottom: "pool" bottom: "data" top: "pool_mbox_priorbox"
  prior_box_param {{
{param_text}
  }}
}}
"""


def _run_opencv(tmp_path: Path, prototxt: str, inputs: dict, output: str) -> np.ndarray:
    path = tmp_path / "net.prototxt"
    path.write_text(prototxt)
    net = cv2.dnn.readNetFromCaffe(str(path))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    for name, blob in inputs.items():
        net.setInput(blob, name)
    out = net.forward(output)
    assert out.shape[0] == 1 and out.shape[1] == 2 and out.ndim == 3, out.shape
    return out[0]


def opencv_priorbox(tmp_path: Path, params: dict, feature_hw, image_hw,
                    param_text: str | None = None) -> np.ndarray:
    """OpenCV's PriorBox output (batch axis dropped) for a two-Input net."""
    override = _image_override(params)
    if override is not None:
        # OpenCV ignores img_size/img_h/img_w. The comparison only makes sense
        # when the data blob already has the override's size.
        assert tuple(image_hw) == override, "data blob must match img_size/img_h/img_w"
    text = _input_net(param_text or _param_text(params), feature_hw, image_hw)
    (fh, fw), (ih, iw) = feature_hw, image_hw
    inputs = {"data": np.zeros((1, 3, ih, iw), np.float32),
              "feat": np.zeros((1, 1, fh, fw), np.float32)}
    return _run_opencv(tmp_path, text, inputs, "feat_mbox_priorbox")


def _image_override(params: dict):
    if params.get("img_h") is not None:
        return (int(params["img_h"]), int(params["img_w"]))
    if params.get("img_size") is not None:
        return (int(params["img_size"]),) * 2
    return None


def _check(got: np.ndarray, ref: np.ndarray, params: dict, feature_hw) -> None:
    assert got.dtype == np.float32
    assert got.shape == ref.shape
    per_cell = priors_per_cell(**params)
    assert got.shape == (2, feature_hw[0] * feature_hw[1] * per_cell * 4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------
# Synthetic cases compared with OpenCV
# --------------------------------------------------------------------------

def _mbox(min_size, max_size=None, ars=(2, 3)):
    params = {"min_size": [min_size], "aspect_ratio": list(ars), "flip": True,
              "clip": False, "variance": MBOX_VARIANCE, "offset": 0.5}
    if max_size is not None:
        params["max_size"] = [max_size]
    return params


# MobileNet-SSD (300x300): conv11, conv13, conv14_2 .. conv17_2.
MOBILENET_SSD_HEADS = [
    ("conv11", 19, _mbox(60.0, None, ars=(2,))),
    ("conv13", 10, _mbox(105.0, 150.0)),
    ("conv14_2", 5, _mbox(150.0, 195.0)),
    ("conv15_2", 3, _mbox(195.0, 240.0)),
    ("conv16_2", 2, _mbox(240.0, 285.0)),
    ("conv17_2", 1, _mbox(285.0, 300.0)),
]

CASES = [
    pytest.param(params, (size, size), (300, 300), id=f"mobilenet_ssd-{name}")
    for name, size, params in MOBILENET_SSD_HEADS
] + [
    pytest.param({**_mbox(30.0, 60.0, ars=(2,)), "step": 8, "img_size": 300},
                 (38, 38), (300, 300), id="vgg_ssd300-conv4_3-step8-img_size"),
    pytest.param({**_mbox(60.0, 111.0), "step": 16}, (19, 19), (300, 300),
                 id="vgg_ssd300-fc7-step16"),
    pytest.param({**_mbox(213.0, 264.0, ars=(2,)), "step": 100}, (3, 3), (300, 300),
                 id="vgg_ssd300-conv8_2-step100"),
    pytest.param({**_mbox(40.0, 90.0), "img_h": 180, "img_w": 320,
                  "step_h": 16, "step_w": 20},
                 (12, 16), (180, 320), id="non_square-img_hw-step_hw"),
    pytest.param({**_mbox(50.0, None, ars=(2,)), "step_h": 12.5, "step_w": 7.25},
                 (6, 9), (75, 65), id="non_square-fractional_steps"),
    pytest.param(_mbox(33.0, 71.0), (7, 11), (97, 131), id="non_square-default_step"),
    pytest.param({**_mbox(150.0, 250.0), "clip": True}, (4, 4), (300, 300),
                 id="clip_true"),
    pytest.param({**_mbox(264.0, 315.0), "clip": True}, (3, 5), (300, 200),
                 id="clip_true-non_square"),
    pytest.param({**_mbox(60.0, 111.0), "variance": [0.1]}, (5, 5), (300, 300),
                 id="single_variance"),
    pytest.param({**_mbox(60.0, 111.0), "variance": [0.25]}, (5, 5), (300, 300),
                 id="single_variance-0.25"),
    pytest.param({"min_size": [30, 60, 90], "max_size": [60, 90, 120],
                  "aspect_ratio": [2], "flip": True, "clip": False,
                  "variance": MBOX_VARIANCE},
                 (5, 5), (300, 300), id="multi_min_max"),
    pytest.param({"min_size": [32, 64, 128], "clip": False, "variance": MBOX_VARIANCE,
                  "step": 32, "offset": 0.5},
                 (20, 15), (640, 480), id="multi_min-no_ar-faceboxes_like"),
    pytest.param({**_mbox(60.0, 111.0, ars=(1, 2, 2))}, (3, 3), (300, 300),
                 id="ar_duplicates-1-2-2"),
    pytest.param({**_mbox(60.0, None, ars=(2, 0.5, 3, 2.0000001))}, (3, 3), (300, 300),
                 id="ar_duplicates-flipped_and_near"),
    pytest.param({**_mbox(60.0, 111.0, ars=(2, 3)), "flip": False}, (3, 3), (300, 300),
                 id="flip_false"),
    pytest.param({**_mbox(60.0, 111.0, ars=(2, 0.5)), "flip": False}, (3, 3), (300, 300),
                 id="flip_false-explicit_reciprocal"),
    pytest.param({**_mbox(45.0, 80.0), "offset": 0.0, "step": 10}, (4, 6), (60, 60),
                 id="offset_0"),
    pytest.param({"min_size": [60], "variance": []}, (2, 2), (300, 300),
                 id="defaults-variance_0.1"),
]


@pytest.mark.parametrize("params, feature_hw, image_hw", CASES)
def test_matches_opencv(tmp_path, params, feature_hw, image_hw):
    ref = opencv_priorbox(tmp_path, params, feature_hw, image_hw)
    got = prior_boxes(feature_hw, image_hw, **params)
    _check(got, ref, params, feature_hw)


@pytest.mark.parametrize("name, size, params", MOBILENET_SSD_HEADS,
                         ids=[h[0] for h in MOBILENET_SSD_HEADS])
def test_matches_opencv_pooling_legacy_input(tmp_path, name, size, params):
    """Legacy ``input:`` + ``input_shape`` net; the feature map comes from Pooling.

    The size from ceil((300 - k) / s) + 1 is checked against OpenCV.
    """
    kernel, stride = {19: (16, 16), 10: (30, 30), 5: (60, 60), 3: (100, 100),
                      2: (150, 150), 1: (300, 300)}[size]
    assert math.ceil((300 - kernel) / stride) + 1 == size
    text = _pooling_net(_param_text(params), (300, 300), kernel, stride)
    data = np.random.default_rng(0).standard_normal((1, 3, 300, 300)).astype(np.float32)
    ref = _run_opencv(tmp_path, text, {"data": data}, "pool_mbox_priorbox")
    got = prior_boxes((size, size), (300, 300), **params)
    _check(got, ref, params, (size, size))


# --------------------------------------------------------------------------
# Hand-computed values and Caffe semantics (no OpenCV involved)
# --------------------------------------------------------------------------

def test_hand_computed_single_cell_order():
    """1x1 map at 300x300: min 60, max 150, ar 2 (flip) -> 4 priors in Caffe order."""
    out = prior_boxes((1, 1), (300, 300), min_size=[60], max_size=[150],
                      aspect_ratio=[2], variance=MBOX_VARIANCE)
    c = 150.0
    side = math.sqrt(60 * 150)
    w2, h2 = 60 * math.sqrt(2), 60 / math.sqrt(2)
    boxes = [(60, 60), (side, side), (w2, h2), (h2, w2)]
    expected = np.array([[(c - w / 2) / 300, (c - h / 2) / 300,
                          (c + w / 2) / 300, (c + h / 2) / 300] for w, h in boxes])
    np.testing.assert_allclose(out[0].reshape(-1, 4), expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(out[1].reshape(-1, 4),
                                  np.tile(np.float32(MBOX_VARIANCE), (4, 1)))


def test_multi_min_max_interleave():
    """Per min_size i: min_i, sqrt(min_i*max_i), then aspect ratios of min_i."""
    out = prior_boxes((1, 1), (100, 100), min_size=[10, 20], max_size=[40, 80],
                      aspect_ratio=[4], flip=False)
    boxes = out[0].reshape(-1, 4)
    widths = (boxes[:, 2] - boxes[:, 0]) * 100
    heights = (boxes[:, 3] - boxes[:, 1]) * 100
    np.testing.assert_allclose(widths, [10, 20, 20, 20, 40, 40], rtol=0, atol=1e-4)
    np.testing.assert_allclose(heights, [10, 20, 5, 20, 40, 10], rtol=0, atol=1e-4)


def test_cell_major_layout_and_centres():
    """Cells are row-major (row, then col); centres are (col + offset) * step."""
    out = prior_boxes((2, 3), (40, 90), min_size=[10], offset=0.25, step_h=20, step_w=30)
    boxes = out[0].reshape(2, 3, 1, 4)
    cx = (boxes[..., 0] + boxes[..., 2]) / 2 * 90
    cy = (boxes[..., 1] + boxes[..., 3]) / 2 * 40
    np.testing.assert_allclose(cx[:, :, 0], [[7.5, 37.5, 67.5]] * 2, rtol=0, atol=1e-4)
    np.testing.assert_allclose(cy[:, :, 0], [[5.0] * 3, [25.0] * 3], rtol=0, atol=1e-4)


def test_img_size_overrides_data_blob():
    """img_size / img_h / img_w replace the data blob size (Caffe; OpenCV ignores them)."""
    base = prior_boxes((5, 5), (300, 300), **_mbox(60.0, 111.0))
    got = prior_boxes((5, 5), (999, 17), img_size=300, **_mbox(60.0, 111.0))
    np.testing.assert_array_equal(got, base)
    base_hw = prior_boxes((4, 8), (120, 200), **_mbox(30.0, 50.0))
    got_hw = prior_boxes((4, 8), (1, 1), img_h=120, img_w=200, **_mbox(30.0, 50.0))
    np.testing.assert_array_equal(got_hw, base_hw)


def test_step_overrides_default():
    a = prior_boxes((3, 3), (300, 300), min_size=[60], step=100)
    b = prior_boxes((3, 3), (300, 300), min_size=[60])
    np.testing.assert_array_equal(a, b)
    c = prior_boxes((3, 3), (300, 300), min_size=[60], step=90)
    assert np.abs(c - b).max() > 0.01


def test_sizes_truncated_to_int_like_caffe():
    """Caffe uses ``int min_size_ = min_sizes_[s]`` (OpenCV keeps the fraction)."""
    a = prior_boxes((2, 2), (300, 300), min_size=[60.9], max_size=[150.7], aspect_ratio=[2])
    b = prior_boxes((2, 2), (300, 300), min_size=[60], max_size=[150], aspect_ratio=[2])
    np.testing.assert_array_equal(a, b)


def test_defaults_and_scalars():
    """Caffe defaults: flip true, clip false, variance 0.1; scalars accepted for repeated fields."""
    out = prior_boxes((1, 1), (100, 100), min_size=200, aspect_ratio=2, variance=())
    assert priors_per_cell(min_size=200, aspect_ratio=2) == 3
    assert out.shape == (2, 12)
    assert out[0].min() < 0 and out[0].max() > 1  # not clipped by default
    np.testing.assert_array_equal(out[1], np.float32(0.1))
    clipped = prior_boxes((1, 1), (100, 100), min_size=200, aspect_ratio=2, clip=True)
    assert clipped[0].min() == 0 and clipped[0].max() == 1


@pytest.mark.parametrize("params, expected", [
    ({"min_size": [60]}, 1),
    ({"min_size": [60], "aspect_ratio": [2]}, 3),
    ({"min_size": [60], "aspect_ratio": [2], "flip": False}, 2),
    ({"min_size": [60], "max_size": [100], "aspect_ratio": [2, 3]}, 6),
    ({"min_size": [60], "max_size": [100], "aspect_ratio": [1, 2, 2, 0.5]}, 4),
    ({"min_size": [30, 60], "max_size": [60, 90], "aspect_ratio": [2]}, 8),
    ({"min_size": [32, 64, 128]}, 3),
])
def test_priors_per_cell(params, expected):
    assert priors_per_cell(**params) == expected
    out = prior_boxes((3, 2), (60, 40), **params)
    assert out.shape == (2, 3 * 2 * expected * 4)


@pytest.mark.parametrize("params", [
    {},
    {"min_size": [0]},
    {"min_size": [60, 90], "max_size": [100]},
    {"min_size": [60], "max_size": [60]},
    {"min_size": [60], "variance": [0.1, 0.2, 0.3]},
    {"min_size": [60], "variance": [0.0]},
    {"min_size": [60], "step": 8, "step_h": 8, "step_w": 8},
    {"min_size": [60], "step_h": 8},
    {"min_size": [60], "img_size": 300, "img_h": 300, "img_w": 300},
    {"min_size": [60], "img_w": 300},
])
def test_invalid_params_raise(params):
    with pytest.raises(ValueError):
        prior_boxes((2, 2), (300, 300), **params)


# --------------------------------------------------------------------------
# Real models from shared/models (skipped when absent)
# --------------------------------------------------------------------------

# Feature-map sizes of each model's PriorBox heads, in file order.
REAL_MODELS = {
    "mobilenet_ssd": [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)],
    "mobilenetv2_ssdlite": [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)],
    "vgg_ssd300": [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)],
    "res10_ssd_face": [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)],
    # 640x480 input with strides 32, 64 and 128 (ceil).
    "faceboxes": [(20, 15), (10, 8), (5, 4)],
}

_REPEATED = {"min_size", "max_size", "aspect_ratio", "variance"}


def _strip_comments(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def _balanced_block(text: str, open_brace: int) -> str:
    """Text between the brace at ``open_brace`` and its matching close brace."""
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1:i]
    raise ValueError("unbalanced braces")


def read_priorbox_layers(path: Path):
    """[(layer name, param dict, raw param text)] of the PriorBox layers, in file order."""
    text = _strip_comments(path.read_text())
    layers = []
    for match in re.finditer(r"\blayers?\s*\{", text):
        body = _balanced_block(text, match.end() - 1)
        if not re.search(r'\btype\s*:\s*"PriorBox"', body):
            continue
        name = re.search(r'\bname\s*:\s*"([^"]+)"', body).group(1)
        pmatch = re.search(r"\bprior_box_param\s*\{", body)
        raw = _balanced_block(body, pmatch.end() - 1)
        params: dict = {}
        for key, value in re.findall(r"\b(\w+)\s*:\s*([^\s{}]+)", raw):
            parsed = (value == "true") if value in ("true", "false") else float(value)
            if key in _REPEATED:
                params.setdefault(key, []).append(parsed)
            else:
                params[key] = parsed
        layers.append((name, params, raw))
    return layers


def read_input_hw(path: Path) -> tuple[int, int]:
    dims = [int(d) for d in re.findall(r"\bdim\s*:\s*(\d+)", _strip_comments(path.read_text()))[:4]]
    assert len(dims) == 4
    return dims[2], dims[3]


def _real_cases():
    if not MODELS.is_dir():
        return [pytest.param(None, None, None, marks=pytest.mark.skip(
            reason=f"{MODELS} not present"), id="no-shared-models")]
    cases = []
    for model, sizes in REAL_MODELS.items():
        for i, feature_hw in enumerate(sizes):
            cases.append(pytest.param(model, i, feature_hw, id=f"{model}-head{i}"))
    return cases


@pytest.mark.parametrize("model, head, feature_hw", _real_cases())
def test_real_model_heads(tmp_path, model, head, feature_hw):
    path = MODELS / model / "deploy.prototxt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    layers = read_priorbox_layers(path)
    assert len(layers) == len(REAL_MODELS[model])
    name, params, raw = layers[head]
    image_hw = read_input_hw(path)
    # The model's own parameter text goes to OpenCV. Caffe defaults that
    # OpenCV disagrees on are appended only when the model leaves them out.
    extra = []
    if "clip" not in params:
        extra.append("clip: false")
    if "variance" not in params:
        extra.append("variance: 0.1")
    ref = opencv_priorbox(tmp_path, params, feature_hw, image_hw,
                          param_text=raw + "\n" + "\n".join(extra))
    got = prior_boxes(feature_hw, image_hw, **params)
    _check(got, ref, params, feature_hw)
