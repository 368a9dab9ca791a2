"""The plan's MPS geometry is checked by running it: a wrong number is caught.

Each test converts a net, runs the plan from OUT (``runtime.run_plan``) against OpenCV's
forward of the original, and then runs the same OUT with ONE plan field edited the way
a wrong MPS geometry would be: the correct plan matches (max|diff|/max|ref| <= 1e-4),
the edited one does not, or is refused naming the op and the field.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from caffe2metal.pipeline import convert
from caffe2metal.runtime import PlanError, default_feed, load_plan, run_plan
from conftest import SHARED_MODELS, opencv_run, with_weights, write_net

TOL = 1e-4


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a).reshape(b.shape) - b).max() / np.abs(b).max())


def _converted(proto, tmp_path):
    model, weights = with_weights(proto)
    out = convert(model.prototxt, weights, tmp_path / "out").out
    return model, weights, out


def _edited(out, tmp_path, op_name: str, edit) -> object:
    """A copy of OUT whose plan op ``op_name`` went through ``edit(op)``."""
    bad = tmp_path / "edited"
    shutil.copytree(out, bad)
    m = json.loads((bad / "manifest.json").read_text())
    (op,) = [o for o in m["plan"] if o["name"] == op_name]
    edit(op)
    (bad / "manifest.json").write_text(json.dumps(m))
    return bad


def _check(proto, weights, out, bad, blob: str) -> tuple[float, float]:
    """rel of the correct plan and of the edited one on ``blob`` against OpenCV."""
    feed = default_feed(load_plan(out))
    (ref,) = opencv_run(proto, weights, feed, [blob])
    good = run_plan(out, feed).values[blob]
    wrong = run_plan(bad, feed).values[blob]
    return _rel(good, ref), _rel(wrong, ref)


RESNET50 = SHARED_MODELS / "resnet50" / "deploy.prototxt"


def _up_to(text: str, last: str) -> str:
    """The prototxt's header and its layers up to and including the one named ``last``."""
    head, *blocks = re.split(r"\n(?=layer \{)", text)
    kept = []
    for block in blocks:
        kept.append(block)
        if re.search(rf'name:\s*"{re.escape(last)}"', block):
            return "\n".join([head, *kept]) + "\n"
    raise AssertionError(f"no layer {last!r}")


@pytest.mark.skipif(not RESNET50.is_file(), reason="../shared/models/resnet50 is absent")
def test_resnet50_pool1_offset_off_by_one_no_longer_matches_opencv(tmp_path):
    """ResNet-50's pool1 (3x3 stride 2, no pad, on 112x112: Caffe's ceil rounding gives 56,
    so the last window hangs over the edge): offset floor(3/2) - 0 = 1 matches; 2 (or 0)
    reads every window one pixel off."""
    proto = write_net(tmp_path, _up_to(RESNET50.read_text(), "pool1"), "resnet50_pool1")
    model, weights, out = _converted(proto, tmp_path)
    (op,) = [o for o in load_plan(out)["plan"] if o["name"] == "pool1"]
    assert op["mps"]["offset"] == {"x": 1, "y": 1}
    assert op["mps"]["destination"] == {"featureChannels": 64, "height": 56, "width": 56}
    for delta in (1, -1):
        bad = _edited(out, tmp_path / str(delta), "pool1", lambda o, d=delta: o["mps"].update(
            offset={"x": 1 + d, "y": 1 + d}))
        good, wrong = _check(proto, weights, out, bad, "pool1")
        assert good <= TOL, good                  # measured 4.8e-7 (wrong: 0.84, 0.65)
        assert wrong > 100 * TOL, (delta, wrong)


CONCAT = """
name: "concat"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "a" type: "Convolution" bottom: "data" top: "a"
        convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
layer { name: "b" type: "Convolution" bottom: "data" top: "b"
        convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }
layer { name: "c" type: "Convolution" bottom: "cat" top: "c"
        convolution_param { num_output: 4 kernel_size: 1 } }
"""


def test_concatenation_offset_not_a_multiple_of_4_is_refused(tmp_path):
    """3 + 5 channels: the second source starts at destination channel 4 (a slice of its
    own), Caffe's channels are read back through channelMap; offset 3 (packed as Caffe
    packs them) is what MPSCNNKernel.h forbids."""
    proto = write_net(tmp_path, CONCAT)
    _, weights, out = _converted(proto, tmp_path)
    (op,) = [o for o in load_plan(out)["plan"] if o["name"] == "cat"]
    assert op["mps"]["destinationFeatureChannelOffsets"] == [0, 4]
    assert op["mps"]["channelMap"] == [0, 1, 2, 4, 5, 6, 7, 8]
    feed = default_feed(load_plan(out))
    cat, c = opencv_run(proto, weights, feed, ["cat", "c"])
    r = run_plan(out, feed)
    assert _rel(r.values["cat"], cat) <= TOL and _rel(r.values["c"], c) <= TOL
    bad = _edited(out, tmp_path, "cat", lambda o: o["mps"].update(
        destinationFeatureChannelOffsets=[0, 3], channelMap=list(range(8))))
    with pytest.raises(PlanError, match=r"op 'cat': mps\.destinationFeatureChannelOffsets: "
                                        r"3 is not a multiple of 4"):
        run_plan(bad, feed)


AVERAGE = """
name: "average"
input: "data"
input_shape { dim: 1 dim: 4 dim: 9 dim: 9 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
"""


def test_average_pooling_without_zero_pad_size_no_longer_matches_opencv(tmp_path):
    """3x3 stride 2 pad 1 average pooling on 9x9 (5x5 out): Caffe divides an edge window by
    the 9 pixels it covers inside the padded image (pad zeros count), corner windows too.
    MPSCNNPoolingAverage's zeroPadSizeX/Y default to 0: an app that leaves them there
    divides edge windows by 6 (corners by 4), a different answer."""
    proto = write_net(tmp_path, AVERAGE)
    _, weights, out = _converted(proto, tmp_path)
    (op,) = [o for o in load_plan(out)["plan"] if o["name"] == "pool"]
    assert op["mps"]["kernel"] == "MPSCNNPoolingAverage"
    assert (op["mps"]["zeroPadSizeX"], op["mps"]["zeroPadSizeY"]) == (1, 1)
    assert op["mps"]["offset"] == {"x": 0, "y": 0}
    bad = _edited(out, tmp_path, "pool", lambda o: o["mps"].update(zeroPadSizeX=0,
                                                                  zeroPadSizeY=0))
    good, wrong = _check(proto, weights, out, bad, "pool")
    assert good <= TOL, good
    assert wrong > 100 * TOL, wrong           # measured 8.1e-8 and 0.85
